"""The recipe's options, grouped by the stage that reads them, and the presets.

`Options` is one flat dataclass: `--set key=value` names a field (`parse_option`), and `{run}/options.json` holds
every field by name (a resumed run reuses it). `GROUPS` says which stage reads which option; the defaults are the
shipped model's (`phimm/embedded/README.md`, "Option history", says how some of them were chosen).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class Options:
    """Everything a run depends on (written to `{run}/options.json`; a resumed run reuses it)."""

    # ---- the run
    seed: int = 0
    workers: int = 2  # stage processes at a time (`--workers`)

    # ---- the model (built by the lm stage; the encoder stages build the same towers apart)
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_intermediate: int = 384
    vocab: int = 464
    # each of the domain's two instructions this many times in the tokenizer's corpus, so that they become a few
    # whole-word tokens (0: not added)
    tokenizer_prompts: int = 300
    vision_hidden: int = 96
    vision_layers: int = 4
    audio_hidden: int = 96
    audio_blocks: int = 3
    audio_conv_channels: int = 32
    crop: int = 128
    patch: int = 16
    lora_r: int = 8  # every LoRA the stages train

    # ---- stage lm (batch, compile, chunks and question weights: lm_anneal too)
    # (v28: 14000 with the 4500 steps of its `lm_first` phases; v22 had 11500 with 1000)
    lm_steps: int = 14000
    # torch.compile the LM's decoder for its stage; falls back to eager (with the reason logged) if compiling fails
    lm_compile: bool = True
    lm_batch: int = 32
    lm_lr: float = 2e-3
    lm_weight_decay: float = 0.1  # AdamW weight decay of the LM stage
    # how often each task makes a batch after the `lm_first` phases (lm.PHASE_TASKS: name:weight, relative; a task
    # not named weighs 0), e.g. "...,sbind:0.1" keeps spoken binding questions in the mix
    # (v28: spoken binding questions stay in the mix after their phases, so that the skill is not forgotten)
    lm_task_weights: str = "asr:0.25,vqa:0.35,svqa:0.3,text:0.1,sbind:0.1"
    # how often each type of scene question is asked when the scene allows it (domain.QUESTION_TYPES: name:weight,
    # relative; a type not named weighs 1), e.g. "is_there:2" ("is there": colour and shape bound together)
    lm_question_weights: str = "is_there:2,what_color:1.5,what_shape:1.5"
    # of the "is there" questions answered "no", the share asking for a colour or a shape the scene has (the
    # domain's generator: 0.5)
    lm_near_no: float = 0.8
    lm_mix_floor: float = 0.35  # the faintest a soft word / cell token is made in LM pretraining
    # each scene-cell token is its own vector + E[colour] + E[shape] (`lm.compound_table`); its own vector starts
    # at this multiple of its random init. 0: a cell starts as exactly its two words, so the LM's word-matching
    # finds a shape by its colour or a colour by its shape from the start
    # (LM stage alone, per-skill held-in evals: seed 1 answered 90 % of its image questions at step 4500 with 0,
    # at 7500 with 1; seed 2 had all three skills of the binding by step 4400 with 0, none but one by 3400 with 1)
    lm_cell_own_init: float = 0.0
    # the question types of the `bind` and `sbind` tasks an `lm_first` phase may name (lm.PHASE_TASKS; name:weight,
    # a type not named weighs 0)
    lm_bind_questions: str = "what_shape:1,what_color:1"
    # each written `bind` question gets 0..this many filler words ("a", "the", ...) at random places, so that no
    # word of it sits at a fixed distance from the answer (0: none)
    lm_bind_fillers: int = 0
    # the frames a word of an `sbind` question spans ("min-max", as `lm_anneal_word_frames`): "1-1" puts the words
    # one after another with no blank between, the written question in the audio placeholders; "2-6", the default,
    # as every other synthetic spoken question. `lm_first=asr:1000,bind+sbind:2000` with "1-2" gave seed 0 every
    # target (spoken 92.7 %), seed 1's LM never the spoken binding; `...,sbind:1500` after it gave seeds 0-2 every
    # binding skill but cost ASR (3.5-8.7 %; model card, "Half spoken, then spoken only (v25)"); with `sbind` kept
    # in the task mix after the phases (v28, the default) seeds 0, 1 and 2 met every target
    lm_sbind_word_frames: str = "1-2"
    # single-skill phases before the task mix (lm.phases), e.g. "asr:1000,bind:2000": transcription alone, then the
    # slot binding alone (`bind`: written questions on scenes of two or three shapes, each answer read from the
    # right shape; `sbind`: the same spoken). `bind:2000` makes every seed find the written binding by step 3000
    # (without: step 3500, 7500 or never), but not the spoken one: the v23 run of seed 0 met VQA (97.5 %), not
    # spoken questions (86.7 %; model card, "The other late skill"). The default (v28): transcription alone, then
    # written and spoken binding questions, then spoken ones alone, then the task mix with `sbind` in it
    lm_first: str = "asr:1000,bind+sbind:2000,sbind:1500"
    lm_mixed_batches: bool = False  # one task per example instead of per batch
    # the LM stages run a batch as this many parts of rows of similar length (less padding; the loss is the
    # batch's mean over its answer tokens all the same)
    lm_chunks: int = 2
    # every this many LM steps, the held-in task accuracies (`eval_acc`, 32 examples a task) go to the stage's log
    # as {"event": "eval"}: the step at which VQA rises shows when the run finds the slot binding (0: off)
    lm_eval_every: int = 500

    # ---- stages spoken_pool and lm_anneal: after the LM stage, the decoder alone (embeddings frozen) trains
    # `lm_anneal_steps` more steps from a fresh optimiser at a lower peak rate, on its own task mix (0 steps: the
    # stage does nothing)
    lm_anneal_steps: int = 1500
    lm_anneal_lr: float = 7e-4
    # (lm.PHASE_TASKS: name:weight, relative; a task not named weighs 0)
    lm_anneal_task_weights: str = "asr:0.1,vqa:0.2,svqa:0.6,text:0.1"
    # the frames a word spans in the anneal's noisy transcripts ("min-max"; the LM stage: 2-6)
    lm_anneal_word_frames: str = "2-6"
    # > 0: this many spoken questions (training voices) go through the trained speech encoder (stage spoken_pool),
    # and the anneal's spoken-question examples read their CTC posteriors as soft frames (sum_k p_k E[k], what the
    # projectors are fitted to emit) instead of synthetic noisy transcripts
    lm_anneal_spoken: int = 3000

    # ---- stage speech_encoder
    # training clips (the speech stage fits on 2500 more, or on the first 2500 of them). With 6000 the encoder saw
    # each clip 12 times and read held-out voices at 4.3 % CTC WER (training clips: 1.4 %); with 12000, 1.6 %
    asr_samples: int = 12000
    # (seed 2's encoder, 12000 clips and SortaGrad: CTC loss still falling at step 3000, dev CTC WER 6.7 %; the
    # speech chain has the time beside the LM stage)
    # (v28: 6000, the time the LM stage's 14000 steps leave the speech chain beside it)
    ctc_steps: int = 6000
    ctc_batch: int = 24
    # > 0: the first this many CTC steps take the shortest clips in length order (SortaGrad), the rest as usual.
    # Without it a seed can sit on the CTC plateau (mostly blanks) for most of its steps: seed 2's encoder read
    # its dev clips at 71.8 % CTC WER (12000 clips), 6.7 % with 200 sorted steps (seed 0: 2.1 -> 2.7 %)
    ctc_sortagrad_steps: int = 200
    # > 0: each training clip's mel axis is stretched by a random factor in [1 - w, 1 + w] (vocal tract length
    # perturbation: voices the synthesiser does not make)
    ctc_freq_warp: float = 0.0

    # ---- stage speech (proj_steps // 3 and e2e_batch: the vision stage too; e2e_batch: vision_speech too)
    proj_steps: int = 1500
    speech_e2e_steps: int = 600
    e2e_batch: int = 16
    # the speech stage fits its projector and LoRA on clips the speech encoder never trained on (the same voices,
    # the utterances after its `asr_samples`), read as at inference; False: on its first training clips, whose
    # posteriors are sharper than any new clip's
    speech_fit_unseen: bool = True

    # ---- stage vision_encoder
    cell_steps: int = 13500
    cell_batch: int = 16
    cell_lr: float = 1e-3
    # each drawn training scene serves this many consecutive vision-encoder steps (a step draws
    # ceil(cell_batch / cell_reuse) new ones)
    cell_reuse: int = 1
    # > 0: the share of the vision encoder's training scenes drawn with a white shape on a light background
    cell_faint: float = 0.5

    # ---- stage vision
    vqa_samples: int = 3000
    vision_e2e_steps: int = 1000

    # ---- stages vision_speech_data and vision_speech
    svqa_samples: int = 2500
    vs_steps: int = 1000
    vs_lora_lr: float = 2e-3  # > 0: the vision-speech stage fine-tunes the vision LoRA too (spoken + written)

    # ---- stage eval (held-out requests per task; eval_asr // 2 and eval_vqa: the encoder stages' dev sets too)
    eval_asr: int = 150
    eval_vqa: int = 200
    eval_svqa: int = 150
    eval_text: int = 60

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Options":
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# which part of the recipe reads which option (every field once, in the class's order)
GROUPS: dict[str, tuple[str, ...]] = {
    "run": ("seed", "workers"),
    "model": ("lm_hidden", "lm_layers", "lm_heads", "lm_kv_heads", "lm_intermediate", "vocab", "tokenizer_prompts",
              "vision_hidden", "vision_layers", "audio_hidden", "audio_blocks", "audio_conv_channels", "crop", "patch",
              "lora_r"),
    "lm": ("lm_steps", "lm_compile", "lm_batch", "lm_lr", "lm_weight_decay", "lm_task_weights", "lm_question_weights",
           "lm_near_no", "lm_mix_floor", "lm_cell_own_init", "lm_bind_questions", "lm_bind_fillers",
           "lm_sbind_word_frames",
           "lm_first", "lm_mixed_batches", "lm_chunks", "lm_eval_every"),
    "lm_anneal": ("lm_anneal_steps", "lm_anneal_lr", "lm_anneal_task_weights", "lm_anneal_word_frames",
                  "lm_anneal_spoken"),
    "speech_encoder": ("asr_samples", "ctc_steps", "ctc_batch", "ctc_sortagrad_steps", "ctc_freq_warp"),
    "speech": ("proj_steps", "speech_e2e_steps", "e2e_batch", "speech_fit_unseen"),
    "vision_encoder": ("cell_steps", "cell_batch", "cell_lr", "cell_reuse", "cell_faint"),
    "vision": ("vqa_samples", "vision_e2e_steps"),
    "vision_speech": ("svqa_samples", "vs_steps", "vs_lora_lr"),
    "eval": ("eval_asr", "eval_vqa", "eval_svqa", "eval_text"),
}
assert sum(GROUPS.values(), ()) == tuple(f.name for f in fields(Options)), "GROUPS must list every option once"


PRESETS: dict[str, dict] = {
    "full": {},
    # the shipped model's sizes and task mix with a quarter of every stage's steps (about a quarter of the time):
    # for comparing seeds and option changes before a full run (`python -m phimm.train.seeds`)
    "reduced": dict(lm_steps=3500, lm_first="asr:250,bind+sbind:500,sbind:375", lm_anneal_steps=400, ctc_steps=1500,
                    proj_steps=400, speech_e2e_steps=150, cell_steps=3400, vision_e2e_steps=250, vs_steps=250,
                    eval_asr=90, eval_vqa=100, eval_svqa=90, eval_text=30),
    # the end-to-end test: a few hundred samples, tiny steps; the LM's task mix as before v28 (its 220 steps have no
    # room for binding phases, and the test's checks were set on this mix)
    "test": dict(lm_hidden=64, lm_layers=2, lm_intermediate=128, vision_hidden=32, vision_layers=1, audio_hidden=48,
                 audio_blocks=1, audio_conv_channels=16, lm_steps=220, lm_first="asr:40", lm_compile=False,
                 lm_task_weights="asr:0.25,vqa:0.35,svqa:0.3,text:0.1", lm_sbind_word_frames="2-6",
                 lm_anneal_steps=30, lm_anneal_spoken=48,
                 lm_batch=16, asr_samples=240, ctc_steps=120,
                 ctc_batch=16, proj_steps=300, speech_e2e_steps=25, e2e_batch=8, vqa_samples=160, cell_steps=80,
                 cell_batch=16, vision_e2e_steps=25, svqa_samples=64, vs_steps=20, eval_asr=16, eval_vqa=24,
                 eval_svqa=16, eval_text=12),
}


def parse_option(opts: Options, key: str, value: str):
    """`--set key=value` as the option's own type (booleans: true/false, 1/0, yes/no); SystemExit saying what is
    wrong for an unknown key or a value of the wrong type."""
    known = type(opts).__dataclass_fields__
    if key not in known:
        listing = "; ".join(f"{group}: {', '.join(names)}" for group, names in GROUPS.items())
        raise SystemExit(f"unknown option {key!r}; known: {listing}")
    kind = type(getattr(opts, key))
    if kind is bool:
        truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        word = truth.get(value.strip().lower())
        if word is None:
            raise SystemExit(f"option {key} is a boolean; got {value!r} (use true or false)")
        return word
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"option {key} is {kind.__name__}; got {value!r}") from None


def options_for(preset: str, seed: int, sets=()) -> Options:
    """The options of a new run: `preset`'s, `seed`, then each "key=value" of `sets` (`parse_option`)."""
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    opts = Options(seed=seed, **PRESETS[preset])
    for kv in sets:
        k, _, v = kv.partition("=")
        setattr(opts, k, parse_option(opts, k, v))
    return opts
