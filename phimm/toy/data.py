"""Training and held-out splits of the toy domain, in memory or written as files plus a JSONL manifest.

    python -m phimm.toy.data --kind asr --n 200 --seed 1 --out data/toy/asr [--heldout]

Kinds: "asr" (speech + transcript), "vqa" (image + question + answer), "spoken_vqa" (image + spoken question +
answer), "text" (prompt + answer). Each sample draws from its own generator seeded by (kind, split, seed,
index), so a sample depends on nothing else and any slice of a split can be remade alone.

Manifests (`{out}/{kind}.jsonl`, paths relative to `out`), as phimm's eval scripts read them:
    asr:        {"id", "audio", "text"}
    vqa:        {"id", "image", "question", "answers": [answer] * 10, "question_type"}
    spoken_vqa: the vqa fields + {"audio"}
    text:       {"id", "prompt", "answer", "task"}
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import domain
from .domain import QUESTION_TYPES, TEXT_TASKS
from .images import random_scene, render_scene

KINDS = ("asr", "vqa", "spoken_vqa", "text")
# rates at which audio files are written; None keeps the synthesiser's own (22050 Hz)
FILE_SAMPLE_RATES = (None, None, 16000, 16000, 44100, 8000)
N_ANSWERS = 10  # VQA-v2 style: ten annotator answers


def is_heldout_variant(name: str) -> bool:
    """A fixed fifth of the voice variants is kept for held-out data; the default voice ("") is training's."""
    return name != "" and zlib.crc32(name.encode()) % 5 == 0


def voice_variants(heldout: bool) -> list[str]:
    from .speech import variant_names

    return [v for v in variant_names() if is_heldout_variant(v) == heldout]


def speech_params(rng: random.Random, heldout: bool) -> dict:
    """Voice, variant, rate, pitch, range, noise and gain of one utterance (spec: 130-210 wpm, pitch 30-70,
    SNR >= 20 dB). Held-out draws rates and pitches from another distribution (toward the ends of the ranges)."""
    from .speech import ENGLISH_VOICES, PITCH_RANGE, RATE_RANGE

    variants = voice_variants(heldout)
    voice = "en" if rng.random() < 0.5 else rng.choice(ENGLISH_VOICES)
    variant = "" if (not heldout and rng.random() < 0.1) else rng.choice(variants)
    if heldout:
        u, v = rng.betavariate(0.6, 0.6), rng.betavariate(0.6, 0.6)
        rate = round(RATE_RANGE[0] + u * (RATE_RANGE[1] - RATE_RANGE[0]))
        pitch = round(PITCH_RANGE[0] + v * (PITCH_RANGE[1] - PITCH_RANGE[0]))
        pitch_range = rng.choice((30, 50, 50, 70))
        snr_db = rng.uniform(20.0, 30.0) if rng.random() < 0.3 else None
        peak = None
    else:
        rate = rng.randint(*RATE_RANGE)
        pitch = rng.randint(*PITCH_RANGE)
        pitch_range = rng.randint(20, 80)
        snr_db = rng.uniform(20.0, 40.0) if rng.random() < 0.5 else None
        peak = rng.uniform(0.25, 0.99) if rng.random() < 0.7 else None
    return dict(voice=voice, variant=variant, rate=rate, pitch=pitch, pitch_range=pitch_range, snr_db=snr_db,
                peak=peak, seed=rng.getrandbits(31))


def speak(rng: random.Random, text: str, heldout: bool, sample_rate: int | None,
          question: bool = False) -> dict:
    """Synthesise `text` with random speech parameters -> {"audio", "sample_rate", "speech": params}."""
    from .speech import Speaker, add_noise, resample

    params = speech_params(rng, heldout)
    # a question mark gives questions their intonation, half of the time
    said = text + " ?" if question and rng.random() < 0.5 else text
    x, sr = Speaker().say(said, params["voice"], params["variant"], params["rate"], params["pitch"],
                          params["pitch_range"], seed=params["seed"])
    if params["peak"] is not None and x.size:
        x = (x * (params["peak"] / max(float(np.abs(x).max()), 1e-6))).astype(np.float32)
    if params["snr_db"] is not None:
        x = add_noise(x, params["snr_db"], rng)
    out_sr = sample_rate if sample_rate is not None else (rng.choice(FILE_SAMPLE_RATES) or sr)
    x = resample(x, sr, out_sr)
    return {"audio": x, "sample_rate": out_sr, "speech": params}


def _question_plan(base: str, i: int) -> tuple[str, str | None]:
    """Question type and forced is_there answer of sample `i`: every block of 8 samples holds each template twice
    and one "yes" and one "no", so a split is balanced."""
    block = [(q, None) for q in QUESTION_TYPES if q != "is_there"] * 2 + [("is_there", "yes"), ("is_there", "no")]
    random.Random(f"{base}:block:{i // len(block)}").shuffle(block)
    return block[i % len(block)]


