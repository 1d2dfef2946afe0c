"""The training recipe end to end on a few hundred samples (tiny sizes): every stage runs, writes its log and
state, losses fall, answers improve, the export loads through `phimm.load`, and a rerun skips finished stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _log(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]


def _first_last(recs: list[dict], key: str, phase: str | None = None) -> tuple[float, float]:
    vals = [r[key] for r in recs if key in r and (phase is None or r.get("phase") == phase)]
    assert len(vals) >= 2, f"too few {key} records"
    k = max(1, len(vals) // 5)  # average the first and last fifths: single batches are noisy
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("recipe") / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PHIMM_TRAIN_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "phimm.train", "--run", str(run), "--preset", "test", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run


def test_every_stage_finished_with_logs(run):
    from phimm.train import STAGES

    for stage in STAGES:
        done = json.loads((run / stage / "done.json").read_text())
        assert done["wall_s"] >= 0
        assert (run / stage / "log.jsonl").is_file() or stage == "export"
        assert not (run / stage / "state.pt").exists()  # finished stages drop their resume state
    assert json.loads((run / "options.json").read_text())["seed"] == 3


def test_losses_fall(run):
    first, last = _first_last(_log(run, "lm"), "loss")
    assert last < 0.7 * first
    first, last = _first_last(_log(run, "speech_encoder"), "loss")
    assert last < first
    first, last = _first_last(_log(run, "vision_encoder"), "loss")
    assert last < first
    first, last = _first_last(_log(run, "speech"), "rel_mse", "projector")
    assert last < 0.5 * first
    first, last = _first_last(_log(run, "vision"), "rel_mse", "projector")
    assert last < 0.5 * first


def test_outputs_improve(run):
    lm = _log(run, "lm")
    start = next(r["eval_acc"] for r in lm if r.get("event") == "start")
    end = next(r["eval_acc"] for r in lm if r.get("event") == "end")
    for task in start:
        assert end[task] > start[task], (task, start, end)
    for stage in ("speech", "vision"):
        done = json.loads((run / stage / "done.json").read_text())
        assert done["answer_acc_after"] >= done["answer_acc_before"], (stage, done)


def test_lm_anneal_trains_the_decoder_only(run):
    """`lm_anneal` changes the decoder layers of the LM stage's base and nothing else, and its base is the one the
    later stages (and the export) are built on."""
    from safetensors.torch import load_file

    from phimm.train.common import base_dir

    before = load_file(run / "lm" / "base" / "model.safetensors")
    after = load_file(run / "lm_anneal" / "base" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.", "model.norm.")) for k in changed), sorted(changed)[:5]
    assert sum(k.startswith("model.layers.") for k in changed) >= 4
    assert base_dir(run) == run / "lm_anneal" / "base"
    assert len([r for r in _log(run, "lm_anneal") if "loss" in r]) >= 3
    pool = torch.load(run / "spoken_pool" / "pool.pt", weights_only=True)  # the clips the anneal read
    assert sum(len(v) for v in pool.values()) == json.loads((run / "options.json").read_text())["lm_anneal_spoken"]
    # the test preset reads spoken questions through the trained speech encoder (lm_anneal_spoken)
    end = next(r["eval_acc"] for r in _log(run, "lm_anneal") if r.get("event") == "end")
    assert 0.0 <= end["svqa_spoken"] <= 1.0
    exported = load_file(run / "model" / "model.safetensors")
    k = next(k for k in sorted(changed) if k.endswith("self_attn.o_proj.weight"))
    assert torch.equal(exported[k], after[k])


def test_spoken_pool_questions_are_read_as_soft_frames(run):
    """With a pool from the trained speech encoder, a spoken-question example carries the clip's CTC posteriors
    (one frame per audio placeholder, rows summing to 1), and the loss reads them: other posteriors, another
    loss."""
    import random

    from phimm.toy import domain
    from phimm.train.common import Options, Vocab, load_base
    from phimm.train.lm import make_example, run_loss, spoken_pool

    opts = Options.load(run / "options.json")
    pool = spoken_pool(run, opts, 123, 40, desc="test")
    assert sum(len(v) for v in pool.values()) == 40
    hf, proc = load_base(run)
    vocab = Vocab(proc.tokenizer, hf.config)
    every = {text: [p for ps in pool.values() for p in ps] for text in pool}  # any clip for any pooled text
    rng = random.Random(0)
    ex = None
    for _ in range(200):  # until the drawn question is one the pool holds
        ex = make_example(rng, "svqa", vocab, opts, spoken=every)
        if ex[3] is not None:
            break
    ids, n_prompt, mix, soft = ex
    assert soft is not None and not mix
    assert ids.count(vocab.audio) == soft.shape[0] and soft.shape[1] == len(domain.VOCAB) + 1
    assert torch.allclose(soft.sum(-1), torch.ones(soft.shape[0]), atol=1e-5)
    with torch.no_grad():
        loss, _ = run_loss(hf, [ex], vocab, compound=False)
        flat = torch.full_like(soft, 1.0 / soft.shape[1])
        other, _ = run_loss(hf, [(ids, n_prompt, mix, flat)], vocab, compound=False)
    assert not torch.isclose(loss, other)


def test_probe_scores_every_route(run, capsys):
    """`python -m phimm.train.probe` scores held-out spoken questions on each of its inputs, per question type."""
    from phimm.toy.domain import QUESTION_TYPES
    from phimm.train.probe import main

    assert main(["--run", str(run), "--n", "16"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result) == {"base, slot grid, posteriors", "base, slot grid, argmax frames", "trained route"}
    for scores in result.values():
        assert 0.0 <= scores["all"] <= 1.0 and set(scores) - {"all"} <= set(QUESTION_TYPES)


def test_export_loads_and_scores(run):
    import phimm

    scores = json.loads((run / "scores.json").read_text())
    for key in ("asr_wer", "vqa_acc", "spoken_vqa_acc", "text_acc"):
        assert key in scores
    assert scores["text_route_bit_identical"] is True
    pipe = phimm.load(run / "model")
    assert sorted(pipe.adapters) == ["speech", "vision"]
    out = pipe("what color is the circle", max_new_tokens=4)
    assert out.route.adapter is None


def test_rerun_skips_finished_stages(run):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PHIMM_TRAIN_QUIET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "phimm.train", "--run", str(run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "start" not in proc.stdout
    assert json.loads((run / "timings.json").read_text())["this_invocation_s"] < 10


def test_scene_targets():
    """The vision targets: each shape's class in its colour's slot (wherever the shape is), the background
    elsewhere; dense patch labels under the shapes; noisy CTC frames keep a blank between a repeated word."""
    import random

    from phimm.toy.domain import WHITE, Scene, Shape
    from phimm.train.common import (CELL_CLASSES, SLOT_COLORS, Options, Vocab, build_config, build_tokenizer,
                                    cell_class, noisy_frames, slot_grid)
    from phimm.train.vision import patch_labels

    scene = Scene(160, 160, WHITE, (Shape("star", "blue", (40.0, 40.0), 60.0),
                                    Shape("circle", "white", (120.0, 120.0), 50.0)))
    flat = sum(slot_grid(scene, 4), [])
    assert flat[SLOT_COLORS.index("blue")] == cell_class("blue", "star")
    assert flat[SLOT_COLORS.index("white")] == cell_class("white", "circle")
    assert sum(k != 0 for k in flat) == 2
    labels = patch_labels(scene, 128, 16)  # 8 x 8 patches of 20 image pixels
    assert labels[6 * 8 + 6] == cell_class("white", "circle")  # the patch around (130, 130)
    assert labels[2 * 8 + 1] == cell_class("blue", "star")  # around (30, 50): inside the star's lower arms
    assert labels[0] == labels[7] == 0 and set(labels) <= set(range(len(CELL_CLASSES)))
    wide = Scene(256, 128, WHITE, (Shape("square", "red", (200.0, 64.0), 40.0),))
    assert patch_labels(wide, 128, 16)[7 * 8] == 0  # the padding under a wide image

    opts = Options(**{"lm_hidden": 32})
    tok = build_tokenizer(opts)
    vocab = Vocab(tok, build_config(tok, opts))
    for seed in range(50):
        frames = noisy_frames(random.Random(seed), "four four four", vocab)
        spikes = [f for i, f in enumerate(frames) if f != vocab.blank and (i == 0 or frames[i - 1] != f)]
        assert len(spikes) == 3, frames  # CTC collapse reads three words
        dense = noisy_frames(random.Random(seed), "four four four", vocab, word_span=(1, 2))
        spikes = [f for i, f in enumerate(dense) if f != vocab.blank and (i == 0 or dense[i - 1] != f)]
        assert len(spikes) == 3 and len(dense) <= 2 + 3 * 3 + 2, dense  # edges and words of 1-2 frames (+ 1 blank)
    from phimm.train.lm import word_frames

    assert word_frames("1-4") == (1, 4)
    for bad in ("0-4", "4-1", "2", "a-b"):
        with pytest.raises(ValueError, match="lm_anneal_word_frames"):
            word_frames(bad)


def test_set_option_parses_its_type():
    """`--set key=value` takes the option's type: "false" turns a boolean off (bool("false") would be True);
    unknown keys and values of the wrong type stop with a message naming them."""
    from phimm.train import parse_option
    from phimm.train.common import Options

    opts = Options()
    assert parse_option(opts, "lm_compile", "false") is False
    assert parse_option(opts, "lm_compile", "True") is True
    assert parse_option(opts, "lm_steps", "9000") == 9000
    assert parse_option(opts, "lm_mix_floor", "0.6") == 0.6
    for key, value, said in (("lm_compile", "maybe", "boolean"), ("lm_steps", "9k", "int"),
                             ("lm_stepz", "1", "unknown option 'lm_stepz'")):
        with pytest.raises(SystemExit, match=said):
            parse_option(opts, key, value)


def test_lm_batch_schedule():
    """LM pretraining batches: the `lm_first` phases' tasks, then the task mix, one task
    per batch by default and one per example with `lm_mixed_batches`."""
    from phimm.toy import domain
    from phimm.train import lm
    from phimm.train.common import Options, Vocab, build_config, build_tokenizer

    small = {"lm_hidden": 32}
    tok = build_tokenizer(Options(**small))
    vocab = Vocab(tok, build_config(tok, Options(**small)))

    def tasks(opts, step):
        out = []
        for ids, n, _, _ in lm.batch(step, opts, vocab, 24):
            prompt = tok.decode(ids[:n])
            out.append("asr" if domain.ASR_INSTRUCTION in prompt else "svqa" if domain.SPOKEN_VQA_INSTRUCTION in prompt
                       else "vqa" if set(vocab.cells) & set(ids) else "text")
        return out

    mix_only = Options(**small, lm_first="", lm_mixed_batches=False)
    first = Options(**small, lm_first="asr:3,vqa+svqa:2", lm_mixed_batches=True)
    assert all(set(tasks(first, step)) == {"asr"} for step in range(3))
    assert set(tasks(first, 3)) | set(tasks(first, 4)) == {"vqa", "svqa"}
    assert len(set(tasks(first, 5))) > 1  # the mix starts after them
    assert all(len(set(tasks(mix_only, step))) == 1 for step in range(8))
    assert set(sum((tasks(mix_only, step) for step in range(8)), [])) != {"asr"}
    with pytest.raises(ValueError, match="lm_first"):
        lm.phases(Options(**small, lm_first="asr:10,speech:5"))
    # the task mix follows lm_task_weights: a task weighing 0 never comes, the others do
    no_asr = Options(**small, lm_first="", lm_mixed_batches=True, lm_task_weights="asr:0,vqa:1,svqa:1,text:1")
    assert set(sum((tasks(no_asr, step) for step in range(4)), [])) == {"vqa", "svqa", "text"}
    # the phase-only tasks may join the mix by name (they weigh 0 otherwise): sbind's questions are spoken
    with_sbind = Options(**small, lm_first="", lm_mixed_batches=True, lm_task_weights="asr:0,vqa:0,svqa:0,text:1,sbind:1")
    assert set(sum((tasks(with_sbind, step) for step in range(4)), [])) == {"svqa", "text"}


def test_lm_bind_phase(monkeypatch):
    """A `bind` phase of `lm_first` asks written questions of the types `lm_bind_questions` names, about scenes of
    two or three shapes only, every answer right; an `sbind` phase the same questions spoken."""
    import random

    from phimm.toy import domain
    from phimm.train import lm
    from phimm.train.common import Options, Vocab, build_config, build_tokenizer

    small = {"lm_hidden": 32}
    tok = build_tokenizer(Options(**small))
    vocab = Vocab(tok, build_config(tok, Options(**small)))
    drawn = []

    def spy(rng, faint=0.0, n_shapes=None):
        drawn.append(real(rng, faint, n_shapes))
        return drawn[-1]

    real = lm.random_layout_scene
    monkeypatch.setattr(lm, "random_layout_scene", spy)
    opts = Options(**small, lm_first="bind:2", lm_bind_questions="what_shape:1")
    assert lm.phases(opts)[0] == (("bind",), 2)
    assert all("what shape is the" in tok.decode(ids)
               for step in range(2) for ids, *_ in lm.batch(step, opts, vocab, 8))
    rng = random.Random(0)
    for _ in range(24):
        ids, n, _, _ = lm.make_example(rng, "bind", vocab, opts)
        prompt, answer = tok.decode(ids[:n]), tok.decode(ids[n:], skip_special_tokens=True).strip()
        assert set(vocab.cells) & set(ids) and domain.SPOKEN_VQA_INSTRUCTION not in prompt  # written
        colour = prompt.split("what shape is the ")[1].split()[0]
        assert len(drawn[-1].shapes) >= 2
        assert answer == domain.answer_question(drawn[-1], f"what shape is the {colour} one")
    # "sbind": the same questions spoken (synthetic frames in the audio placeholders)
    o = Options(**small, lm_first="sbind:2", lm_bind_questions="what_color:1")
    assert lm.phases(o)[0] == (("sbind",), 2)
    for _ in range(12):
        ids, n, _, _ = lm.make_example(rng, "sbind", vocab, o)
        assert domain.SPOKEN_VQA_INSTRUCTION in tok.decode(ids[:n]) and vocab.blank in ids  # frames: words, blanks
        assert len(drawn[-1].shapes) >= 2 and "what color is the" not in tok.decode(ids[:n])
    # `lm_sbind_word_frames="1-1"`: the spoken words one frame each, one after another, a blank on either side
    o = Options(**small, lm_first="sbind:2", lm_bind_questions="what_color:1", lm_sbind_word_frames="1-1")
    for _ in range(12):
        ids, n, _, _ = lm.make_example(rng, "sbind", vocab, o)
        first = ids.index(vocab.blank)
        assert ids.count(vocab.blank) == 2 and ids[first + 6] == vocab.blank
        words = [next(w for w, i in vocab.words.items() if i == t) for t in ids[first + 1:first + 6]]
        assert words[:4] == ["what", "color", "is", "the"] and words[4] in domain.SHAPES
    with pytest.raises(ValueError, match="lm_anneal_word_frames|min-max"):
        lm.word_frames("0-2")
    # `lm_bind_fillers`: up to that many filler words at random places; the question's own words and answer stay
    o = Options(**small, lm_first="bind:2", lm_bind_questions="what_shape:1", lm_bind_fillers=3)
    extra = set()
    for _ in range(24):
        ids, n, _, _ = lm.make_example(rng, "bind", vocab, o)
        words = tok.decode(ids[:n]).split("[row]")[-1].split("<|end|>")[0].split()
        colour = next(w for w in words if w in domain.COLOR_NAMES)
        assert tok.decode(ids[n:], skip_special_tokens=True).strip() == domain.answer_question(
            drawn[-1], f"what shape is the {colour} one")
        assert [w for w in words if w not in lm.FILLERS] == ["what", "shape", colour, "one"]
        extra.add(len(words) - 6)
    assert extra <= {0, 1, 2, 3} and len(extra) > 1
    # the anneal's mix may name them too (a task not named weighs 0)
    annealed = lm.anneal_batch(0, Options(**small, lm_anneal_task_weights="bind:1"), vocab, 6)
    assert all(domain.SPOKEN_VQA_INSTRUCTION not in tok.decode(ids) and set(vocab.cells) & set(ids)
               for ids, *_ in annealed)


def test_lm_question_and_task_weights():
    """`lm_question_weights` draws scene question types by weight (unnamed types weigh 1), every answer right
    (near "no" questions included); malformed weight
    options are refused with what is wrong."""
    import collections
    import random

    from phimm.toy import domain
    from phimm.toy.images import random_scene
    from phimm.train import lm

    rng = random.Random(0)
    counts = collections.Counter()
    for _ in range(400):
        scene = random_scene(rng, size=128)
        q = lm.scene_question(rng, scene, lm.weights("is_there:3,how_many:0", domain.QUESTION_TYPES, 1.0),
                              near_no=0.9)
        assert q.answer == domain.answer_question(scene, q.text), q.text  # near "no"s are still right
        counts[q.qtype] += 1
    assert counts["how_many"] == 0
    assert counts["is_there"] > 2 * max(counts["what_color"], counts["what_shape"])
    assert lm.weights("text:1,asr:2,svqa:3,vqa:4", lm.TASKS) == {"asr": 2, "vqa": 4, "svqa": 3, "text": 1}
    for spec, said in (("asr:1", "no weight for"), ("asr:-1,vqa:1,svqa:1,text:1", "weight >= 0"),
                       ("asr:1,vqa:1,svqa:1,speech:1", "name from"), ("asr:0,vqa:0,svqa:0,text:0", "every weight")):
        with pytest.raises(ValueError, match=said):
            lm.weights(spec, lm.TASKS)


def test_lm_stage_falls_back_to_eager_when_compile_fails(tmp_path, monkeypatch):
    """`lm_compile`: when torch.compile cannot build the decoder (no C++ compiler here, say), the LM stage logs why
    and trains eagerly, with no gradient left behind by the failed try."""
    import torch
    from transformers import Phi4MultimodalForCausalLM

    from phimm.train import lm
    from phimm.train.common import Options, Stage, Vocab, build_config, build_tokenizer

    opts = Options(**{"lm_hidden": 32, "lm_layers": 1, "lm_intermediate": 64})
    tok = build_tokenizer(opts)
    cfg = build_config(tok, opts)
    hf = Phi4MultimodalForCausalLM(cfg)

    def broken(module, **kw):
        def run(*args, **inputs):
            out = module(*args, **inputs)  # gradients reach the parameters before the failure
            out.sum().backward()
            raise RuntimeError("no C++ compiler")
        run.answers_only = module.answers_only
        return run

    monkeypatch.setattr(torch, "compile", broken)
    stage = Stage(tmp_path, "lm")
    assert lm.compiled_body(hf, opts, Vocab(tok, cfg), stage) is None
    events = [json.loads(line) for line in stage.log_path.read_text().splitlines()]
    assert events[0]["event"] == "compile_failed" and "no C++ compiler" in events[0]["error"]
    assert events[1]["event"] == "eager"
    assert all(p.grad is None for p in hf.parameters())


def test_stage_resume_restores_everything_or_refuses(tmp_path):
    """A stage's state.pt brings back every module it names, the optimiser, the step and the time; a state that
    lacks one of them (written by another version of the stage) is refused, never half-applied."""
    import torch

    from phimm.train.common import Stage

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(list(a.parameters()) + list(b.parameters()), lr=0.1)
    (a(torch.randn(4, 3)).sum() + b(torch.randn(4, 2)).sum()).backward()
    opt.step()
    stage = Stage(tmp_path, "s")
    assert stage.resume(opt, a=a, b=b) == (0, 0.0)
    stage.checkpoint(7, 12.5, opt, a=a, b=b)

    a2, b2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt2 = torch.optim.AdamW(list(a2.parameters()) + list(b2.parameters()), lr=0.1)
    assert stage.resume(opt2, a=a2, b=b2) == (7, 12.5)
    assert torch.equal(a2.weight, a.weight) and torch.equal(b2.bias, b.bias)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    c = torch.nn.Linear(2, 2)
    before = c.weight.clone()
    with pytest.raises(RuntimeError, match="lacks"):
        stage.resume(opt2, a=a2, b=b2, c=c)
    assert torch.equal(c.weight, before)


def test_lm_anneal_on_spoken_questions_needs_the_speech_encoder(tmp_path):
    """Reading spoken questions through the speech encoder before that stage has finished is refused, saying
    what to do, before any model is loaded; so is annealing on them before the pool is made."""
    from phimm.train.common import Options
    from phimm.train.lm import run_anneal, run_pool

    opts = Options(lm_anneal_steps=10, lm_anneal_spoken=8)
    with pytest.raises(RuntimeError, match="speech_encoder stage has not finished"):
        run_pool(tmp_path, opts)
    with pytest.raises(RuntimeError, match="spoken_pool stage has not finished"):
        run_anneal(tmp_path, opts)
    assert not (tmp_path / "lm_anneal" / "done.json").exists()


def test_vision_encoder_batches_reuse_each_scene_for_cell_reuse_steps():
    """`cell_reuse=k`: step s's batch is the scenes first drawn at steps s-k+1..s (ceil(cell_batch/k) each), so a
    scene serves k consecutive steps; a resumed run (empty cache) draws the same batch; k=1 is `fresh_batch`."""
    import random

    from phimm.train.common import Options, fresh_model
    from phimm.train.options import PRESETS
    from phimm.train.vision import fresh_batch, reused_batch

    opts = Options(**{**PRESETS["test"], "cell_batch": 6, "cell_reuse": 3})
    proc, _ = fresh_model(opts, 0)
    cache: dict = {}
    b4 = reused_batch(proc, opts, 4, cache)
    b5 = reused_batch(proc, opts, 5, cache)
    assert b4[0].shape[0] == b5[0].shape[0] == 6 and sorted(cache) == [3, 4, 5]
    # the two newest draws of step 4 come back at step 5, in the same order; one new draw is added
    assert torch.equal(b5[0][:4], b4[0][2:]) and torch.equal(b5[2][:4], b4[2][2:])
    assert not torch.equal(b5[0][4:], b4[0][:2])
    resumed = reused_batch(proc, opts, 5, {})
    assert all(torch.equal(a, b) for a, b in zip(resumed, b5))
    single = Options(**{**opts.__dict__, "cell_reuse": 1})
    want = fresh_batch(proc, single, random.Random(f"slots:{single.seed}:7"), single.cell_batch)
    assert all(torch.equal(a, b) for a, b in zip(reused_batch(proc, single, 7, {}), want))


def test_vision_encoder_crops_equal_the_processor():
    """The vision encoder's scenes skip the image processor's call overhead (`scene_crops`), yet get the very
    pixels and patch masks `process_image` gives at inference: square, wide, tall, faint and tiny scenes."""
    import random

    from phimm.toy.images import render_scene
    from phimm.toy.scenes import random_layout_scene
    from phimm.train.common import Options, fresh_model
    from phimm.train.options import PRESETS
    from phimm.train.vision import scene_crops

    proc, _ = fresh_model(Options(**PRESETS["test"]), 0)
    rng = random.Random(11)
    sizes, padded = set(), 0
    for _ in range(60):
        img = render_scene(random_layout_scene(rng, 0.5))
        sizes.add((img.width > img.height) - (img.width < img.height))
        want = proc.process_image(img)
        pixels, masks = scene_crops(proc, img)
        assert pixels.dtype == want.pixel_values.dtype and masks.dtype == want.attention_mask.dtype
        assert torch.equal(pixels, want.pixel_values) and torch.equal(masks, want.attention_mask)
        padded += not bool(masks[1].all())
    assert sizes == {-1, 0, 1}  # tall, square and wide canvases were all checked
    assert padded > 0  # and sub-crops whose padding is masked


def test_stage_threads_follow_the_dependency_graph():
    """A stage gets every worker's thread only when no other stage still to run can run beside it."""
    from phimm.train import STAGES, threads_for

    got = {s: threads_for(s, STAGES, 2) for s in STAGES}
    assert got == {**{s: 1 for s in STAGES}, "vision_speech": 2, "export": 2, "eval": 2}
    assert threads_for("vision_speech_data", STAGES, 2) == 1  # beside anything
    assert threads_for("spoken_pool", STAGES, 2) == 1  # beside the LM stage
    assert threads_for("lm", ("lm",), 2) == 2  # `--stages lm`
    assert threads_for("lm_anneal", ("lm_anneal", "speech", "vision"), 2) == 2  # the encoders are done
    assert threads_for("speech", ("speech", "vision", "export"), 2) == 1
    assert threads_for("eval", STAGES, 1) == 1


