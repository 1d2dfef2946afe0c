"""Routing: the reference table, forced routes, custom routers, unknown adapters."""

from __future__ import annotations

import pytest

import phimm
from conftest import make_image
from phimm.errors import PhimmError, RouteError, UnknownAdapterError
from routers import AudioProjector, FixedRouter, ModalityRouter, Route, RouteInput


@pytest.mark.parametrize(
    "images,audios,adapter,projector",
    [
        (0, 0, None, None),
        (1, 0, "vision", None),
        (0, 1, "speech", AudioProjector.SPEECH),
        (1, 1, "vision", AudioProjector.VISION_SPEECH),
        (2, 3, "vision", AudioProjector.VISION_SPEECH),
    ],
)
def test_reference_table(images, audios, adapter, projector):
    route = ModalityRouter()(RouteInput(num_images=images, num_audios=audios))
    assert route == Route(adapter, projector)


def test_forced_adapter_keeps_projector_rule():
    route = ModalityRouter()(RouteInput(num_audios=1, forced="vision"))
    assert route == Route("vision", AudioProjector.SPEECH)
    assert ModalityRouter()(RouteInput(num_images=1, forced=Route(None))) == Route(None)


def test_pipeline_forced_route(tiny_pipe, image):
    out = tiny_pipe(phimm.Request(prompt="hello", adapter="speech"), max_new_tokens=2)
    assert out.route.adapter == "speech"
    out = tiny_pipe(phimm.Request(prompt="<|image|>hello", images=[image], adapter=phimm.Route(None)), max_new_tokens=2)
    assert out.route.adapter is None


def test_custom_router_callable_and_class(tiny_ckpt):
    seen = []

    def always_speech(inp: RouteInput) -> Route:
        seen.append(inp)
        return Route("speech", AudioProjector.SPEECH if inp.has_audio else None)

    pipe = phimm.load(tiny_ckpt, router=always_speech)
    out = pipe("hello", max_new_tokens=1)
    assert out.route.adapter == "speech" and seen and seen[0].num_images == 0

    class VisionEverywhere(FixedRouter):
        def __init__(self):
            super().__init__("vision")

    pipe = phimm.load(tiny_ckpt, router=VisionEverywhere)
    assert pipe("hello", max_new_tokens=1).route.adapter == "vision"


def test_unknown_adapter_fails_before_compute(tiny_pipe):
    with pytest.raises(UnknownAdapterError) as e:
        tiny_pipe(phimm.Request(prompt="hi", adapter="klingon"))
    assert "klingon" in str(e.value) and "vision" in str(e.value) and "speech" in str(e.value)
    outs = tiny_pipe([phimm.Request(prompt="hi", adapter="klingon"), "hello"], max_new_tokens=2)
    assert isinstance(outs[0].error, UnknownAdapterError) and outs[0].text == ""
    assert outs[1].error is None and len(outs[1].token_ids) == 2


def test_router_returning_garbage_is_a_route_error(tiny_ckpt):
    pipe = phimm.load(tiny_ckpt, router=lambda inp: "vision")
    with pytest.raises(RouteError):
        pipe("hello", max_new_tokens=1)


def test_audio_route_without_projector_is_refused(tiny_ckpt, audio):
    pipe = phimm.load(tiny_ckpt, router=lambda inp: Route("speech", None))
    with pytest.raises(PhimmError, match="projector"):
        pipe(phimm.Request(prompt="x", audios=[audio]), max_new_tokens=1)


def test_load_subset_of_adapters(tiny_ckpt):
    pipe = phimm.load(tiny_ckpt, adapters=["speech"])
    assert pipe.adapters == ["speech"]
    with pytest.raises(UnknownAdapterError, match="vision"):
        pipe(phimm.Request(prompt="x", images=[make_image(0)]), max_new_tokens=1)
    with pytest.raises(UnknownAdapterError):
        phimm.load(tiny_ckpt, adapters=["nope"])
