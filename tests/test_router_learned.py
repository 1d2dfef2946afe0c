"""The learned router (`routers.LearnedRouter`, `phimm train-router`): a classifier over the frozen base model's
pooled prompt embedding, picking among any number of adapters (or none); trained, saved with the model, loaded
back, and measured on held-out toy-domain examples."""

from __future__ import annotations

import json

import pytest
import torch

import phimm
from conftest import make_image
from phimm.router_training import accuracy, embed_examples
from routers import AudioProjector, LearnedRouter, Route, RouteInput


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=g) * 3
    labels = [None, "a", "b"]
    x = torch.cat([centres[k] + torch.randn(n, 16, generator=g) for k in range(3)])
    return x, [labels[k] for k in range(3) for _ in range(n)]


def test_fit_save_load_predict(tmp_path):
    x, y = _blobs(40, 0)
    router = LearnedRouter.fit(x, y)
    assert router.labels == [None, "a", "b"]
    hx, hy = _blobs(20, 0)  # the same centres, fresh points
    assert accuracy(router, hx, hy)["accuracy"] >= 0.95
    router.save(tmp_path / "r")
    back = LearnedRouter.load(tmp_path / "r")
    assert back.predict(hx) == router.predict(hx)
    inp = RouteInput(num_audios=1, features=hx[0])
    assert back(inp) == Route(adapter=router.predict(hx[:1])[0], audio_projector=AudioProjector.SPEECH)
    assert back(RouteInput(forced="b", features=hx[0])).adapter == "b"  # a forced adapter wins
    with pytest.raises(ValueError, match="pooled embedding"):
        back(RouteInput())
    with pytest.raises(ValueError, match="do not fit"):
        LearnedRouter(["a"], torch.zeros(2, 4), torch.zeros(1), torch.zeros(4), torch.ones(4))


def _examples():
    digits = ["zero one two", "three four five six", "seven eight nine", "one one two", "five five five nine",
              "two four six eight", "nine eight", "six seven zero one"]
    colours = ["the red square and the blue star", "what color is the circle", "is there a green triangle",
               "the yellow star is here", "how many shapes are there", "a purple circle and a white square",
               "what shape is the orange one", "the black star and the red circle"]
    ex = [(phimm.Request(prompt=p), "speech") for p in digits]
    ex += [(phimm.Request(prompt=p), None) for p in colours]
    ex += [(phimm.Request(prompt="<|image|>what color", images=[make_image(i)]), "vision") for i in range(6)]
    return ex


def test_pipeline_routes_by_content_and_saves_the_router(tiny_ckpt, tmp_path):
    pipe = phimm.load(tiny_ckpt, threads=1)
    ex = _examples()
    feats, per = embed_examples(pipe, ex)
    assert feats.shape == (len(ex), pipe.model.config.hidden_size) and per > 0
    router = LearnedRouter.fit(feats, [y for _, y in ex])
    assert accuracy(router, feats, [y for _, y in ex])["accuracy"] == 1.0
    routed = phimm.load(tiny_ckpt, threads=1, router=router)
    outs = routed([r for r, _ in ex], max_new_tokens=3)
    assert [o.route.adapter for o in outs] == router.predict(feats)
    # a request routed by content decodes as the same request forced onto that adapter
    r0 = ex[0][0]
    forced = routed(phimm.Request(prompt=r0.prompt, adapter=outs[0].route.adapter), max_new_tokens=5)
    assert routed(r0, max_new_tokens=5).token_ids == forced.token_ids
    routed.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "phimm.json").read_text())
    assert meta["router"] == "router"
    back = phimm.load(tmp_path / "saved", threads=1)
    assert isinstance(back.router, LearnedRouter)
    assert [o.route.adapter for o in back([r for r, _ in ex], max_new_tokens=2)] == router.predict(feats)
    for p in (pipe, routed, back):
        p.close()


def test_train_router_on_the_toy_domain(tmp_path):
    """`phimm train-router --toy`: two speech adapters for two kinds of utterance, vision, none; measured on the
    held-out split (other voices)."""
    from phimm.cli import main

    assert main(["train-router", "--toy", str(tmp_path / "toy"), "--toy-n", "80", "--out", str(tmp_path / "r"),
                 "--threads", "1", "--cost-tokens", "2"]) == 0
    scores = json.loads((tmp_path / "r" / "scores.json").read_text())
    assert set(scores["labels"]) == {None, "vision", "speech", "speech-digits"}
    assert scores["train"]["accuracy"] == 1.0
    assert scores["heldout"]["examples"] == 40 and scores["heldout"]["accuracy"] >= 0.9
    assert scores["embedding_s_per_request"] > 0 and scores["routing_overhead"] > 0
    assert LearnedRouter.load(tmp_path / "r").labels == scores["labels"]