def test_lm_loss_reads_the_answer_tokens_only():
    """`lm_batch_loss` scores the answer tokens of right-padded rows: the same loss as a cross-entropy over every
    position with the prompt and the padding ignored."""
    from transformers import Phi4MultimodalForCausalLM

    from phimm.train.common import Options, build_config, build_tokenizer, lm_batch_loss

    opts = Options(lm_hidden=32, lm_layers=1, lm_intermediate=64)
    cfg = build_config(build_tokenizer(opts), opts)
    torch.manual_seed(0)
    hf = Phi4MultimodalForCausalLM(cfg).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    n_prompt = [4, 1]
    loss, acc = lm_batch_loss(hf, rows, n_prompt)
    want = []
    for r, n in zip(rows, n_prompt):
        logits = hf(input_ids=torch.tensor([r])).logits[0, :-1]
        want.append(torch.nn.functional.cross_entropy(logits[n - 1:], torch.tensor(r[n:]), reduction="none"))
    assert torch.allclose(loss, torch.cat(want).mean(), atol=1e-5)
    assert 0.0 <= acc <= 1.0


def test_lm_batch_in_length_parts_has_the_same_loss():
    """`run_loss` with `chunks` runs a batch as parts of rows of similar length (less padding): the same mean over
    the answer tokens and the same accuracy as the whole batch, and the same gradients, up to float rounding."""
    import random

    from transformers import Phi4MultimodalForCausalLM

    from phimm.train import lm
    from phimm.train.common import Options, Vocab, build_config, build_tokenizer

    parts = lm.length_parts([5, 9, 2, 7, 7, 3, 8], 3)
    assert sorted(sum(parts, [])) == list(range(7)) and [len(p) for p in parts] == [2, 3, 2]
    assert [[5, 9, 2, 7, 7, 3, 8][i] for p in parts for i in p] == [2, 3, 5, 7, 7, 8, 9]
    assert lm.length_parts([4, 1, 3], 1) == [[0, 1, 2]]  # one part: the batch in its own order
    opts = Options(lm_hidden=32, lm_layers=1, lm_intermediate=64)
    tok = build_tokenizer(opts)
    cfg = build_config(tok, opts)
    vocab = Vocab(tok, cfg)
    torch.manual_seed(0)
    hf = Phi4MultimodalForCausalLM(cfg).eval()
    rng = random.Random(3)
    examples = [lm.make_example(rng, task, vocab, opts) for task in ("asr", "text", "svqa", "asr", "vqa", "text")]
    assert len({len(e[0]) for e in examples}) > 3  # rows of many lengths: the parts differ from the batch
    got = {}
    for chunks in (1, 2, 4):
        hf.zero_grad()
        loss, acc = lm.run_loss(hf, examples, vocab, chunks=chunks)
        loss.backward()
        got[chunks] = (loss.item(), acc, hf.model.layers[0].mlp.down_proj.weight.grad.clone())
    for chunks in (2, 4):
        assert got[chunks][0] == pytest.approx(got[1][0], rel=1e-5) and got[chunks][1] == got[1][1]
        assert torch.allclose(got[chunks][2], got[1][2], atol=1e-6, rtol=1e-4)
    assert got[1][2].abs().sum() > 0


