"""LoRA adapters as data: per-row application, merge arithmetic, peft folders, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters import (AdapterDataError, LoraAdapter, LoraLinear, RowAdapters, load_peft_adapter, merged_weight,
                      save_peft_adapter, wrap_targets)


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True).to(dtype)
    lin = LoraLinear(base)
    adapters = [LoraAdapter("a", 4, 8.0, {"x": (torch.randn(4, 16), torch.randn(12, 4))}),
                LoraAdapter("b", 3, 3.0, {"x": (torch.randn(3, 16), torch.randn(12, 3))})]
    for i, ad in enumerate(adapters):
        a, b = ad.weights["x"]
        lin.set_adapter_weights(i, a, b, ad.scale)

    def rows(row_adapter):  # the per-forward argument for these two adapters
        return RowAdapters.for_rows(row_adapter, [ad.r for ad in adapters], [ad.scale for ad in adapters],
                                    dtype=dtype)

    return base, lin, rows, adapters


def test_each_row_gets_its_own_adapter():
    base, lin, rows, adapters = _setup()
    x = torch.randn(3, 5, 16)
    out = lin(x, rows([0, None, 1]))
    ref_base = base(x)
    for i, ad in ((0, adapters[0]), (2, adapters[1])):
        a, b = ad.weights["x"]
        want = ref_base[i] + (x[i] @ a.t() @ b.t()) * ad.scale
        assert torch.allclose(out[i], want, atol=1e-5)
    assert torch.equal(out[1], ref_base[1])  # no adapter: exactly the base output


def test_uniform_batch_matches_mixed_rows():
    _, lin, rows, _ = _setup()
    x = torch.randn(2, 4, 16)
    uniform = lin(x, rows([1, 1]))
    mixed = lin(x, rows([1, 0]))
    assert torch.allclose(uniform[0], mixed[0], atol=1e-6)
    assert not torch.allclose(uniform[1], mixed[1], atol=1e-3)  # B != 0: the adapters differ
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))  # no rows given: the base alone
    # the argument reaches layers through the forward's context, never through state left on the layer
    with rows([1, 0]).active():
        assert torch.equal(lin(x), mixed)
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_merge_arithmetic():
    _, lin, _, adapters = _setup()
    w = merged_weight(lin.weight, adapters[0], "x")
    a, b = adapters[0].weights["x"]
    assert torch.allclose(w, lin.weight + b @ a * 2.0, atol=1e-6)
    x = torch.randn(7, 16)
    assert torch.allclose(nn.functional.linear(x, w, lin.bias), lin(x, _setup()[2]([0] * 7)), atol=1e-5)


def test_bf16_adapters_stay_in_compute_dtype():
    _, lin, rows, _ = _setup(torch.bfloat16)
    assert lin.lora_a[0].dtype == torch.bfloat16
    assert lin(torch.randn(2, 3, 16, dtype=torch.bfloat16), rows([0, 1])).dtype == torch.bfloat16


def test_peft_folder_round_trip_and_peft_reads_it(tmp_path):
    from peft import LoraConfig, PeftModel

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 6, bias=False))
    torch.manual_seed(1)
    ad = LoraAdapter("v", 2, 4.0, {"proj": (torch.randn(2, 8), torch.randn(6, 2))}, target_modules=["proj"])
    save_peft_adapter(ad, tmp_path / "v")
    back = load_peft_adapter(tmp_path / "v", "v")
    assert back.r == 2 and back.alpha == 4.0 and torch.equal(back.weights["proj"][1], ad.weights["proj"][1])
    # peft itself reads the folder and computes the same delta
    x = torch.randn(3, 8)
    want = model.proj(x) + x @ ad.weights["proj"][0].t() @ ad.weights["proj"][1].t() * ad.scale
    cfg = LoraConfig.from_pretrained(str(tmp_path / "v"))
    cfg.task_type = None  # a bare module, not a causal LM
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "v"), config=cfg)
    assert torch.allclose(peft_model(x), want, atol=1e-5)


def test_validation_names_the_problem():
    model = nn.Module()
    model.proj = nn.Linear(8, 6)
    good = LoraAdapter("v", 2, 2.0, {"proj": (torch.randn(2, 8), torch.randn(6, 2))})
    good.validate({"proj": model.proj})
    wrong_rank = LoraAdapter("v", 3, 2.0, {"proj": (torch.randn(2, 8), torch.randn(6, 2))})
    with pytest.raises(AdapterDataError, match="rank 3"):
        wrong_rank.validate({"proj": model.proj})
    unknown = LoraAdapter("v", 2, 2.0, {"nope": (torch.randn(2, 8), torch.randn(6, 2))})
    with pytest.raises(AdapterDataError, match="not in the base model"):
        unknown.validate({"proj": model.proj})
    wrapped = wrap_targets(model, ["proj"])
    assert isinstance(model.proj, LoraLinear) and wrapped["proj"] is model.proj
    assert set(dict(model.state_dict())) == {"proj.weight", "proj.bias"}  # names unchanged


def test_peft_folder_errors(tmp_path):
    with pytest.raises(AdapterDataError, match="adapter_config.json"):
        load_peft_adapter(tmp_path, "x")
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterDataError, match="safetensors"):
        load_peft_adapter(tmp_path, "x")


def _per_row_reference(base, adapters, x, row_adapter):
    """Each row alone: the base output plus its own adapter's delta, in fp32."""
    out = base(x).clone()
    for i, a in enumerate(row_adapter):
        if a is not None:
            A, B = adapters[a].weights["x"]
            out[i] += (x[i] @ A.t() @ B.t()) * adapters[a].scale
    return out


