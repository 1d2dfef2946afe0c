"""`phimm.compose`: a composition of tiny random Hugging Face parts made here (a Qwen2 or Phi-3 causal LM, a SigLIP
vision tower, a Whisper encoder, peft LoRAs with B != 0). Text rows equal the base model's own greedy output; a
forced adapter equals the base plus that adapter through peft; every route runs alone and in a mixed batch with
rows equal to singles; save_pretrained -> phimm.load gives the same tokens; bad compositions get typed errors."""

from __future__ import annotations

import time
import pytest
import torch

import phimm
from conftest import make_audio, make_image
from phimm.errors import AdapterError, CompositionError

N = 6


def _tokenizer():
    from phimm.testing import tiny_tokenizer

    return tiny_tokenizer()


def _base(folder, kind: str = "qwen2", hidden: int = 32, seed: int = 0):
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from phimm.tokenizer import vocab_size_for

    tok = _tokenizer()
    common = dict(vocab_size=vocab_size_for(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if kind == "qwen2" else Phi3ForCausalLM(Phi3Config(**common))
    model.eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _peft(base_folder, out, r: int, targets, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_folder))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import (SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel, WhisperConfig,
                              WhisperFeatureExtractor, WhisperModel)

    root = tmp_path_factory.mktemp("compose")
    base = _base(root / "base")
    torch.manual_seed(1)
    vision = root / "siglip"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(str(vision))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(vision))
    speech = root / "whisper"
    WhisperModel(WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                               max_source_positions=100, max_target_positions=16, vocab_size=64, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(str(speech))
    WhisperFeatureExtractor(feature_size=80, chunk_length=2).save_pretrained(str(speech))
    adapters = {
        "vision": _peft(base, root / "vision-lora", 4, ["q_proj", "v_proj"], seed=2),
        "speech": _peft(base, root / "speech-lora", 6, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], seed=3),
        "task": _peft(base, root / "task-lora", 3, ["k_proj", "lm_head"], seed=4),
    }
    return {"root": root, "base": base, "vision": vision, "speech": speech, "adapters": adapters}


@pytest.fixture(scope="module")
def pipe(parts):
    p = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"],
                      adapters=parts["adapters"], threads=1)
    yield p
    p.close()


def _requests():
    return [
        phimm.Request(prompt="hello world what color is the circle"),
        phimm.Request(prompt="<|image|>what shape is the red one", images=[make_image(0)]),
        phimm.Request(prompt="<|audio|>transcribe the audio clip", audios=[make_audio(0, seconds=1.3)]),
        phimm.Request(prompt="<|image|><|audio|>answer the question", images=[make_image(1)],
                      audios=[make_audio(1, seconds=0.6)]),
    ]


def _greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), out.logits[0][0]


def test_text_route_is_the_base_model(pipe, parts):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(parts["base"])).eval()
    req = _requests()[0]
    got = pipe(req, max_new_tokens=N, min_new_tokens=N, output_logits=True)
    assert got.route.adapter is None
    want, want_logits = _greedy(base, pipe.prepare(req)[0].input_ids, N)
    assert got.token_ids == want
    assert torch.equal(got.logits[0], want_logits)  # bit-identical: the base alone, nothing added


@pytest.mark.parametrize("name", ["task", "speech"])
def test_forced_adapter_is_the_base_plus_peft(pipe, parts, name):
    """`task` targets k_proj and lm_head, `speech` every projection: each equals peft's own forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(parts["base"])),
                                    str(parts["adapters"][name])).eval()
    req = phimm.Request(prompt="the red square and the blue star", adapter=name)
    got = pipe(req, max_new_tokens=N, min_new_tokens=N, output_logits=True)
    assert got.route.adapter == name
    with torch.no_grad():
        want, want_logits = _greedy(ref, pipe.prepare(req)[0].input_ids, N)
    assert got.token_ids == want
    assert (got.logits[0] - want_logits).abs().max().item() < 1e-5


def test_fused_qkv_base(tmp_path):
    """A Phi-3 base (fused qkv_proj, gate_up_proj) with a LoRA on them: per row as peft gives it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base(tmp_path / "phi3", kind="phi3")
    lora = _peft(base, tmp_path / "lora", 5, ["qkv_proj", "gate_up_proj"], seed=7)
    p = phimm.compose(base=base, adapters={"task": lora}, threads=1)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(lora)).eval()
    plain = phimm.Request(prompt="zero one two three")
    forced = phimm.Request(prompt="zero one two three", adapter="task")
    outs = p([plain, forced], max_new_tokens=N, min_new_tokens=N, output_logits=True)  # one mixed batch
    ids = p.prepare(plain)[0].input_ids
    with torch.no_grad(), ref.disable_adapter():
        want_plain, _ = _greedy(ref, ids, N)
    with torch.no_grad():
        want_forced, want_logits = _greedy(ref, ids, N)
    assert outs[0].token_ids == want_plain and outs[1].token_ids == want_forced
    assert want_plain != want_forced  # the adapter (B != 0) changes the answer
    assert (outs[1].logits[0] - want_logits).abs().max().item() < 1e-5
    p.close()


