"""Stage `lm`: the base LM learns the domain's text and to read the soft tokens the encoders will emit.

Chat-formatted examples, one task per batch:
- asr: a noisy CTC frame transcript in the audio placeholders + the ASR instruction -> the clean transcript
- vqa: a slot grid of cell tokens in the image placeholders (phimm's HD layout) + a question -> the answer
- svqa: a slot grid + a noisy spoken question + the spoken-question instruction -> the answer
- text: the toy domain's text tasks (copy, look-up, describe)
Afterwards the base is frozen for good: `{run}/lm/base/` is a transformers-native checkpoint with tokenizer and
processor files; every later stage starts from it.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from ..toy import domain
from ..toy.scenes import random_layout_scene
from .common import (AnswerBody, Options, bidirectional_vision, Stage, Timer, Vocab, build_config, build_processor,
                     build_tokenizer, grid_tokens, hd_geometry, lm_batch_loss, load_base, noisy_frames, slot_grid,
                     stage_file)
from .trainer import train_loop, with_acc

TASKS = ("asr", "vqa", "svqa", "text")
# tasks an `lm_first` phase may also name: "bind", written image questions on scenes of two or three shapes only,
# of the types `lm_bind_questions` weighs (each answer read from the right one of several shapes); "sbind", the
# same questions spoken (synthetic frames, as `svqa`)
PHASE_TASKS = TASKS + ("bind", "sbind")
FILLERS = ("a", "the", "is", "and")  # words `lm_bind_fillers` puts into a `bind` question


@functools.lru_cache(maxsize=None)  # parsed once per option string, not per example
def weights(spec: str, names: tuple[str, ...], default: float | None = None) -> dict[str, float]:
    """A "name:weight,..." option as {name: weight}; names not given weigh `default` (None: every name must be
    given). ValueError saying what is wrong for an unknown name, a missing one or a weight that is not >= 0. The
    result is shared between calls: read it, do not change it."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        try:
            value = float(w)
        except ValueError:
            value = -1.0
        if name not in names or value < 0:
            raise ValueError(f"{part!r} is not name:weight with a name from {tuple(names)} and a weight >= 0")
        out[name] = value
    missing = [n for n in names if n not in out]
    if missing and default is None:
        raise ValueError(f"{spec!r} gives no weight for {missing}")
    out = {n: out.get(n, default) for n in names}  # in `names` order
    if not any(out.values()):
        raise ValueError(f"{spec!r}: every weight is 0")
    return out


def scene_question(rng: random.Random, scene, qweights: dict[str, float] | None = None,
                   near_no: float = 0.5) -> domain.Question:
    """A question about `scene`, its type drawn with `qweights` (uniform: None) among those the scene allows; a
    "no" to "is there" asks for a colour or a shape of the scene with probability `near_no`."""
    types = domain.available_question_types(scene)
    if qweights is None or len(set(qweights[t] for t in types)) == 1:
        qtype = rng.choice(types)
    else:
        qtype = rng.choices(types, [qweights[t] for t in types])[0]
    if qtype == "is_there" and near_no != 0.5:  # (0.5: the generator's own draws, as before the option)
        return domain.question_for_scene(rng, scene, qtype, answer="yes" if rng.random() < 0.5 else "no",
                                         near=near_no)
    return domain.question_for_scene(rng, scene, qtype)