@torch.inference_mode()  # as the runtime's forwards run
def test_long_runs_of_one_adapter_get_their_own_part(monkeypatch):
    """A mixed step's rows (one per token): runs of at least RUN_MIN_TOKENS tokens on one adapter are applied
    alone, the short runs between them masked together; the result is each row's own adapter either way."""
    from adapters import lora

    base, lin, rows, adapters = _setup()
    row_adapter = [0, 1, None, 1] + [0] * 70 + [1] * 5 + [None] * 80 + [1] * 100 + [0, None]
    r = rows(row_adapter)
    parts = r.parts(1)
    assert [(s, e) for s, e, _ in parts] == [(0, 4), (4, 74), (74, 79), (79, 159), (159, 259), (259, 261)]
    assert [p.uniform for _, _, p in parts] == [None, 0, None, None, 1, None]
    assert [p.rank_mask is not None for _, _, p in parts] == [True, False, True, False, False, True]
    assert parts[3][2].is_base
    x = torch.randn(len(row_adapter), 1, 16)
    calls = []
    real = LoraLinear._add_delta
    monkeypatch.setattr(LoraLinear, "_add_delta", lambda self, xx, *a, **k: calls.append(xx.shape[0])
                        or real(self, xx, *a, **k))
    got = lin(x, r)
    assert calls == [4, 70, 5, 100, 2]  # the base-only run adds nothing
    want = _per_row_reference(base, adapters, x, row_adapter)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    monkeypatch.setattr(lora, "RUN_MIN_TOKENS", 10 ** 9)  # no parts: every row masked in one pass
    assert r.parts(1) is None
    torch.testing.assert_close(lin(x, r), got, rtol=1e-6, atol=1e-4)


@torch.inference_mode()
def test_prefill_rows_of_different_adapters_each_get_their_own_part():
    """A prefill bucket `[rows, T, in]`: a row of T >= RUN_MIN_TOKENS tokens is a run of its own."""
    base, lin, rows, adapters = _setup()
    x = torch.randn(3, 80, 16)
    r = rows([0, None, 1])
    assert [(s, e, p.uniform) for s, e, p in r.parts(80)] == [(0, 1, 0), (1, 2, None), (2, 3, 1)]
    torch.testing.assert_close(lin(x, r), _per_row_reference(base, adapters, x, [0, None, 1]), rtol=1e-6, atol=1e-4)
    assert rows([0, None, 1]).parts(5) is None  # short rows: masked together