def test_answer_body_computes_the_loss_of_the_whole_decoder():
    """`AnswerBody` (the LM stages' compiled body) runs the last decoder layer at the answer positions only: the
    same hidden states there as the whole decoder, hence the same loss, accuracy and gradients, on a batch of every
    task, padded rows and grouped-query attention included, with a decoder whose weights are not at their init."""
    import random

    from transformers import Phi4MultimodalForCausalLM

    from phimm.train import lm
    from phimm.train.common import AnswerBody, Options, Vocab, build_config, build_tokenizer

    opts = Options(lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, lm_intermediate=96)
    tok = build_tokenizer(opts)
    cfg = build_config(tok, opts)
    vocab = Vocab(tok, cfg)
    torch.manual_seed(0)
    hf = Phi4MultimodalForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))  # attention far from uniform, norms far from 1
    rng = random.Random(5)
    examples = [lm.make_example(rng, task, vocab, opts) for task in ("svqa", "text", "asr", "vqa", "text", "asr")]
    assert len({len(e[0]) for e in examples}) > 3 and len({len(e[0]) - e[1] for e in examples}) > 1
    body = AnswerBody(hf.model)
    got = []
    for b in (None, body):
        hf.zero_grad()
        loss, acc = lm.run_loss(hf, examples, vocab, b)
        loss.backward()
        got.append((loss.item(), acc, [p.grad.clone() for p in hf.parameters() if p.grad is not None]))
    assert got[1][0] == pytest.approx(got[0][0], rel=1e-5) and got[1][1] == got[0][1]
    assert len(got[1][2]) == len(got[0][2]) > 0
    for a, b in zip(got[0][2], got[1][2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert got[0][0] > 1.0  # not a solved batch: the losses compared are not both near zero


def test_tokenizer_prompts_make_the_instructions_whole_words():
    """`tokenizer_prompts` puts the domain's instructions in the tokenizer's corpus: they take fewer tokens, every
    domain word stays one token (`build_tokenizer` checks), and the model's vocabulary keeps its size."""
    from phimm.toy import domain
    from phimm.train.common import Options, build_config, build_tokenizer

    lengths = {}
    for kw in (dict(tokenizer_prompts=0, vocab=448), {}):
        opts = Options(**kw)
        tok = build_tokenizer(opts)
        lengths[not kw] = [len(tok(s)["input_ids"]) for s in (domain.ASR_INSTRUCTION, domain.SPOKEN_VQA_INSTRUCTION)]
        assert build_config(tok, opts).vocab_size == 512
    assert lengths[True][0] <= lengths[False][0] - 4 and lengths[True][1] <= lengths[False][1] - 6


def test_vision_speech_reads_the_audio_made_ahead(run):
    """`vision_speech_data` synthesises the vision-speech stage's spoken questions ahead, as `make_images` would
    have (same features, same token counts), and that stage used them; a spoken_vqa sample without audio has every
    other field of the one with it."""
    from phimm.toy import data as toy_data
    from phimm.train.common import Options, load_base
    from phimm.train.vision import make_images
    from phimm.train.vision_speech import load_audio

    opts = Options.load(run / "options.json")
    assert any(r.get("audio") == "vision_speech_data" for r in _log(run, "vision_speech") if r.get("event") == "data")
    made = load_audio(run, opts)
    assert len(made) == opts.svqa_samples
    _, proc = load_base(run)
    fresh = make_images(proc, opts, "spoken_vqa", 3, opts.seed, keep_audio=True)
    reused = make_images(proc, opts, "spoken_vqa", 3, opts.seed, keep_audio=True, audio=made)
    for a, b in zip(fresh, reused):
        assert torch.equal(a["audio"].features, b["audio"].features) and a["audio"].num_tokens == b["audio"].num_tokens
        assert torch.equal(a["image"].pixel_values, b["image"].pixel_values) and a["answer"] == b["answer"]
    with_audio = toy_data.sample("spoken_vqa", 5, 11)
    without = toy_data.sample("spoken_vqa", 5, 11, audio=False)
    assert "audio" not in without and with_audio["audio"].size > 0
    assert {k: v for k, v in with_audio.items() if k in without and k != "image"} == \
        {k: v for k, v in without.items() if k != "image"}
    assert with_audio["image"].tobytes() == without["image"].tobytes()
    with pytest.raises(ValueError, match="processed clips"):
        make_images(proc, opts, "spoken_vqa", 4, opts.seed, keep_audio=True, audio=made[:2])
