"""The published checkpoint's original (remote-code) layout: key mapping and tensor list against the reference
description, a miniature written in both layouts loading to identical outputs, checks before a long load, and
refusing pickles."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import phimm
from conftest import make_audio, make_image
from phimm.errors import CheckpointError, UnsafeCheckpointError
from phimm.formats import check as chk
from phimm.formats import original as orig
from phimm.formats import random_ckpt as rc

REFERENCE = Path(os.environ.get("PHIMM_REFERENCE", "/work/shared/phi4mm-reference"))
needs_reference = pytest.mark.skipif(not (REFERENCE / "tensor_shapes.DERIVED.json").is_file(),
                                     reason="the reference description of the published checkpoint is not here")
N_NEW = 4


def _ref(name):
    return json.loads((REFERENCE / name).read_text())


# ---- the reference description ---------------------------------------------------------------------------------


@needs_reference
def test_key_mapping_reproduces_reference():
    want = _ref("original_to_hf_keys.DERIVED.json")
    assert len(want) == 2047
    got = {k: orig.original_to_native_key(k) for k in want}
    wrong = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not wrong, list(wrong.items())[:5]
    assert sum(v is None for v in got.values()) == 512  # both LoRAs, dropped from the base weights


@needs_reference
def test_reference_tensors_accounted_for_by_the_config():
    shapes = _ref("tensor_shapes.DERIVED.json")
    cfg = _ref("config.reconstructed.json")
    exp = orig.expected_tensors(cfg)  # built on the meta device
    assert set(exp.shapes) == set(shapes), (sorted(set(shapes) - set(exp.shapes))[:5],
                                            sorted(set(exp.shapes) - set(shapes))[:5])
    wrong = [k for k, v in shapes.items() if tuple(v["shape"]) != exp.shapes[k]]
    assert not wrong, wrong[:5]
    assert {v["dtype"] for v in shapes.values()} == {"BF16"}
    assert sum(math.prod(s) for s in exp.shapes.values()) * 2 == _ref("model.safetensors.index.DERIVED.json")[
        "metadata"]["total_size"] == 11148920768
    # every base key maps to a native key of the model, and back
    for okey, nkey in exp.native.items():
        assert orig.original_to_native_key(okey) == nkey
    assert exp.tied == ("lm_head.weight",)
    assert {n: (s.r, s.alpha, s.dropout) for n, s in exp.lora.items()} == {"vision": (256, 512, 0.0),
                                                                           "speech": (320, 640, 0.01)}
    assert {n: len(p) for n, p in exp.targets.items()} == {"vision": 128, "speech": 128}


@needs_reference
def test_builtin_config_and_shard_split_match_reference():
    assert rc.full_original_config() == _ref("config.reconstructed.json")
    shapes = _ref("tensor_shapes.DERIVED.json")
    entries = [(k, tuple(v["shape"]), "BF16") for k, v in shapes.items()]
    split = rc._split_shards(entries, rc.DEFAULT_SHARD_SIZE)
    got = {k: f"model-{i + 1:05d}-of-{len(split):05d}.safetensors" for i, s in enumerate(split) for k, _, _ in s}
    assert got == {k: v["shard"] for k, v in shapes.items()}
    assert got == _ref("model.safetensors.index.DERIVED.json")["weight_map"]


def test_rename_table_gives_both_directions():
    """Every entry of the one rename table renames original -> native and back, for a module's tensors and for a
    bare parameter."""
    values = {"n": "7", "io": "out", "qkv": "k"}
    assert len(orig.ORIGINAL_TO_NATIVE_RULES) == len(orig.NATIVE_TO_ORIGINAL_RULES) == len(orig.RENAMES)
    for r in orig.RENAMES:
        o, n = r.original.format(**values), r.native.format(**values)
        leaves = [""] if r.param else [".weight", ".bias"]
        for leaf in leaves:
            assert orig.original_to_native_key(o + leaf) == n + leaf
            assert orig.native_to_original_key(n + leaf) == o + leaf
    assert orig.native_to_original_key("model.layers.0.self_attn.qkv_proj.weight",
                                       ["model.layers.0.self_attn.qkv_proj"]) == (
        "model.layers.0.self_attn.qkv_proj.base_layer.weight")
    assert orig.original_to_native_key("model.layers.0.self_attn.qkv_proj.base_layer.weight") == (
        "model.layers.0.self_attn.qkv_proj.weight")
    assert orig.original_to_native_key("model.layers.0.self_attn.qkv_proj.lora_A.vision.weight") is None


def test_native_config_follows_conversion_rules():
    cfg = orig.native_config(rc.full_original_config())
    assert cfg.model_type == "phi4_multimodal"
    assert cfg.eos_token_id == [199999, 200020] and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_type"] == "longrope" and cfg.rope_parameters["partial_rotary_factor"] == 0.75
    assert len(cfg.rope_parameters["long_factor"]) == 48
    v, a = cfg.vision_config, cfg.audio_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.crop_size,
            v.image_size, v.patch_size) == (1152, 27, 16, 4304, 448, 448, 14)
    assert (a.hidden_size, a.num_attention_heads, a.intermediate_size, a.nemo_conv_channels, a.bias_max_distance,
            a.num_blocks, a.downsample_rate) == (1024, 16, 1536, 1024, 500, 24, 1)
    assert not hasattr(cfg, "vision_lora") and not hasattr(cfg, "embd_layer")
    tiny, _ = rc.shrink()
    tv = orig.native_config(tiny).vision_config
    assert (tv.hidden_size, tv.num_hidden_layers, tv.crop_size) == (32, 2, 448)  # `vision_config` overrides
    assert orig.native_config(tiny).audio_config.depthwise_separable_out_channel == 32


# ---- a miniature in both layouts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig_layout")
    cfg, shapes = rc.shrink()
    o = rc.write_random_checkpoint(root / "original", shapes, layout="original", config=cfg, seed=3,
                                   shard_size=20_000_000, peft_folders=True)
    h = rc.write_random_checkpoint(root / "hf", shapes, layout="hf", config=cfg, seed=3, shard_size=20_000_000)
    return o, h


@pytest.fixture(scope="module")
def pipes(tiny_pair):
    o, h = tiny_pair
    return phimm.load(o, dtype="float32", threads=1), phimm.load(h, dtype="float32", threads=1)


def _cases():
    img = make_image(1, size=(500, 300))
    aud = make_audio(1, seconds=1.3)
    return {
        "text": ("<|user|>what color is the circle<|end|><|assistant|>", [], [], None),
        "image": ("<|user|><|image_1|>what shape is the red one<|end|><|assistant|>", [img], [], "vision"),
        "audio": ("<|user|><|audio_1|>transcribe the audio clip<|end|><|assistant|>", [], [aud], "speech"),
        "image+audio": ("<|user|><|image_1|><|audio_1|>answer the spoken question<|end|><|assistant|>",
                        [make_image(2, size=(200, 260))], [make_audio(2, seconds=0.7)], "vision"),
    }


def test_tiny_checkpoint_files(tiny_pair):
    o, h = tiny_pair
    assert (o / "model.safetensors.index.json").is_file() and len(list(o.glob("model-*.safetensors"))) == 2
    assert json.loads((o / "config.json").read_text())["model_type"] == "phi4mm"
    assert json.loads((h / "config.json").read_text())["model_type"] == "phi4_multimodal"
    assert phimm.checkpoint.detect_layout(o) == "original" and phimm.checkpoint.detect_layout(h) == "hf"
    r = chk.check(o)
    assert r.ok and r.layout == "original" and set(r.adapters) == {"vision", "speech"}
    assert any(".lora_A.vision.weight" in k for k in r.tensors) and any(".base_layer." in k for k in r.tensors)
    assert chk.check(h).ok
    assert json.loads((h / "vision-lora" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("route", ["text", "image", "audio", "image+audio"])
def test_original_layout_equals_native_layout(pipes, route):
    po, ph = pipes
    prompt, images, audios, adapter = _cases()[route]
    a = po(phimm.Request(prompt=prompt, images=images, audios=audios), max_new_tokens=N_NEW,
           min_new_tokens=N_NEW, output_logits=True)
    native_prompt = prompt.replace("<|image_1|>", "<|image|>").replace("<|audio_1|>", "<|audio|>")
    b = ph(phimm.Request(prompt=native_prompt, images=images, audios=audios), max_new_tokens=N_NEW,
           min_new_tokens=N_NEW, output_logits=True)
    assert a.route == b.route and a.route.adapter == adapter
    assert a.token_ids == b.token_ids and len(a.token_ids) == N_NEW
    assert torch.equal(a.logits, b.logits)


def test_same_weights_buffers_and_adapters(pipes):
    from transformers import Phi4MultimodalForCausalLM

    po, ph = pipes
    m1, m2 = po.model.hf, ph.model.hf
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert set(s1) == set(s2)
    assert all(s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in s1)
    assert m1.lm_head.weight is m1.model.embed_tokens.weight  # tied
    assert not any(t.is_meta for t in list(m1.parameters()) + list(m1.buffers()))
    assert not any(p.requires_grad for p in m1.parameters()) and not m1.training
    # non-persistent buffers (rotary) as a normally built model has them
    normal = Phi4MultimodalForCausalLM(m1.config)
    nb, b1 = dict(normal.named_buffers()), dict(m1.named_buffers())
    for k in ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"):
        assert b1[k].dtype == nb[k].dtype and torch.equal(b1[k], nb[k]), k
    assert m1.model.rotary_emb.attention_scaling == normal.model.rotary_emb.attention_scaling
    for name in ("vision", "speech"):
        x, y = po.model.adapter_info[name], ph.model.adapter_info[name]
        assert (x.r, x.alpha, set(x.weights)) == (y.r, y.alpha, set(y.weights))
        assert all(torch.equal(x.weights[p][i], y.weights[p][i]) for p in x.weights for i in (0, 1))
    assert po.model.adapter_info["speech"].r == 6 and po.model.adapter_info["vision"].r == 8


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `file` (Linux)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(file):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def _in_map(t: torch.Tensor, file: Path) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in _mapped_ranges(file))


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("per_file", [False, True])
def test_bf16_load_maps_the_files(tiny_pair, monkeypatch, per_file):
    """Weights already in the file's dtype are the file's pages (no copy); LoRA tensors are kept as stored."""
    import gc

    if per_file:
        monkeypatch.setenv("PHIMM_MMAP_PER_FILE", "1")  # one map per shard (the non-POSIX fallback)
    o, _ = tiny_pair
    loaded = orig.load(o, dtype=torch.bfloat16)
    idx = json.loads((o / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.mlp.down_proj.base_layer.weight"
    w = loaded.hf_model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and _in_map(w, (o / idx[key]).resolve())
    a = loaded.adapters["vision"].weights["model.layers.1.self_attn.qkv_proj"][0]
    akey = "model.layers.1.self_attn.qkv_proj.lora_A.vision.weight"
    assert a.dtype == torch.bfloat16 and _in_map(a, (o / idx[akey]).resolve())
    f32 = orig.load(o, dtype=torch.float32).hf_model.model.layers[0].mlp.down_proj.weight
    assert f32.dtype == torch.float32 and torch.equal(f32, w.float())
    if not per_file:  # a tensor the runtime drops gives its pages back
        shard = (o / idx[key]).resolve()
        ptr = w.data_ptr()
        loaded.hf_model.model.layers[0].mlp.down_proj.weight = None
        del w
        gc.collect()
        assert not any(lo <= ptr < hi for lo, hi in _mapped_ranges(shard))


def test_mmap_per_file_argument(tiny_pair, monkeypatch):
    """The shard reader's per-file switch is an argument; the environment variable is only its default."""
    o, _ = tiny_pair
    infos, _, _ = chk.list_tensors(o)
    monkeypatch.delenv("PHIMM_MMAP_PER_FILE", raising=False)
    assert orig.MappedShards(infos, per_file=True).per_file
    monkeypatch.setenv("PHIMM_MMAP_PER_FILE", "1")
    assert orig.MappedShards(infos).per_file
    if os.name == "posix":
        assert not orig.MappedShards(infos, per_file=False).per_file
    monkeypatch.delenv("PHIMM_MMAP_PER_FILE")
    a = orig.load(o, dtype=torch.bfloat16, mmap_per_file=True)
    b = orig.load(o, dtype=torch.bfloat16)
    sa, sb = a.hf_model.state_dict(), b.hf_model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_pipelines_match(tiny_pair):
    o, h = tiny_pair
    po = phimm.load(o, dtype="bfloat16", threads=1)
    ph = phimm.load(h, dtype="bfloat16", threads=1)
    prompt, images, audios, _ = _cases()["image+audio"]
    x = po(phimm.Request(prompt=prompt, images=images, audios=audios), max_new_tokens=2, output_logits=True)
    y = ph(phimm.Request(prompt=prompt.replace("_1", ""), images=images, audios=audios), max_new_tokens=2,
           output_logits=True)
    assert x.token_ids == y.token_ids and torch.equal(x.logits, y.logits)
    sd1, sd2 = po.model.hf.state_dict(), ph.model.hf.state_dict()
    assert set(sd1) == set(sd2)
    assert all(sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]) for k in sd1)


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto"])
def test_device_map_on_cpu(tiny_pair, pipes, device_map):
    o, _ = tiny_pair
    p = phimm.load(o, dtype="float32", threads=1, device_map=device_map)
    assert p.model.hf.hf_device_map == {"": "cpu"}
    prompt, images, audios, _ = _cases()["image+audio"]
    req = phimm.Request(prompt=prompt, images=images, audios=audios)
    a = p(req, max_new_tokens=2, output_logits=True)
    b = pipes[0](req, max_new_tokens=2, output_logits=True)
    assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)