def make_example(rng: random.Random, task: str, vocab: Vocab, opts: Options,
                 word_span: tuple[int, int] = (2, 6), spoken: dict | None = None):
    """(ids, n_prompt, mix, soft) where mix lists (position, weight) of frames to blend with the blank embedding
    and soft is None or the CTC posteriors [frames, blank + words] of a real spoken question, the audio
    placeholders' soft frames; `word_span`: the frames a synthetic spoken word spans (`noisy_frames`); `spoken`:
    {question text: [posteriors, ...]} (`spoken_pool`), used for the questions it holds."""
    mix, soft = [], None
    if task == "asr":
        text, _ = domain.utterance(rng)
        frames = noisy_frames(rng, text, vocab, word_span=word_span)
        ids = vocab.prompt(domain.ASR_INSTRUCTION, n_audio=len(frames))
        ids = _fill(ids, vocab.audio, frames)
        answer = text
        mix = _mix_positions(rng, ids, vocab, bound=opts.lm_mix_floor)
    elif task in ("vqa", "svqa", "bind", "sbind"):
        if task in ("bind", "sbind"):
            qw = weights(opts.lm_bind_questions, domain.QUESTION_TYPES, 0.0)
            scene = random_layout_scene(rng, n_shapes=rng.randint(2, 3))
            while not any(qw[t] for t in domain.available_question_types(scene)):
                scene = random_layout_scene(rng, n_shapes=rng.randint(2, 3))
        else:
            qw = weights(opts.lm_question_weights, domain.QUESTION_TYPES, 1.0)
            scene = random_layout_scene(rng)
        q = scene_question(rng, scene, qw, opts.lm_near_no)
        g = hd_geometry(scene.width, scene.height, opts.crop, opts.patch)
        cells = grid_tokens(slot_grid(scene, g["f"]), g["uh"], g["uw"], vocab)
        text = q.text
        if task in ("bind", "sbind"):
            if task == "bind" and opts.lm_bind_fillers:  # the words' places vary: each word must be found by what it is
                words = text.split()
                for _ in range(rng.randint(0, opts.lm_bind_fillers)):
                    words.insert(rng.randint(0, len(words)), rng.choice(FILLERS))
                text = " ".join(words)
            if task == "sbind":
                word_span = word_frames(opts.lm_sbind_word_frames)
            task = "vqa" if task == "bind" else "svqa"
        if task == "vqa":
            ids = _fill(vocab.prompt(text, n_image=len(cells)), vocab.image, cells)
        elif spoken and q.text in spoken:
            soft = rng.choice(spoken[q.text])
            ids = vocab.prompt(domain.SPOKEN_VQA_INSTRUCTION, n_image=len(cells), n_audio=soft.shape[0])
            ids = _fill(ids, vocab.image, cells)
        else:
            frames = noisy_frames(rng, q.text, vocab, word_span=word_span)
            ids = vocab.prompt(domain.SPOKEN_VQA_INSTRUCTION, n_image=len(cells), n_audio=len(frames))
            ids = _fill(_fill(ids, vocab.image, cells), vocab.audio, frames)
            mix = _mix_positions(rng, ids, vocab, bound=opts.lm_mix_floor)
        mix += _mix_positions(rng, ids, vocab, set(vocab.cells[1:]), bound=max(0.6, opts.lm_mix_floor))
        answer = q.answer
    else:
        prompt, answer, _ = domain.text_example(rng)
        ids = vocab.prompt(prompt)
    n = len(ids)
    return ids + vocab.answer(answer), n, mix, soft


def _fill(ids: list[int], placeholder: int, values: list[int]) -> list[int]:
    it = iter(values)
    out = [next(it) if t == placeholder else t for t in ids]
    return out


def _mix_positions(rng: random.Random, ids: list[int], vocab: Vocab, among: set[int] | None = None,
                   bound: float = 0.35) -> list[tuple[int, float]]:
    """Positions of some word (or `among`) tokens to blend with the blank embedding, as an encoder's less
    confident soft tokens are: (position, weight of the token in [bound, 0.95])."""
    among = among if among is not None else set(vocab.words.values())
    if rng.random() < 0.5:
        return []
    return [(i, rng.uniform(bound, 0.95)) for i, t in enumerate(ids) if t in among and rng.random() < 0.3]


def phases(opts: Options) -> list[tuple[tuple[str, ...], int]]:
    """`opts.lm_first` ("asr:1000,vqa+svqa:800") as [(tasks, steps), ...]: the single-skill phases that open LM
    pretraining, before the task mix. A tiny LM finds how to copy a transcript, or to bind a colour to a shape,
    when that skill has the batches to itself; in the mix from the start it may never find it."""
    out = []
    for part in filter(None, (p.strip() for p in opts.lm_first.split(","))):
        name, _, steps = part.partition(":")
        tasks = tuple(name.split("+"))
        if not steps.isdigit() or any(t not in PHASE_TASKS for t in tasks):
            raise ValueError(f"lm_first: {part!r} is not task[+task...]:steps with tasks from {PHASE_TASKS}")
        out.append((tasks, int(steps)))
    return out