def test_every_route_alone_and_mixed(pipe):
    reqs = _requests()
    alone = [pipe(r, max_new_tokens=N, min_new_tokens=N, output_logits=True) for r in reqs]
    assert [str(o.route) for o in alone] == ["none", "vision", "speech", "vision+vision_speech"]
    assert alone[1].prompt_tokens > 16  # one token per SigLIP patch (16) plus the text
    mixed = pipe(reqs + reqs[::-1], max_new_tokens=N, min_new_tokens=N, output_logits=True)
    for a, m in zip(alone + alone[::-1], mixed):
        assert m.route == a.route and m.token_ids == a.token_ids
        assert (m.logits - a.logits).abs().max().item() < 1e-5


def test_arrivals_join_the_decode_forward_on_a_composition(pipe):
    """A composition of Hugging Face parts (a Qwen2 base) takes mixed steps too (`phimm.step`): requests that
    arrive while another decodes are prefilled inside its decode forward, and each row equals the same request
    alone."""
    assert pipe.engine.mixed_steps
    reqs = _requests()
    alone = [pipe(r, max_new_tokens=N, min_new_tokens=N, output_logits=True) for r in reqs]
    long_ref = pipe(reqs[3], max_new_tokens=40, min_new_tokens=40)
    before = pipe.engine.counters["mixed_steps"]
    long = pipe.open(reqs[3], max_new_tokens=40, min_new_tokens=40)
    next(iter(long))  # decoding now
    futures = []
    for r in reqs:
        futures.append(pipe.submit(r, max_new_tokens=N, min_new_tokens=N, output_logits=True))
        time.sleep(0.003)
    for a, f in zip(alone, futures):
        m = f.result(timeout=120)
        assert m.route == a.route and m.token_ids == a.token_ids
        assert (m.logits[0] - a.logits[0]).abs().max().item() < 1e-5
    assert long.result(timeout=120).token_ids == long_ref.token_ids
    assert pipe.engine.counters["mixed_steps"] > before


def test_projector_choice_matters(pipe):
    """The same clip through the speech and the vision-speech projectors gives different features."""
    from routers import AudioProjector

    aud = pipe.processor.process_audio(make_audio(2, seconds=1.0))
    a = pipe.model.audio_features(aud, AudioProjector.SPEECH)
    b = pipe.model.audio_features(aud, AudioProjector.VISION_SPEECH)
    assert a.shape == b.shape == (aud.num_tokens, pipe.model.config.hidden_size)
    assert not torch.allclose(a, b)


def test_save_and_load_gives_the_same_tokens(pipe, tmp_path):
    reqs = _requests()
    want = pipe(reqs, max_new_tokens=N, min_new_tokens=N)
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "phimm.json").is_file() and (tmp_path / "saved" / "projectors.safetensors").is_file()
    back = phimm.load(tmp_path / "saved", threads=1)
    assert sorted(back.adapters) == ["speech", "task", "vision"]
    got = back(reqs, max_new_tokens=N, min_new_tokens=N)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [str(g.route) for g in got] == [str(w.route) for w in want]
    back.close()


def test_bad_compositions_get_typed_errors(parts, tmp_path):
    with pytest.raises(CompositionError, match="not a SigLIP or CLIP"):
        phimm.compose(base=parts["base"], vision=parts["speech"], threads=1)
    with pytest.raises(CompositionError, match="not a Whisper"):
        phimm.compose(base=parts["base"], speech=parts["vision"], threads=1)
    other = _base(tmp_path / "wide", hidden=48, seed=5)  # an adapter made for another base
    lora = _peft(other, tmp_path / "wide-lora", 4, ["q_proj"], seed=6)
    with pytest.raises(AdapterError, match="does not fit"):
        phimm.compose(base=parts["base"], adapters={"vision": lora}, threads=1)
    p = phimm.compose(base=parts["base"], threads=1)  # no encoders: media are refused before any compute
    with pytest.raises(phimm.errors.ImageError, match="no vision encoder"):
        p(phimm.Request(prompt="<|image|>what", images=[make_image(0)]))
    p.close()