def test_convert_original_to_hf_writes_the_same_files(tiny_pair, tmp_path):
    o, h = tiny_pair
    out = rc.convert_original_to_hf(o, tmp_path / "converted", shard_size=20_000_000)
    assert chk.check(out).ok
    for rel in ["vision-lora/adapter_model.safetensors", "speech-lora/adapter_model.safetensors"]:
        x, y = load_file(out / rel), load_file(h / rel)
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    ref_idx = json.loads((h / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(idx) == set(ref_idx)
    for key in ["model.embed_tokens_extend.image_embed.global_img_feature_extensor",
                "model.layers.1.mlp.down_proj.weight",
                "model.embed_tokens_extend.audio_embed.encoder.encoders.0.feed_forward_in.gate_up_proj.weight"]:
        with safe_open(out / idx[key], "pt") as f, safe_open(h / ref_idx[key], "pt") as g:
            assert torch.equal(f.get_tensor(key), g.get_tensor(key))


# ---- damaged checkpoints -----------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_shard(ckpt: Path, key: str, fn) -> None:
    """Rewrite the shard holding `key` with `fn(tensors)` applied."""
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    f = ckpt / idx[key]
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_pair, tmp_path):
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    key = "model.layers.1.mlp.down_proj.base_layer.weight"
    _rewrite_shard(bad, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.down_proj\.base_layer\.weight \[64, 128\]"):
        chk.check(bad)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.base_layer\.weight"):
        phimm.load(bad, dtype="float32")  # load runs the same check first


def test_wrong_shape_is_named(tiny_pair, tmp_path):
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    key = "model.embed_tokens_extend.image_embed.img_projection.0.weight"
    _rewrite_shard(bad, key, lambda t: t.__setitem__(key, torch.zeros(64, 16, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.embed_tokens_extend\.image_embed\.img_projection"
                                              r"\.0\.weight is \[64, 16\].*implies \[64, 32\]"):
        phimm.load(bad, dtype="float32")


def test_wrong_lora_rank_is_named(tiny_pair, tmp_path):
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_lora"]["r"] = 16  # the shards hold rank 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        chk.check(bad)
    msg = str(e.value)
    assert "wrong shape: model.layers.0.self_attn.qkv_proj.lora_A.vision.weight is [8, 64]" in msg
    assert "implies [16, 64]" in msg and "rank [8]" in msg and "r=16" in msg
    assert "speech" not in msg.split("hint")[0]  # only the vision LoRA is wrong


def test_lora_of_wrong_rank_in_shards_is_named(tiny_pair, tmp_path):
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    key = "model.layers.0.mlp.gate_up_proj.lora_A.speech.weight"
    _rewrite_shard(bad, key, lambda t: t.__setitem__(key, torch.zeros(4, 64, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"lora_A\.speech\.weight is \[4, 64\]"):
        phimm.load(bad, dtype="float32")


def test_truncated_shard_and_missing_shard(tiny_pair, tmp_path):
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated download"):
        phimm.load(bad, dtype="float32")
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: missing"):
        chk.check(bad)


def test_shards_of_the_other_layout_are_explained(tiny_pair, tmp_path):
    """Native shards under an original config.json: every tensor is named, with a hint."""
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    for f in bad.glob("model*.safetensors*"):
        f.unlink()
    for f in tiny_pair[1].glob("model*.safetensors*"):
        shutil.copy(f, bad / f.name)
    r = chk.check(bad, raise_on_error=False)
    assert not r.ok
    assert any(k == "model.embed_tokens_extend.image_embed.sub_img_feature_extensor" for k, *_ in r.unexpected)
    assert any(k == "model.embed_tokens_extend.image_embed.sub_GN" for k, _ in r.missing)
    assert any("transformers-native names" in h for h in r.hints)


def test_peft_folders_must_agree_with_the_shards(tiny_pair, tmp_path):
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    f = bad / "speech-lora" / "adapter_model.safetensors"
    t = load_file(f)
    first = sorted(t)[0]
    t[first] = t[first] + 1  # same shapes, other values
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="speech-lora.*values differ"):
        phimm.load(bad, dtype="float32")
    cfg_file = bad / "vision-lora" / "adapter_config.json"
    acfg = json.loads(cfg_file.read_text())
    acfg["r"] = 4
    cfg_file.write_text(json.dumps(acfg))
    with pytest.raises(CheckpointError, match="vision-lora/adapter_config.json: r=4"):
        chk.check(bad)


def test_pickle_only_checkpoint_is_refused(tiny_pair, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(tiny_pair[0] / "config.json", bad / "config.json")
    torch.save({"model.norm.weight": torch.ones(64)}, bad / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        phimm.load(bad, dtype="float32")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        chk.check(bad)


# ---- command lines -------------------------------------------------------------------------------------------------


def test_check_cli(tiny_pair, tmp_path, capsys):
    assert chk.main([str(tiny_pair[0])]) == 0
    out = capsys.readouterr().out
    assert "original layout, 195 tensors" in out and "OK" in out
    bad = _copy(tiny_pair[0], tmp_path / "bad")
    key = "model.norm.weight"
    _rewrite_shard(bad, key, lambda t: t.pop(key))
    assert chk.main([str(bad)]) == 1
    assert "missing: model.norm.weight [64]" in capsys.readouterr().out


def test_random_ckpt_cli_tiny(tmp_path, capsys):
    out = tmp_path / "cli"
    assert rc.main(["--layout", "hf", "--size", "tiny", "--out", str(out), "--seed", "1"]) == 0
    assert chk.check(out).ok
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 200064 and cfg["hidden_size"] == 64
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|endoftext10|>") == 200010 and tok.convert_tokens_to_ids("<|end|>") == 200020
