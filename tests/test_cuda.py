"""phimm on a CUDA device, against the same checkpoint on the CPU: both layouts load straight onto the device,
every route gives the CPU's tokens. Skipped where no GPU is present (this project's CI has none; the GPU check
`benchmarks/gpu_check.py` covers the same ground when a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

import phimm
from conftest import make_audio, make_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here")


def _requests():
    return [
        phimm.Request(prompt="hello world what color"),
        phimm.Request(prompt="<|image|>what color is the circle", images=[make_image(0)]),
        phimm.Request(prompt="<|audio|>transcribe the audio clip", audios=[make_audio(0)]),
        phimm.Request(prompt="<|image|><|audio|>answer", images=[make_image(1)], audios=[make_audio(1)]),
    ]


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory):
    from phimm.formats import random_ckpt as rc

    cfg, shapes = rc.shrink()
    return rc.write_random_checkpoint(tmp_path_factory.mktemp("orig") / "ckpt", shapes, layout="original",
                                      config=cfg, seed=3, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["native", "original"])
def test_cuda_matches_cpu(layout, tiny_ckpt, original_ckpt):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ckpt = tiny_ckpt if layout == "native" else original_ckpt
    cpu = phimm.load(ckpt, dtype="float32")
    gpu = phimm.load(ckpt, device="cuda", dtype="float32")
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    want = cpu(_requests(), max_new_tokens=6, min_new_tokens=6, output_logits=True)
    got = gpu(_requests(), max_new_tokens=6, min_new_tokens=6, output_logits=True)
    for w, g in zip(want, got):
        assert g.route == w.route and g.token_ids == w.token_ids
        assert (g.logits.cpu() - w.logits).abs().max().item() < 1e-4
    cpu.close()
    gpu.close()
