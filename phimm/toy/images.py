"""Images of the toy domain: random scenes that honour the spec, and their rendering with PIL."""

from __future__ import annotations

import colorsys
import functools
import math
import random

from PIL import Image, ImageDraw

from .domain import COLOR_NAMES, COLORS, SHAPES, WHITE, Scene, Shape

IMAGE_SIDE_RANGE = (96, 256)  # spec: 96x96 to 256x256
# spec: each bounding box is 15% to 45% of the side; drawn slightly inside so anti-aliased edges stay in range
BBOX_FRACTION_RANGE = (0.16, 0.44)
STAR_INNER_RATIO = math.sin(math.radians(18)) / math.sin(math.radians(54))  # regular five-pointed star

# Vertex angles (degrees, counter-clockwise from +x) and radii of each polygon at rotation 0, circumradius 1.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(45 + 90 * i, 1.0) for i in range(4)],
    "triangle": [(90 + 120 * i, 1.0) for i in range(3)],
    "star": [(90 + 36 * i, 1.0 if i % 2 == 0 else STAR_INNER_RATIO) for i in range(10)],
}


@functools.lru_cache(maxsize=4096)  # a scene asks for the same shapes' outlines and extents many times
def _unit_outline(kind: str, rotation: float) -> tuple[tuple[float, float], ...]:
    """Vertices in image axes (y down) around (0, 0), circumradius 1."""
    return tuple((r * math.cos(math.radians(a + rotation)), -r * math.sin(math.radians(a + rotation)))
                 for a, r in _POLYGONS[kind])


@functools.lru_cache(maxsize=4096)
def _unit_extent(kind: str, rotation: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the shape with circumradius 1 around (0, 0)."""
    if kind == "circle":
        return (-1.0, -1.0, 1.0, 1.0)
    pts = _unit_outline(kind, rotation)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _radius(shape: Shape) -> float:
    """Circumradius that makes the larger side of the bounding box `shape.size`."""
    x0, y0, x1, y1 = _unit_extent(shape.kind, shape.rotation)
    return shape.size / max(x1 - x0, y1 - y0)


def shape_outline(shape: Shape) -> list[tuple[float, float]] | None:
    """Polygon vertices in pixels (None for a circle)."""
    if shape.kind == "circle":
        return None
    r = _radius(shape)
    cx, cy = shape.center
    return [(cx + r * x, cy + r * y) for x, y in _unit_outline(shape.kind, shape.rotation)]


def shape_bbox(shape: Shape) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in pixels."""
    r = _radius(shape)
    x0, y0, x1, y1 = _unit_extent(shape.kind, shape.rotation)
    cx, cy = shape.center
    return (cx + r * x0, cy + r * y0, cx + r * x1, cy + r * y1)


def shapes_apart(a: Shape, b: Shape, gap: float) -> bool:
    """True when `a` and `b` are at least `gap` pixels apart by their bounding boxes or bounding circles."""
    ax0, ay0, ax1, ay1 = shape_bbox(a)
    bx0, by0, bx1, by1 = shape_bbox(b)
    if ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0:
        return True
    dist = math.dist(a.center, b.center)
    return dist >= _radius(a) + _radius(b) + gap


def light_background(rng: random.Random) -> tuple[int, int, int]:
    """A light solid colour, visibly off white (so white shapes show) and far from every shape colour."""
    if rng.random() < 0.15:  # light grey
        v = rng.randint(195, 228)
        return (v, v, v)
    h, s, v = rng.random(), rng.uniform(0.10, 0.30), rng.uniform(0.86, 0.98)
    rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))
    if min(rgb) > 228:  # too close to white: darken the weakest channel
        rgb = tuple(c - 25 if c == min(rgb) else c for c in rgb)
    return rgb  # type: ignore[return-value]


