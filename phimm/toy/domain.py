"""The toy domain's words, scenes and questions (see the toy-domain spec). Pure Python, no media.

Every generator takes a `random.Random`, so its output is a function of the generator's seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 170),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star")
GLUE = ("a", "and", "the", "is", "there", "what", "color", "shape", "how", "many", "shapes", "are", "one", "yes",
        "no")
VOCAB = tuple(sorted(set(NUMBERS) | set(COLOR_NAMES) | set(SHAPES) | set(GLUE)))
WHITE = COLORS["white"]
COUNT_WORDS = ("zero", "one", "two", "three")  # index = number of shapes

# The text that follows the media in a user turn (spec: "User turn").
ASR_INSTRUCTION = "Transcribe the audio clip into text."
SPOKEN_VQA_INSTRUCTION = "Answer the spoken question about the image."

# Question templates, keyed by the name written to manifests as "question_type".
TEMPLATES: dict[str, str] = {
    "what_color": "what color is the {shape}",
    "what_shape": "what shape is the {color} one",
    "how_many": "how many shapes are there",
    "is_there": "is there a {color} {shape}",
}
QUESTION_TYPES = tuple(TEMPLATES)

MAX_UTTERANCE_WORDS = 8


@dataclass(frozen=True)
class Shape:
    """One filled shape. `center` is the shape's own centre (its rotation centre; for a triangle or star not the
    centre of its bounding box), `size` the larger side of its axis-aligned bounding box, both in pixels;
    `rotation` in degrees, counter-clockwise (0 for circles)."""

    kind: str
    color: str
    center: tuple[float, float]
    size: float
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SHAPES:
            raise ValueError(f"unknown shape {self.kind!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")


@dataclass(frozen=True)
class Scene:
    """An image's content: a `width` x `height` canvas of one `background` RGB colour and its shapes.
    `antialias` is the supersampling factor used when rendering (1 = hard edges)."""

    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    antialias: int = 4

    @property
    def colors(self) -> list[str]:
        return [s.color for s in self.shapes]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.shapes]

    def has(self, color: str, kind: str) -> bool:
        return any(s.color == color and s.kind == kind for s in self.shapes)

    def describe(self) -> str:
        """The scene in domain words: "a red circle and a blue star"."""
        return shape_phrase_of(self.shapes)


@dataclass(frozen=True)
class Question:
    """A question about a scene, its one-word answer and the template it came from."""

    text: str
    answer: str
    qtype: str


# ---------------------------------------------------------------- utterances


def digit_string(rng: random.Random, n_words: int | None = None) -> str:
    """1 to 8 number words: "four seven one nine"."""
    n = n_words if n_words is not None else rng.randint(1, MAX_UTTERANCE_WORDS)
    return " ".join(rng.choice(NUMBERS) for _ in range(n))


def shape_phrase_of(shapes) -> str:
    return " and ".join(f"a {s.color} {s.kind}" for s in shapes)


def shape_phrase(rng: random.Random, n_items: int | None = None) -> str:
    """"a red circle" or "a red circle and a blue star" (distinct colours, at most 8 words)."""
    n = n_items if n_items is not None else rng.randint(1, 2)
    colors = rng.sample(COLOR_NAMES, n)
    return " and ".join(f"a {c} {rng.choice(SHAPES)}" for c in colors)


def random_question_text(rng: random.Random, qtype: str | None = None) -> str:
    """A question of the templates with random slots, not tied to a scene (for speech)."""
    qtype = qtype or rng.choice(QUESTION_TYPES)
    return TEMPLATES[qtype].format(shape=rng.choice(SHAPES), color=rng.choice(COLOR_NAMES))


def utterance(rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """A transcript for speech: (text, kind) with kind one of "digits", "shapes", "question"."""
    kind = kind or rng.choice(("digits", "shapes", "question"))
    if kind == "digits":
        return digit_string(rng), kind
    if kind == "shapes":
        return shape_phrase(rng), kind
    if kind == "question":
        return random_question_text(rng), kind
    raise ValueError(f"unknown utterance kind {kind!r}; expected digits, shapes or question")


# ---------------------------------------------------------------- questions about scenes


def available_question_types(scene: Scene) -> list[str]:
    """The templates that can be asked about `scene` ("what_color" needs a shape kind that occurs once)."""
    types = list(QUESTION_TYPES)
    if not scene.shapes:
        return ["how_many", "is_there"]
    if not any(scene.kinds.count(k) == 1 for k in scene.kinds):
        types.remove("what_color")
    return types


def question_for_scene(rng: random.Random, scene: Scene, qtype: str | None = None,
                       answer: str | None = None, near: float = 0.5) -> Question:
    """A question about `scene` of template `qtype` (random among those available if None).

    For "is_there", `answer` may force "yes" or "no"; otherwise each is drawn with probability 1/2. A "no" asks
    about a colour or a shape of the scene with probability `near` (when the scene allows it), so the answer
    needs colour and shape bound together.
    """
    available = available_question_types(scene)
    qtype = qtype or rng.choice(available)
    if qtype not in available:
        raise ValueError(f"question type {qtype!r} cannot be asked about this scene (available: {available})")
    if qtype == "what_color":
        kind = rng.choice([k for k in SHAPES if scene.kinds.count(k) == 1])
        color = next(s.color for s in scene.shapes if s.kind == kind)
        return Question(TEMPLATES[qtype].format(shape=kind), color, qtype)
    if qtype == "what_shape":
        shape = rng.choice(scene.shapes)
        return Question(TEMPLATES[qtype].format(color=shape.color), shape.kind, qtype)
    if qtype == "how_many":
        return Question(TEMPLATES[qtype], COUNT_WORDS[len(scene.shapes)], qtype)
    if qtype == "is_there":
        want = answer or rng.choice(("yes", "no"))
        if want == "yes" and scene.shapes:
            s = rng.choice(scene.shapes)
            color, kind = s.color, s.kind
        else:
            absent = [(c, k) for c in COLOR_NAMES for k in SHAPES if not scene.has(c, k)]
            close = [(c, k) for c, k in absent if c in scene.colors or k in scene.kinds]
            color, kind = rng.choice(close if close and rng.random() < near else absent)
        return Question(TEMPLATES[qtype].format(color=color, shape=kind), "yes" if scene.has(color, kind) else "no",
                        qtype)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def answer_question(scene: Scene, text: str) -> str:
    """The answer to a template question about `scene`, found independently of `question_for_scene`."""
    words = text.split()
    if text == TEMPLATES["how_many"]:
        return COUNT_WORDS[len(scene.shapes)]
    if words[:4] == ["what", "color", "is", "the"] and len(words) == 5:
        matches = [s.color for s in scene.shapes if s.kind == words[4]]
        if len(matches) != 1:
            raise ValueError(f"{text!r} has no single answer for this scene")
        return matches[0]
    if words[:4] == ["what", "shape", "is", "the"] and words[-1] == "one" and len(words) == 6:
        matches = [s.kind for s in scene.shapes if s.color == words[4]]
        if len(matches) != 1:
            raise ValueError(f"{text!r} has no single answer for this scene")
        return matches[0]
    if words[:3] == ["is", "there", "a"] and len(words) == 5:
        return "yes" if scene.has(words[3], words[4]) else "no"
    raise ValueError(f"{text!r} is not a toy-domain question")


# ---------------------------------------------------------------- text only (teaches the LM to read context)


def _scene_facts(rng: random.Random, shapes) -> str:
    """The shapes as short sentences, in random order: "the star is red . the red one is a circle"."""
    facts = []
    for s in shapes:
        facts.append(rng.choice((f"the {s.kind} is {s.color}", f"the {s.color} one is a {s.kind}",
                                 f"there is a {s.color} {s.kind}")))
    rng.shuffle(facts)
    return " . ".join(facts)


def _random_shapes(rng: random.Random, n: int) -> list[Shape]:
    colors = rng.sample(COLOR_NAMES, n)
    return [Shape(rng.choice(SHAPES), c, (0.0, 0.0), 1.0) for c in colors]


TEXT_TASKS = ("copy", "lookup", "describe")


def text_example(rng: random.Random, task: str | None = None) -> tuple[str, str, str]:
    """A text-only (prompt, answer, task) pair.

    - "copy": "repeat: four seven one =" -> "four seven one"
    - "lookup": "the star is red . what color is the star ?" -> "red" (any of the four templates, asked about
      the shapes the prompt lists)
    - "describe": "the star is red . the circle is blue . say all shapes :" -> "a red star and a blue circle"
    """
    task = task or rng.choice(TEXT_TASKS)
    if task == "copy":
        text, _ = utterance(rng)
        return f"repeat: {text} =", text, task
    if task == "lookup":
        shapes = _random_shapes(rng, rng.randint(1, 3))
        scene = Scene(1, 1, WHITE, tuple(shapes))
        q = question_for_scene(rng, scene, rng.choice(available_question_types(scene)))
        return f"{_scene_facts(rng, shapes)} . {q.text} ?", q.answer, task
    if task == "describe":
        shapes = _random_shapes(rng, rng.randint(1, 2))
        facts = " . ".join(f"the {s.kind} is {s.color}" for s in shapes)
        return f"{facts} . say all shapes :", shape_phrase_of(shapes), task
    raise ValueError(f"unknown text task {task!r}; expected one of {TEXT_TASKS}")


def corpus(rng: random.Random, n: int) -> list[str]:
    """`n` lines of domain text (utterances, questions, text-task prompts with answers, instructions), e.g. to
    train a tokenizer or pretrain the base LM."""
    lines = [ASR_INSTRUCTION, SPOKEN_VQA_INSTRUCTION, " ".join(VOCAB)]
    while len(lines) < n:
        r = rng.random()
        if r < 0.5:
            prompt, answer, _ = text_example(rng)
            lines.append(f"{prompt} {answer}")
        else:
            lines.append(utterance(rng)[0])
    return lines[:n]