def test_static_decode_step_on_a_composition(parts, monkeypatch):
    """The static step behind CUDA graphs (run here uncaptured) on a Qwen2 composition whose `task` adapter
    targets lm_head: mixed rows equal the eager engine's."""
    monkeypatch.setenv("PHIMM_CUDA_GRAPHS", "static")
    static = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"],
                           adapters=parts["adapters"], threads=1)
    assert static.engine._graphs is not None
    monkeypatch.setenv("PHIMM_CUDA_GRAPHS", "0")
    eager = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"],
                          adapters=parts["adapters"], threads=1)
    assert eager.engine._graphs is None
    reqs = _requests() + [phimm.Request(prompt="zero one two", adapter="task")]
    want = eager(reqs, max_new_tokens=N, min_new_tokens=N, output_logits=True)
    got = static(reqs, max_new_tokens=N, min_new_tokens=N, output_logits=True)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert (g.logits - w.logits).abs().max().item() < 1e-5
    static.close()
    eager.close()


def test_int8_and_bf16_compositions(parts):
    """int8 (and bf16 with packed weights) compositions run every route; int8's text answers mostly agree with
    float32's (random tiny parts: near-ties are common, so agreement, not equality)."""
    full = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"],
                         adapters=parts["adapters"], threads=1)
    q = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"],
                      adapters=parts["adapters"], threads=1, quantize="int8")
    assert q.model.weight_format == "int8"
    bf = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"],
                       adapters=parts["adapters"], threads=1, dtype="bfloat16")
    reqs = _requests()
    for p in (q, bf):
        outs = p(reqs, max_new_tokens=N, min_new_tokens=N, output_logits=True)
        assert all(o.error is None and len(o.token_ids) == N for o in outs)
        assert [str(o.route) for o in outs] == ["none", "vision", "speech", "vision+vision_speech"]
    want = full(reqs[0], max_new_tokens=1, output_logits=True).logits[0]
    got = q(reqs[0], max_new_tokens=1, output_logits=True).logits[0]
    assert torch.corrcoef(torch.stack([want, got]))[0, 1] > 0.99  # int8 logits follow float32's
    for p in (full, q, bf):
        p.close()


def test_training_a_composition(parts, tmp_path):
    """`phimm train --composition`: the vision stage trains the projector and a fresh `vision` LoRA on toy image
    questions (loss falls), the vision-speech stage its projector; the export loads with `phimm.load` and its
    image route takes the trained adapter."""
    from phimm.train.composition import run_composition

    p = phimm.compose(base=parts["base"], vision=parts["vision"], speech=parts["speech"], threads=1)
    p.save_pretrained(tmp_path / "comp")
    p.close()
    report = run_composition(tmp_path / "comp", tmp_path / "trained", ("vision",),
                             {"steps": 30, "examples": 24, "batch": 4, "lr": 5e-3, "rank": 4})
    stage = report["stages"][0]
    assert stage["examples"] == 24 and stage["final_loss"] < stage["first_loss"]
    trained = phimm.load(tmp_path / "trained", threads=1)
    assert trained.adapters == ["vision"]
    before = phimm.load(tmp_path / "comp", threads=1)
    req = phimm.Request(prompt="<|image|>what color is the circle", images=[make_image(3)])
    a = trained(req, max_new_tokens=2, output_logits=True)
    b = before(req, max_new_tokens=2, output_logits=True)
    assert str(a.route) == "vision" and str(b.route) == "none"
    assert not torch.allclose(a.logits[0], b.logits[0])  # trained projector and adapter change the answer
    trained.close()
    before.close()


def test_saved_composition_in_the_serve_worker(pipe, tmp_path):
    """`phimm serve --model my-composition`: the worker process loads it, the HTTP side prepares requests with
    the composition's own processor (sent over as a `Preparer`), and the answers equal the in-process ones."""
    from phimm.serve.worker import EngineProcess

    pipe.save_pretrained(tmp_path / "saved")
    proc = EngineProcess({"path": str(tmp_path / "saved"), "threads": 1})
    try:
        assert proc._preparer is not None  # prepared on this side
        for req in _requests():
            want = pipe(req, max_new_tokens=N, min_new_tokens=N)
            got = proc.open(req, max_new_tokens=N, min_new_tokens=N).result(timeout=120)
            assert str(got.route) == str(want.route) and got.token_ids == want.token_ids
    finally:
        proc.close()