def batch(step: int, opts: Options, vocab: Vocab, size: int, salt: str = "train"):
    """Step `step`'s examples: the `lm_first` phases' tasks, then the task mix, one task per batch, or one per
    example with `opts.lm_mixed_batches`."""
    rng = random.Random(f"phimm-train:lm:{salt}:{opts.seed}:{step}")
    end = 0
    for phase_tasks, steps in phases(opts):
        end += steps
        if step < end:
            tasks = [rng.choice(phase_tasks) for _ in range(size)]
            break
    else:
        # bind and sbind weigh 0 unless named: they sit after the four tasks, so a mix without them draws exactly
        # as over the four alone
        tw = list(weights(opts.lm_task_weights, PHASE_TASKS, 0.0).values())
        if opts.lm_mixed_batches:
            tasks = rng.choices(PHASE_TASKS, tw, k=size)
        else:
            tasks = [rng.choices(PHASE_TASKS, tw)[0]] * size
    return [make_example(rng, task, vocab, opts) for task in tasks]


def compound_table(hf, vocab: Vocab) -> torch.Tensor:
    """The embedding matrix with each scene-cell token parametrised as its own vector plus the embeddings of its
    words, E[red_circle] + E[red] + E[circle]: what the LM learns about the words carries over to the cells (and
    back)."""
    from .common import CELL_CLASSES

    w = hf.model.embed_tokens.weight
    idx, parts = [], []
    for k, name in enumerate(CELL_CLASSES[1:], start=1):
        words = name[1:-1].split("_")
        idx.extend([vocab.cells[k]] * len(words))
        parts.extend(vocab.words[x] for x in words)
    return w.index_add(0, torch.tensor(idx), w[torch.tensor(parts)])


def length_parts(lengths: list[int], parts: int) -> list[list[int]]:
    """The indices of `lengths`, sorted by length, cut into `parts` runs of (nearly) equal size: each part is
    padded only to its own longest row."""
    if parts <= 1:
        return [list(range(len(lengths)))]  # the batch as it is
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    parts = min(parts, len(order))
    cuts = [round(k * len(order) / parts) for k in range(parts + 1)]
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def run_loss(hf, examples, vocab: Vocab, body=None, compound: bool = True, chunks: int = 1):
    """(loss, accuracy) of `make_example` examples: the mean over their answer tokens. `compound`: cell tokens
    through `compound_table` (the LM stage); False: the embeddings as they are (a base whose parametrisation is
    baked in). `chunks`: run the batch as that many parts of rows of similar length (`length_parts`); the loss
    is the same mean, in other float rounding."""
    table = compound_table(hf, vocab) if compound else hf.model.embed_tokens.weight
    cells = set(vocab.cells)

    def part_sums(part):
        def embed_fn(ids, emb):
            blank, bg = table[vocab.blank], table[vocab.cells[0]]
            for i, (row, _, mix, soft) in enumerate(part):
                for pos, w in mix:  # a word fades towards the CTC blank, a scene cell towards the background
                    emb[i, pos] = w * emb[i, pos] + (1 - w) * (bg if row[pos] in cells else blank)
                if soft is not None:  # a real spoken question: sum_k p_k E[k] per frame
                    emb[i, ids[i] == vocab.audio] = soft @ table[vocab.ctc_ids]
            return emb

        return lm_batch_loss(hf, [e[0] for e in part], [e[1] for e in part], embed_fn, table=table, body=body,
                             sums=True)

    total, right, count = 0.0, 0, 0
    for idx in length_parts([len(e[0]) for e in examples], chunks):
        s, r, n = part_sums([examples[i] for i in idx])
        total, right, count = total + s, right + r, count + n
    return total / count, right / count


def compiled_body(hf, opts: Options, vocab: Vocab, stage: Stage):
    """`torch.compile` (dynamic shapes) of `AnswerBody(hf.model)`, the decoder computing the answer positions'
    hidden states alone, once a forward and backward pass through it have worked; else None (eager, the whole
    decoder), with the reason logged. It shares `hf`'s parameters: the loss is the same, in other float rounding."""
    import time

    t0 = time.time()
    try:
        body = torch.compile(AnswerBody(hf.model), dynamic=True)
        loss, _ = run_loss(hf, batch(0, opts, vocab, 2, salt="compile"), vocab, body)
        loss.backward()
    except Exception as e:  # no C++ compiler, an unsupported op: train eagerly (same results, slower)
        stage.log(event="compile_failed", error=repr(e)[:500])
        body = None
    for p in hf.parameters():
        p.grad = None
    stage.log(event="compiled" if body is not None else "eager", s=round(time.time() - t0, 1))
    return body