def random_scene(rng: random.Random, size: int | None = None, n_shapes: int | None = None,
                 white_background: bool | None = None, rotate: bool | None = None,
                 white_shape: float = 0.45) -> Scene:
    """A random scene: side `size` (96..256 if None), `n_shapes` (1..3) non-overlapping shapes of distinct
    colours, each bounding box 16%..44% of the side, white shapes only on a non-white background (there, one of
    the shapes is white with probability `white_shape`).

    `rotate`: None rotates each square/triangle/star with probability 1/2, True always, False never."""
    side = size if size is not None else rng.randint(*IMAGE_SIDE_RANGE)
    n = n_shapes if n_shapes is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError(f"n_shapes must be 1..3, got {n}")
    white_bg = white_background if white_background is not None else rng.random() < 0.5
    background = WHITE if white_bg else light_background(rng)
    palette = [c for c in COLOR_NAMES if c != "white"]
    antialias = rng.choice((1, 2, 3, 4, 4))
    gap = max(2.0, 0.02 * side)
    lo, hi = BBOX_FRACTION_RANGE[0] * side, BBOX_FRACTION_RANGE[1] * side
    border = 1.0

    for _ in range(200):  # whole-scene retries; a failed placement restarts with fresh draws
        colors = rng.sample(palette, n)
        # white only on coloured backgrounds; there, often enough that it is as common overall as other colours
        if not white_bg and rng.random() < white_shape:
            colors[rng.randrange(n)] = "white"
        placed: list[Shape] = []
        for color in colors:
            kind = rng.choice(SHAPES)
            for _ in range(60):
                spin = rotate if rotate is not None else rng.random() < 0.5
                rotation = rng.uniform(0.0, 360.0) if (spin and kind != "circle") else 0.0
                x0, y0, x1, y1 = _unit_extent(kind, rotation)
                w, h = x1 - x0, y1 - y0
                # both sides of the box in range: the smaller side w or h must reach `lo` too
                s = rng.uniform(lo * max(w, h) / min(w, h), hi)
                r = s / max(w, h)
                cx = rng.uniform(border - r * x0, side - border - r * x1)
                cy = rng.uniform(border - r * y0, side - border - r * y1)
                cand = Shape(kind, color, (cx, cy), s, rotation)
                if all(shapes_apart(cand, p, gap) for p in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == n:
            return Scene(side, side, background, tuple(placed), antialias)
    raise RuntimeError(f"could not place {n} shapes on a {side}px canvas")  # not reached in practice


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image, drawn at `scene.antialias` times the size and box-filtered down (interior
    pixels keep their exact colour)."""
    k = max(1, int(scene.antialias))
    img = Image.new("RGB", (scene.width * k, scene.height * k), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            cx, cy = shape.center
            r = shape.size / 2
            draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k - 1, (cy + r) * k - 1], fill=fill)
        else:
            draw.polygon([(x * k, y * k) for x, y in shape_outline(shape)], fill=fill)
    return img.reduce(k) if k > 1 else img


def scene_problems(scene: Scene, fraction_range: tuple[float, float] = (0.15, 0.45)) -> list[str]:
    """Where `scene` breaks the spec (empty list when it honours it): size, shape count, distinct colours,
    bounding boxes inside the image and within `fraction_range` of the side, no overlap, white on white."""
    problems = []
    side = min(scene.width, scene.height)
    if not (IMAGE_SIDE_RANGE[0] <= scene.width <= IMAGE_SIDE_RANGE[1]
            and IMAGE_SIDE_RANGE[0] <= scene.height <= IMAGE_SIDE_RANGE[1]):
        problems.append(f"image size {scene.width}x{scene.height} outside {IMAGE_SIDE_RANGE}")
    if not 1 <= len(scene.shapes) <= 3:
        problems.append(f"{len(scene.shapes)} shapes, expected 1..3")
    if len(set(scene.colors)) != len(scene.colors):
        problems.append(f"repeated colours {scene.colors}")
    if tuple(scene.background) == WHITE and "white" in scene.colors:
        problems.append("white shape on a white background")
    lo, hi = fraction_range[0] * side, fraction_range[1] * side
    for s in scene.shapes:
        x0, y0, x1, y1 = shape_bbox(s)
        if not (lo <= x1 - x0 <= hi and lo <= y1 - y0 <= hi):
            problems.append(f"{s.color} {s.kind} box {x1 - x0:.1f}x{y1 - y0:.1f} outside {lo:.1f}..{hi:.1f}")
        if x0 < 0 or y0 < 0 or x1 > scene.width or y1 > scene.height:
            problems.append(f"{s.color} {s.kind} leaves the image")
    for i, a in enumerate(scene.shapes):
        for b in scene.shapes[i + 1:]:
            if not shapes_apart(a, b, 1.0):
                problems.append(f"{a.color} {a.kind} and {b.color} {b.kind} overlap")
    return problems
