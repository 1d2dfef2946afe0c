"""Remake the web demo's example files (demo/examples/): fixed scenes as PNG, speech as 16 kHz WAV, and
examples.json listing each example as {"text", "image", "audio", "expected"}.

    python -m phimm.toy.examples [--out demo/examples]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .domain import ASR_INSTRUCTION, SPOKEN_VQA_INSTRUCTION, Scene, Shape, WHITE
from .images import render_scene
from .speech import Speaker, resample

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "demo" / "examples"
SAMPLE_RATE = 16000
MAX_BYTES = 60_000  # each example file stays small enough for the repo and the demo page

SCENES: dict[str, Scene] = {
    "red_circle_blue_star.png": Scene(192, 192, WHITE, (
        Shape("circle", "red", (56.0, 60.0), 60.0),
        Shape("star", "blue", (132.0, 128.0), 70.0),
    )),
    "green_square_yellow_triangle_purple_star.png": Scene(192, 192, (225, 235, 245), (
        Shape("square", "green", (48.0, 48.0), 56.0),
        Shape("triangle", "yellow", (140.0, 56.0), 64.0),
        Shape("star", "purple", (92.0, 140.0), 68.0),
    )),
    "white_star_black_circle.png": Scene(160, 160, (200, 225, 250), (
        Shape("star", "white", (52.0, 56.0), 60.0, 10.0),
        Shape("circle", "black", (112.0, 108.0), 52.0),
    )),
}

# file -> transcript, spoken with eSpeak NG's default English voice
SPEECH: dict[str, str] = {
    "digits_four_seven_one_nine.wav": "four seven one nine",
    "a_red_circle_and_a_blue_star.wav": "a red circle and a blue star",
    "question_what_color_is_the_circle.wav": "what color is the circle",
}

EXAMPLES: list[dict] = [
    {"text": "what color is the circle", "image": "red_circle_blue_star.png", "audio": None, "expected": "red"},
    {"text": "is there a blue star", "image": "red_circle_blue_star.png", "audio": None, "expected": "yes"},
    {"text": "how many shapes are there", "image": "green_square_yellow_triangle_purple_star.png", "audio": None,
     "expected": "three"},
    {"text": "what shape is the white one", "image": "white_star_black_circle.png", "audio": None,
     "expected": "star"},
    {"text": ASR_INSTRUCTION, "image": None, "audio": "digits_four_seven_one_nine.wav",
     "expected": "four seven one nine"},
    {"text": ASR_INSTRUCTION, "image": None, "audio": "a_red_circle_and_a_blue_star.wav",
     "expected": "a red circle and a blue star"},
    {"text": SPOKEN_VQA_INSTRUCTION, "image": "red_circle_blue_star.png",
     "audio": "question_what_color_is_the_circle.wav", "expected": "red"},
    {"text": "the star is red . what color is the star ?", "image": None, "audio": None, "expected": "red"},
]


def read_examples(folder: str | Path = DEFAULT_OUT) -> list[tuple[str, bytes | None, bytes | None]]:
    """The examples as `examples.json` in `folder` lists them: (text, image file's bytes or None, audio file's bytes
    or None) each, in order."""
    folder = Path(folder)
    return [(ex["text"], (folder / ex["image"]).read_bytes() if ex.get("image") else None,
             (folder / ex["audio"]).read_bytes() if ex.get("audio") else None)
            for ex in json.loads((folder / "examples.json").read_text())]


def make_examples(out: str | Path = DEFAULT_OUT) -> list[Path]:
    """Write every example file and examples.json into `out`; returns the paths written."""
    import soundfile as sf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, scene in SCENES.items():
        render_scene(scene).save(out / name, format="PNG", optimize=True)
        written.append(out / name)
    speaker = Speaker()
    for name, text in SPEECH.items():
        x, sr = speaker.say(text, voice="en", variant="m3", rate=170, pitch=50)
        sf.write(str(out / name), resample(x, sr, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
        written.append(out / name)
    (out / "examples.json").write_text(json.dumps(EXAMPLES, indent=2) + "\n")
    written.append(out / "examples.json")
    too_big = [f"{p.name} ({p.stat().st_size} B)" for p in written if p.stat().st_size > MAX_BYTES]
    if too_big:
        raise RuntimeError(f"example files over {MAX_BYTES} bytes: {too_big}")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.toy.examples", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    for path in make_examples(args.out):
        print(f"{path}  {path.stat().st_size} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