def eval_acc(hf, opts: Options, vocab: Vocab, compound: bool = True, spoken: dict | None = None) -> dict:
    """Answer-token accuracy (teacher forced) on fixed batches of each task; with `spoken` (`spoken_pool`), also
    "svqa_spoken": spoken questions read from the speech encoder's posteriors of the pool's own (training) clips."""
    out = {}
    with torch.no_grad():
        for task in TASKS + (("svqa_spoken",) if spoken else ()):
            rng = random.Random(f"phimm-train:lm:eval:{opts.seed}:{task}")
            ex = [make_example(rng, task.removesuffix("_spoken"), vocab, opts,
                               spoken=spoken if task == "svqa_spoken" else None) for _ in range(32)]
            loss, acc = run_loss(hf, ex, vocab, compound=compound)
            out[task] = round(acc, 4)
    return out


# the skills the slot binding is made of: a question's answer read from the right one of several shapes; each
# asked in writing and spoken (synthetic frames: `noisy_frames`)
SKILLS = ("by_color", "by_shape", "is_there")


def eval_skills(hf, opts: Options, vocab: Vocab, n: int = 48) -> dict[str, float]:
    """The share of image questions answered right (every answer token, teacher forced) per skill, on fixed
    scenes of two or three shapes: "by_color" (what shape is the {colour} one: find the shape by its colour),
    "by_shape" (what color is the {shape}: by its shape), "is_there" (a colour and a shape bound together; half
    "yes", half "no"), written, and spoken as "{skill}_spoken" (the question as synthetic CTC frames). With one
    shape in the scene every answer is read off the only shape there is, so a LM that has not found the binding
    answers those right and these at chance."""
    out = {}
    qtypes = {"by_color": "what_shape", "by_shape": "what_color", "is_there": "is_there"}
    with torch.no_grad():
        for skill in SKILLS + tuple(f"{k}_spoken" for k in SKILLS):
            spoken, skill = skill.endswith("_spoken"), skill.removesuffix("_spoken")
            rng = random.Random(f"phimm-train:lm:skills:{opts.seed}:{skill}")
            right = 0
            for k in range(n):
                scene = random_layout_scene(rng)
                while len(scene.shapes) < 2 or qtypes[skill] not in domain.available_question_types(scene):
                    scene = random_layout_scene(rng)
                q = domain.question_for_scene(rng, scene, qtypes[skill],
                                              answer=("yes", "no")[k % 2] if skill == "is_there" else None,
                                              near=opts.lm_near_no)
                g = hd_geometry(scene.width, scene.height, opts.crop, opts.patch)
                cells = grid_tokens(slot_grid(scene, g["f"]), g["uh"], g["uw"], vocab)
                if spoken:
                    frames = noisy_frames(rng, q.text, vocab)
                    ids = vocab.prompt(domain.SPOKEN_VQA_INSTRUCTION, n_image=len(cells), n_audio=len(frames))
                    ids = _fill(_fill(ids, vocab.image, cells), vocab.audio, frames)
                else:
                    ids = _fill(vocab.prompt(q.text, n_image=len(cells)), vocab.image, cells)
                _, acc = run_loss(hf, [(ids + vocab.answer(q.answer), len(ids), [], None)], vocab)
                right += acc == 1.0
            out[skill + ("_spoken" if spoken else "")] = round(right / n, 3)
    return out


def periodic_eval(stage, hf, opts: Options, vocab, step: int) -> None:
    """Every `lm_eval_every` steps: the task accuracies and the binding's skills (`eval_skills`) in the log (not
    after the last step: `end` has them)."""
    done = step + 1
    if opts.lm_eval_every and done % opts.lm_eval_every == 0 and done < opts.lm_steps:
        stage.log(event="eval", step=done, eval_acc=eval_acc(hf, opts, vocab), skills=eval_skills(hf, opts, vocab))


def binding_step(log_path, threshold: float = 0.9) -> int | None:
    """The first logged LM step at which held-in VQA accuracy reaches `threshold` (the slot binding found), from
    the stage's periodic evals and its end; None if it never does (or nothing was logged)."""
    import json
    from pathlib import Path

    path = Path(log_path)
    if not path.is_file():
        return None
    last = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec and "event" not in rec:
            last = max(last, rec["step"] + 1)
        if rec.get("event") in ("eval", "end") and rec.get("eval_acc", {}).get("vqa", 0.0) >= threshold:
            return rec.get("step", last)
    return None


