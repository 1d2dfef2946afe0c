"""Scenes of the toy domain on canvases of any shape, as phimm's training recipe draws them: square or widened /
heightened, and (on request) the faint case, a white shape on a light background."""

from __future__ import annotations

import random

from . import domain
from .images import random_scene


def random_layout_scene(rng: random.Random, faint: float = 0.0, n_shapes: int | None = None) -> domain.Scene:
    """A toy-domain scene, square half of the time, else on a canvas widened or heightened (still 96..256); with
    probability `faint` one with a white shape on a light background (the hardest shapes to see); `n_shapes`:
    1..3 (None: drawn uniformly)."""
    side = rng.randint(96, 256)
    if faint and rng.random() < faint:
        scene = random_scene(rng, size=side, n_shapes=n_shapes, white_background=False, white_shape=1.0)
    else:
        scene = random_scene(rng, size=side, n_shapes=n_shapes)
    return scene if rng.random() < 0.5 else widen(rng, scene)


def widen(rng: random.Random, scene: domain.Scene) -> domain.Scene:
    """The scene on a wider or taller canvas (shapes shifted), still 96..256 px a side."""
    side = scene.width
    if side >= 248:
        return scene
    other = rng.randint(side + 8, 256)
    d = rng.uniform(0, other - side)
    if rng.random() < 0.5:
        shapes = tuple(domain.Shape(s.kind, s.color, (s.center[0] + d, s.center[1]), s.size, s.rotation)
                       for s in scene.shapes)
        return domain.Scene(other, side, scene.background, shapes, scene.antialias)
    shapes = tuple(domain.Shape(s.kind, s.color, (s.center[0], s.center[1] + d), s.size, s.rotation)
                   for s in scene.shapes)
    return domain.Scene(side, other, scene.background, shapes, scene.antialias)
