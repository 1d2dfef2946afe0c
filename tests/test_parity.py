"""phimm against transformers + peft on the same weights, on all four routes, alone and in one mixed batch."""

from __future__ import annotations

import pytest
import torch

import phimm
from conftest import make_audio, make_image
from reference import Reference

N_NEW = 6
IMG, AUD = "<|endoftext10|>", "<|endoftext11|>"


def _cases():
    img = make_image(1, size=(500, 300))  # 2x1 HD crops + global
    aud = make_audio(1, seconds=1.3)
    aud2 = make_audio(2, seconds=0.7, rate=16000)
    return {
        "text": (f"<|user|>what color is the circle<|end|><|assistant|>", [], [], None),
        "image": (f"<|user|>{IMG}what shape is the red one<|end|><|assistant|>", [img], [], "vision"),
        "audio": (f"<|user|>{AUD}transcribe the audio clip into text<|end|><|assistant|>", [], [aud], "speech"),
        "image+audio": (f"<|user|>{IMG}{AUD}answer the spoken question about the image<|end|><|assistant|>",
                        [make_image(2, size=(200, 260))], [aud2], "vision"),
    }


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return Reference(tiny_ckpt)


def _request(prompt, images, audios):
    return phimm.Request(prompt=prompt, images=images, audios=audios)


@pytest.mark.parametrize("route", ["text", "image", "audio", "image+audio"])
def test_matches_transformers_peft(tiny_pipe, ref, route):
    prompt, images, audios, adapter = _cases()[route]
    out = tiny_pipe(_request(prompt, images, audios), max_new_tokens=N_NEW, output_logits=True,
                    min_new_tokens=N_NEW)
    assert out.route.adapter == adapter
    inputs = ref.inputs(prompt, images, audios)
    want_logits = ref.first_logits(inputs, adapter)
    diff = (out.logits[0] - want_logits).abs().max().item()
    assert diff < 1e-5, f"{route}: first-step logits differ by {diff}"
    want = ref.generate(inputs, adapter, N_NEW)
    assert out.token_ids == [t for t in want if t not in tiny_pipe.eos_token_ids][: len(out.token_ids)]
    assert len(out.token_ids) == N_NEW


def test_adapter_changes_its_route(tiny_pipe, ref):
    """Each adapter moves the logits of its own route (B != 0), so the parity above is not vacuous."""
    for route in ("image", "audio"):
        prompt, images, audios, adapter = _cases()[route]
        with_adapter = tiny_pipe(_request(prompt, images, audios), max_new_tokens=1, output_logits=True).logits[0]
        forced_base = tiny_pipe(phimm.Request(prompt=prompt, images=images, audios=audios,
                                              adapter=phimm.Route(None, phimm.AudioProjector.SPEECH if audios else None)),
                                max_new_tokens=1, output_logits=True).logits[0]
        assert (with_adapter - forced_base).abs().max().item() > 1e-3, route


def test_mixed_batch_rows_equal_alone(tiny_pipe):
    cases = _cases()
    reqs = [_request(p, i, a) for p, i, a, _ in cases.values()]
    reqs = reqs + reqs[::-1]  # 8 rows, every route twice, different padding
    batch = tiny_pipe(reqs, max_new_tokens=N_NEW, output_logits=True)
    for req, got in zip(reqs, batch):
        alone = tiny_pipe(req, max_new_tokens=N_NEW, output_logits=True)
        assert got.error is None
        assert got.route == alone.route
        assert got.token_ids == alone.token_ids
        assert (got.logits[0] - alone.logits[0]).abs().max().item() < 1e-5
    assert [o.route.adapter for o in batch[:4]] == [None, "vision", "speech", "vision"]
    assert str(batch[3].route) == "vision+vision_speech"


def test_text_route_bit_identical_without_adapters(tiny_ckpt, tiny_pipe):
    bare = phimm.load(tiny_ckpt, adapters=[])  # same weights, no adapter attached
    assert bare.adapters == []
    prompt = "<|user|>what color is the circle<|end|><|assistant|>"
    a = tiny_pipe(prompt, max_new_tokens=N_NEW, output_logits=True)
    b = bare(prompt, max_new_tokens=N_NEW, output_logits=True)
    assert a.token_ids == b.token_ids
    assert torch.equal(a.logits, b.logits)


def test_vision_tower_is_bidirectional(tiny_pipe):
    """SigLIP attends both ways. transformers' Phi-4-multimodal vision attention is flagged causal, which its sdpa
    call obeys only when no crop in the batch is padded; phimm clears the flag, so a crop encodes the same
    whether or not a padded crop shares its batch, and its other patches see its last one."""
    tower = tiny_pipe.model.hf.model.embed_tokens_extend.image_embed.img_processor
    size, ps = tower.config.image_size, tower.config.patch_size
    n = size // ps
    torch.manual_seed(0)
    px = torch.randn(2, 3, size, size, dtype=tiny_pipe.model.dtype)
    full = torch.ones(2, n, n, dtype=torch.bool)
    padded = full.clone()
    padded[1, -1, :] = False

    def encode(pixels, mask):
        with torch.no_grad():
            return tower(pixels, patch_attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    alone = encode(px, full)[0]
    beside_padded = encode(px, padded)[0]
    torch.testing.assert_close(alone, beside_padded, rtol=1e-4, atol=1e-5)
    moved = px.clone()
    moved[0, :, -ps:, -ps:] += 10.0  # only the last patch changes: causal attention would hide that from the rest
    assert not torch.allclose(encode(moved, full)[0, :-1], alone[:-1], atol=1e-4)