def run(run_dir, opts: Options) -> None:
    from transformers import Phi4MultimodalForCausalLM

    stage = Stage(run_dir, "lm")
    if stage.done:
        return
    phases(opts)  # a malformed lm_first or weight option stops here, before any model is built
    word_frames(opts.lm_sbind_word_frames)
    weights(opts.lm_task_weights, PHASE_TASKS, 0.0)
    weights(opts.lm_question_weights, domain.QUESTION_TYPES, 1.0)
    tok = build_tokenizer(opts)
    cfg = build_config(tok, opts)
    vocab = Vocab(tok, cfg)
    torch.manual_seed(opts.seed)
    hf = bidirectional_vision(Phi4MultimodalForCausalLM(cfg).eval())
    if opts.lm_cell_own_init != 1.0:
        with torch.no_grad():  # (after the model's init: every other weight draws as before)
            hf.model.embed_tokens.weight[torch.tensor(vocab.cells[1:])] *= opts.lm_cell_own_init
    params = [p for n, p in hf.named_parameters() if not n.startswith("model.embed_tokens_extend.")]
    for n, p in hf.named_parameters():
        p.requires_grad_(not n.startswith("model.embed_tokens_extend."))
    opt = torch.optim.AdamW(params, lr=opts.lm_lr, weight_decay=opts.lm_weight_decay, betas=(0.9, 0.98))
    start, before = stage.resume(opt, model=hf)
    if start == 0:
        stage.log(event="start", eval_acc=eval_acc(hf, opts, vocab))
    timer = Timer(before)
    body = compiled_body(hf, opts, vocab, stage) if opts.lm_compile else None
    train_loop(stage, opt, opts.lm_steps,
               with_acc(lambda step: run_loss(hf, batch(step, opts, vocab, opts.lm_batch), vocab, body,
                                              chunks=opts.lm_chunks)),
               peak=opts.lm_lr, warmup=min(100, opts.lm_steps // 10), desc="text", start=start, clip=params,
               checkpoint={"model": hf}, timer=timer,
               after_step=lambda step: periodic_eval(stage, hf, opts, vocab, step))
    final = eval_acc(hf, opts, vocab)
    stage.log(event="end", eval_acc=final, skills=eval_skills(hf, opts, vocab))
    hf.requires_grad_(False)
    with torch.no_grad():  # bake the parametrisation in: the saved (tied) embeddings are the ones trained
        hf.model.embed_tokens.weight.copy_(compound_table(hf, vocab))
    base = stage.dir / "base"
    hf.save_pretrained(str(base))
    build_processor(tok, cfg, opts).save_pretrained(base)
    stage.finish(wall_s=timer(), eval_acc=final, steps=opts.lm_steps)
    if stage.state_path.exists():
        stage.state_path.unlink()


def anneal_batch(step: int, opts: Options, vocab: Vocab, size: int, spoken: dict | None = None):
    """Step `step`'s examples of the `lm_anneal` stage: one task per batch from `lm_anneal_task_weights` (of
    `PHASE_TASKS`; a task not named weighs 0); spoken questions from `spoken` (`spoken_pool`) where it holds them."""
    rng = random.Random(f"phimm-train:lm_anneal:{opts.seed}:{step}")
    task = rng.choices(PHASE_TASKS, list(weights(opts.lm_anneal_task_weights, PHASE_TASKS, 0.0).values()))[0]
    return [make_example(rng, task, vocab, opts, word_frames(opts.lm_anneal_word_frames), spoken)
            for _ in range(size)]


def spoken_pool(run_dir, opts: Options, seed: int, n: int,
                desc: str = "lm_anneal:spoken") -> dict[str, list[torch.Tensor]]:
    """{question text: [CTC posteriors [frames, blank + words], ...]} of `n` spoken questions of the toy data
    (`seed`), read by the run's trained speech encoder as at inference: how the LM will see spoken questions."""
    from .common import fresh_model
    from .speech import load_encoder, make_clips

    proc, hf = fresh_model(opts, opts.seed + 1)
    encoder, head = load_encoder(run_dir, hf, opts)
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for feats, n_tok, text in make_clips(proc, "spoken_vqa", n, seed, desc=desc):
            out.setdefault(text, []).append(head(encoder(feats[None], None)[0, :n_tok]).softmax(-1))
    return out


def run_pool(run_dir, opts: Options) -> None:
    """Stage `spoken_pool`: `spoken_pool` of `lm_anneal_spoken` questions, saved as `{run}/spoken_pool/pool.pt` for
    `lm_anneal`. Its own stage so that the recipe can make it in whichever worker is free first."""
    stage = Stage(run_dir, "spoken_pool")
    if stage.done:
        return
    n = opts.lm_anneal_spoken if opts.lm_anneal_steps > 0 else 0
    if n > 0:
        if not (Path(run_dir) / "speech_encoder" / "done.json").is_file():
            raise RuntimeError(f"{run_dir}: lm_anneal_spoken={n} reads spoken questions through the trained speech "
                               "encoder, and the speech_encoder stage has not finished: run it first, or set "
                               "lm_anneal_spoken=0")
        pool = spoken_pool(run_dir, opts, opts.seed + 55, n)
        torch.save(pool, stage.dir / "pool.pt")
        stage.log(event="end", clips=n, questions=len(pool))
    else:
        stage.log(event="skipped", reason="lm_anneal_spoken or lm_anneal_steps is 0")
    stage.finish(clips=n)


def load_pool(run_dir, opts: Options) -> dict | None:
    """The `spoken_pool` stage's pool (None with lm_anneal_spoken=0); RuntimeError saying what to run if that
    stage has not finished."""
    if not opts.lm_anneal_spoken:
        return None
    path = stage_file(run_dir, "spoken_pool", "pool.pt")
    if path is None:
        raise RuntimeError(f"{run_dir}: lm_anneal_spoken={opts.lm_anneal_spoken} trains on spoken questions read "
                           "through the trained speech encoder, and the spoken_pool stage has not finished: run it "
                           "first (after speech_encoder), or set lm_anneal_spoken=0")
    return torch.load(path, weights_only=True)


@functools.lru_cache(maxsize=None)
def word_frames(spec: str) -> tuple[int, int]:
    """"min-max" (1 <= min <= max) as a tuple; ValueError saying what is wrong otherwise."""
    lo, _, hi = spec.partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi)):
        raise ValueError(f"lm_anneal_word_frames: {spec!r} is not min-max frames with 1 <= min <= max")
    return int(lo), int(hi)


