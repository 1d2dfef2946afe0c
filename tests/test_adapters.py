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