def _vqa_sample(rng: random.Random, base: str, i: int) -> dict:
    qtype, answer = _question_plan(base, i)
    while True:
        scene = random_scene(rng)
        if qtype in domain.available_question_types(scene):
            break
    q = domain.question_for_scene(rng, scene, qtype, answer=answer)
    return {"scene": scene, "image": render_scene(scene), "question": q.text, "answer": q.answer,
            "question_type": q.qtype}


def sample(kind: str, i: int, seed: int, heldout: bool = False, sample_rate: int | None = None,
           audio: bool = True) -> dict:
    """Sample `i` of a split. Audio is at `sample_rate`, or at a random one of FILE_SAMPLE_RATES if None.
    `audio=False`: a spoken_vqa sample without its (slow to synthesise) audio; every other field is the same."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    split = "heldout" if heldout else "train"
    base = f"phimm-toy:{kind}:{split}:{seed}"
    rng = random.Random(f"{base}:{i}")
    out: dict = {"id": f"{kind}-{split}-{seed}-{i:06d}", "kind": kind}
    if kind == "asr":
        text, ukind = domain.utterance(rng, ("digits", "shapes", "question")[i % 3])
        out.update(text=text, utterance_kind=ukind)
        out.update(speak(rng, text, heldout, sample_rate, question=ukind == "question"))
    elif kind == "vqa":
        out.update(_vqa_sample(rng, base, i))
    elif kind == "spoken_vqa":
        out.update(_vqa_sample(rng, base, i))
        if audio:  # the last draws of the sample: leaving them out changes nothing else
            out.update(speak(rng, out["question"], heldout, sample_rate, question=True))
    else:
        prompt, answer, task = domain.text_example(rng, TEXT_TASKS[i % len(TEXT_TASKS)])
        out.update(prompt=prompt, answer=answer, task=task)
    return out


def iter_split(kind: str, n: int, seed: int, heldout: bool = False, sample_rate: int | None = None,
               start: int = 0, audio: bool = True) -> Iterator[dict]:
    """Samples `start` .. `start + n - 1` of a split, one at a time (no media kept in memory)."""
    for i in range(start, start + n):
        yield sample(kind, i, seed, heldout, sample_rate, audio)


def manifest_record(s: dict) -> dict:
    """The JSONL line of a written sample (media as paths relative to the manifest's folder)."""
    if s["kind"] == "asr":
        return {"id": s["id"], "audio": s["audio_file"], "text": s["text"]}
    if s["kind"] in ("vqa", "spoken_vqa"):
        rec = {"id": s["id"], "image": s["image_file"], "question": s["question"],
               "answers": [s["answer"]] * N_ANSWERS, "question_type": s["question_type"]}
        if s["kind"] == "spoken_vqa":
            rec["audio"] = s["audio_file"]
        return rec
    return {"id": s["id"], "prompt": s["prompt"], "answer": s["answer"], "task": s["task"]}


def write_sample(s: dict, out_dir: Path) -> dict:
    """Write the sample's media under `out_dir` (audio/*.wav as 16-bit PCM, images/*.png); adds *_file keys."""
    import soundfile as sf

    if "audio" in s:
        rel = f"audio/{s['id']}.wav"
        (out_dir / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(str(out_dir / rel), s["audio"], s["sample_rate"], subtype="PCM_16")
        s["audio_file"] = rel
    if "image" in s:
        rel = f"images/{s['id']}.png"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        s["image"].save(out_dir / rel, format="PNG", optimize=False)
        s["image_file"] = rel
    return s


def make_split(kind: str, n: int, seed: int, out_dir: str | Path | None = None, heldout: bool = False,
               sample_rate: int | None = None, keep_media: bool = True) -> list[dict]:
    """`n` samples of `kind`. With `out_dir`, also writes the media and `{out_dir}/{kind}.jsonl`.

    A sample is a dict: "id", "kind" and
      asr:        "text", "utterance_kind", "audio" (float32 [T]), "sample_rate", "speech" (voice params)
      vqa:        "scene", "image" (PIL RGB), "question", "answer", "question_type"
      spoken_vqa: the vqa keys + "audio", "sample_rate", "speech"
      text:       "prompt", "answer", "task"
    plus "audio_file" / "image_file" when written. `heldout=True` draws from other seeds, other voice variants
    and other rate/pitch distributions. `keep_media=False` drops audio and images from the returned dicts."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    samples = []
    lines = []
    for s in iter_split(kind, n, seed, heldout, sample_rate):
        if out is not None:
            write_sample(s, out)
            lines.append(json.dumps(manifest_record(s)))
        if not keep_media:
            s.pop("audio", None)
            s.pop("image", None)
        samples.append(s)
    if out is not None:
        (out / f"{kind}.jsonl").write_text("".join(line + "\n" for line in lines))
    return samples


def read_manifest(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.toy.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (media + {kind}.jsonl)")
    p.add_argument("--heldout", action="store_true", help="held-out voices, rates, pitches and seeds")
    p.add_argument("--sample-rate", type=int, default=None, help="write all audio at this rate (default: mixed)")
    args = p.parse_args(argv)
    make_split(args.kind, args.n, args.seed, args.out, args.heldout, args.sample_rate, keep_media=False)
    print(f"wrote {args.n} {args.kind} samples to {Path(args.out) / (args.kind + '.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