def run_anneal(run_dir, opts: Options) -> None:
    """Stage `lm_anneal`: the LM stage's base trains `lm_anneal_steps` more steps, decoder only (embeddings and
    the tied head frozen: the cell parametrisation is baked in), from a fresh AdamW at `lm_anneal_lr` (cosine),
    on the `lm_anneal_task_weights` mix; saved as `{run}/lm_anneal/base`, the base of every later stage."""
    stage = Stage(run_dir, "lm_anneal")
    if stage.done:
        return
    if opts.lm_anneal_steps <= 0:
        stage.log(event="skipped", reason="lm_anneal_steps is 0")
        stage.finish(wall_s=0.0, steps=0)
        return
    weights(opts.lm_anneal_task_weights, PHASE_TASKS, 0.0)
    word_frames(opts.lm_anneal_word_frames)
    spoken = load_pool(run_dir, opts)
    hf, proc = load_base(run_dir)  # lm/base: this stage has not finished
    vocab = Vocab(proc.tokenizer, hf.config)
    params = [p for n, p in hf.named_parameters() if n.startswith(("model.layers.", "model.norm."))]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=opts.lm_anneal_lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, before = stage.resume(opt, model=hf)
    if start == 0:
        stage.log(event="start", eval_acc=eval_acc(hf, opts, vocab, compound=False, spoken=spoken))
    timer = Timer(before)
    body = compiled_body(hf, opts, vocab, stage) if opts.lm_compile else None
    steps = opts.lm_anneal_steps
    train_loop(stage, opt, steps,
               with_acc(lambda step: run_loss(hf, anneal_batch(step, opts, vocab, opts.lm_batch, spoken), vocab,
                                              body, compound=False, chunks=opts.lm_chunks)),
               peak=opts.lm_anneal_lr, warmup=min(50, steps // 10), desc="anneal", start=start, clip=params,
               checkpoint={"model": hf}, timer=timer)
    final = eval_acc(hf, opts, vocab, compound=False, spoken=spoken)
    stage.log(event="end", eval_acc=final)
    hf.requires_grad_(False)
    base = stage.dir / "base"
    hf.save_pretrained(str(base))
    proc.save_pretrained(base)
    stage.finish(wall_s=timer(), eval_acc=final, steps=steps)
    if stage.state_path.exists():
        stage.state_path.unlink()
