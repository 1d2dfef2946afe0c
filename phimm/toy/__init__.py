"""The synthetic toy domain of phimm's embedded model (see the toy-domain spec): its words, scenes,
questions, images and speech, and the splits made from them.

- `phimm.toy.domain`: vocabulary, `Scene` / `Shape`, utterance, question and text-task generators
- `phimm.toy.images`: `random_scene`, `render_scene`
- `phimm.toy.scenes`: `random_layout_scene`, `widen` (scenes on non-square canvases, as the training recipe draws them)
- `phimm.toy.speech`: `Speaker` (eSpeak NG through ctypes), `add_noise`, `variant_names`
- `phimm.toy.data`: `make_split` and its CLI, `python -m phimm.toy.data`
- `phimm.toy.examples`: remakes the web demo's example files, `python -m phimm.toy.examples`
"""

from .domain import COLORS, NUMBERS, QUESTION_TYPES, SHAPES, VOCAB, Question, Scene, Shape
from .images import random_scene, render_scene

__all__ = ["COLORS", "NUMBERS", "QUESTION_TYPES", "SHAPES", "VOCAB", "Question", "Scene", "Shape", "random_scene",
           "render_scene"]
