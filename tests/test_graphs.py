"""The static decode step behind CUDA graphs (`phimm.graphs`): run here without capture
(`PHIMM_CUDA_GRAPHS=static`), it must give the eager engine's tokens and logits on every route, under staggered
arrivals and mixed adapters, across storage reallocations; on a GPU (skipped without one) the captured graphs must
give the same as eager decoding."""

from __future__ import annotations

import time

import pytest
import torch

import phimm
from phimm import graphs
from phimm.engine import EngineLimits
from test_engine import _requests  # the same mixed requests (every route, two sizes of image and clip)


def _load(ckpt, monkeypatch, mode: str | None, **kw):
    if mode is None:
        monkeypatch.delenv("PHIMM_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("PHIMM_CUDA_GRAPHS", mode)
    pipe = phimm.load(ckpt, dtype="float32", threads=1, **kw)
    pipe.engine  # made now, under this setting
    return pipe


def test_static_step_equals_eager_under_staggered_load(tiny_ckpt, monkeypatch):
    eager = _load(tiny_ckpt, monkeypatch, "0")
    static = _load(tiny_ckpt, monkeypatch, "static")
    assert eager.engine._graphs is None
    assert isinstance(static.engine._graphs, graphs.GraphDecoder) and not static.engine._graphs.capture
    assert isinstance(static.engine._cache, graphs.StaticBatchCache)
    reqs = _requests()
    budgets = [3 + (i % 4) * 3 for i in range(len(reqs) * 2)]  # rows finish at different steps
    alone = [eager(reqs[i % len(reqs)], max_new_tokens=n, output_logits=True) for i, n in enumerate(budgets)]
    assert {str(o.route) for o in alone} == {"none", "vision", "speech", "vision+vision_speech"}
    futures = []
    for i, n in enumerate(budgets):  # staggered: rows join a batch already decoding, others leave it
        futures.append(static.submit(reqs[i % len(reqs)], max_new_tokens=n, output_logits=True))
        time.sleep(0.003 * (i % 3))
    for ref, fut in zip(alone, futures):
        got = fut.result(timeout=120)
        assert got.route == ref.route
        assert got.token_ids == ref.token_ids
        assert (got.logits - ref.logits).abs().max().item() < 1e-4
    stats = static.stats()
    assert stats["running"] == 0 and stats["kv_positions"] == 0
    eager.close()
    static.close()


def test_static_cache_grows_past_its_columns(tiny_ckpt, monkeypatch):
    """A row decoding past the storage's columns: the storage is reallocated (new version), the text goes on as
    eager decoding gives it."""
    eager = _load(tiny_ckpt, monkeypatch, "0")
    static = _load(tiny_ckpt, monkeypatch, "static", limits=EngineLimits(max_running=2, kv_budget_tokens=4096))
    req = phimm.Request(prompt="hello world what color")
    n = graphs.COLUMNS + 40  # the prompt plus these crosses one column bucket at least
    want = eager(req, max_new_tokens=n, min_new_tokens=n, output_logits=True)
    got = static(req, max_new_tokens=n, min_new_tokens=n, output_logits=True)
    assert got.token_ids == want.token_ids
    assert (got.logits - want.logits).abs().max().item() < 1e-4
    cache = static.engine._cache
    assert cache.version >= 2 and cache.storage_cols >= 2 * graphs.COLUMNS
    eager.close()
    static.close()


def test_static_storage_plan_respects_the_budget():
    cache = graphs.StaticBatchCache(num_layers=1, max_rows=16, budget_positions=16 * 512)
    cache.plan(rows=3, width=100)
    assert (cache.storage_rows, cache.storage_cols) == (16, 256)  # every row the engine may run, one bucket
    v = cache.version
    cache.plan(rows=1, width=10)  # a smaller batch keeps the storage (no reallocation, graphs stay valid)
    assert cache.version == v
    cache.plan(rows=2, width=3000)  # 16 rows of 3072 columns would pass the budget: fewer rows
    assert cache.storage_cols >= 3001 and cache.storage_rows < 16 and cache.storage_rows >= 2
    assert cache.storage_rows * cache.storage_cols <= max(16 * 512, 2 * 3072) * 2
    assert [graphs.row_bucket(n, 12) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]


def test_graphs_enabled_only_where_asked(monkeypatch):
    monkeypatch.delenv("PHIMM_CUDA_GRAPHS", raising=False)
    assert not graphs.enabled(torch.device("cpu"))
    assert graphs.enabled(torch.device("cuda"))
    monkeypatch.setenv("PHIMM_CUDA_GRAPHS", "0")
    assert not graphs.enabled(torch.device("cuda"))
    monkeypatch.setenv("PHIMM_CUDA_GRAPHS", "static")
    assert graphs.enabled(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; none here")
def test_captured_graphs_equal_eager_on_cuda(tiny_ckpt, monkeypatch):
    monkeypatch.delenv("PHIMM_CUDA_GRAPHS", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    graphed = phimm.load(tiny_ckpt, device="cuda", dtype="float32")
    eager = _load(tiny_ckpt, monkeypatch, "0", device="cuda")
    reqs = _requests()
    want = eager(reqs, max_new_tokens=8, min_new_tokens=8, output_logits=True)
    got = graphed(reqs, max_new_tokens=8, min_new_tokens=8, output_logits=True)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        assert (g.logits - w.logits).abs().max().item() < 1e-4
    stats = graphed.stats()
    assert stats["graph_captures"] >= 1 and stats["graph_replays"] >= 7 and "graph_capture_error" not in stats
    graphed.close()
    eager.close()


def test_graphs_only_for_plain_decoders(tiny_pipe):
    from types import SimpleNamespace

    assert graphs.supports(tiny_pipe.model)
    for cfg in (SimpleNamespace(model_type="gemma", sliding_window=None),
                SimpleNamespace(model_type="mistral", sliding_window=4096)):
        assert not graphs.supports(SimpleNamespace(config=cfg))
