"""Configurations unlike the default test model still match transformers + peft on every route."""

from __future__ import annotations

import pytest

import phimm
from test_parity import N_NEW, _cases, _request
from reference import Reference

CONFIGS = {
    # wider GQA ratio, odd head count, 3 layers, partial rotary 0.5, a sliding window shorter than the prompts,
    # adapters of different ranks on the attention projections only
    "gqa-window-attn-only": dict(
        overrides=dict(hidden=48, heads=6, kv_heads=2, layers=3, intermediate=80, sliding_window=200,
                       partial_rotary_factor=0.5, vision_hidden=24, audio_hidden=40, audio_blocks=2),
        lora_ranks={"vision": 3, "speech": 5}, lora_targets=["qkv_proj", "o_proj"]),
    # multi-query attention, a vocabulary larger than the tokenizer's, LoRA on the MLP only
    "mqa-mlp-only": dict(
        overrides=dict(hidden=64, heads=4, kv_heads=1, layers=2, intermediate=96, vocab_size=1024,
                       vision_layers=2),
        lora_ranks={"vision": 7, "speech": 2}, lora_targets=["gate_up_proj", "down_proj"]),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def unseen(request, tmp_path_factory):
    from phimm.testing import make_tiny_checkpoint

    spec = CONFIGS[request.param]
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", seed=3,
                                lora_ranks=spec["lora_ranks"], lora_targets=spec["lora_targets"], **spec["overrides"])
    return phimm.load(ckpt), Reference(ckpt)


@pytest.mark.parametrize("route", ["text", "image", "audio", "image+audio"])
def test_unseen_config_matches_reference(unseen, route):
    pipe, ref = unseen
    prompt, images, audios, adapter = _cases()[route]
    out = pipe(_request(prompt, images, audios), max_new_tokens=N_NEW, min_new_tokens=N_NEW, output_logits=True)
    inputs = ref.inputs(prompt, images, audios)
    assert out.prompt_tokens == inputs["input_ids"].shape[1]
    diff = (out.logits[0] - ref.first_logits(inputs, adapter)).abs().max().item()
    assert diff < 1e-5, diff
    want = [t for t in ref.generate(inputs, adapter, N_NEW) if t not in pipe.eos_token_ids]
    assert out.token_ids[: len(want)] == want


def test_unseen_config_mixed_batch(unseen):
    pipe, _ = unseen
    reqs = [_request(p, i, a) for p, i, a, _ in _cases().values()]
    batch = pipe(reqs, max_new_tokens=N_NEW, output_logits=True)
    for req, got in zip(reqs, batch):
        alone = pipe(req, max_new_tokens=N_NEW, output_logits=True)
        assert got.token_ids == alone.token_ids
        assert (got.logits[0] - alone.logits[0]).abs().max().item() < 1e-5
