"""Training a composition's projectors and adapters on its frozen base (`phimm train --composition DIR`).

The stages are the recipe's adapter stages, for any composition (`phimm.compose`) on the toy domain:

    vision          vision projector + a `vision` LoRA, end to end on image questions (toy VQA)
    speech          speech projector + a `speech` LoRA, end to end on transcription (toy ASR)
    vision_speech   the vision-speech projector, on spoken questions about images, the rows on `vision`

Each trains the LM loss of the answer (and its end token) through the frozen base and encoders, prompts rendered
as `phimm eval` renders them (chat messages). The result is written as a composition (`phimm.load(export)`), with
the trained adapters and projectors; measure it with `phimm eval`.

    python -m phimm.train.composition --toy-parts runs/comp      # a composition of toy parts to train (below)
    phimm train --composition runs/comp/model --export runs/comp/trained [--stages vision,speech] [--set steps=400]

`--toy-parts` writes the one small trained model this machine has as a Hugging Face causal LM — the embedded
model's language model, which is a Phi-3 decoder, as a `Phi3ForCausalLM` (its text logits equal the embedded
model's) — beside a SigLIP and a Whisper encoder with random weights (no pretrained encoder can be had here), and
composes them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import PhimmError

STAGES = ("vision", "speech", "vision_speech")
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)"
DEFAULTS = {"steps": 300, "batch": 8, "lr": 2e-3, "rank": 16, "examples": 1200, "seed": 0}


# ---- toy parts -------------------------------------------------------------------------------------------------


def export_embedded_lm(out: str | Path) -> Path:
    """The embedded model's language model as a `Phi3ForCausalLM` folder (weights, config, tokenizer)."""
    import phimm
    from transformers import Phi3Config, Phi3ForCausalLM

    pipe = phimm.load(threads=1)
    c = pipe.model.config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters")
    model = Phi3ForCausalLM(Phi3Config(**{k: getattr(c, k) for k in keys})).eval()
    state = {k[len("hf."):]: v for k, v in pipe.model.state_dict().items() if k.startswith("hf.")}
    keep = {k: v for k, v in state.items() if k.startswith("model.layers.") or k in (
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the embedded LM does not map onto Phi3ForCausalLM: {missing[:3]} {unexpected[:3]}")
    out = Path(out)
    model.save_pretrained(str(out))
    pipe.processor.tokenizer.save_pretrained(str(out))
    pipe.close()
    return out


def make_toy_parts(root: str | Path, seed: int = 0) -> Path:
    """`root/{base,siglip,whisper}` and the composition of them, saved at `root/model`."""
    from transformers import (SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel, WhisperConfig,
                              WhisperFeatureExtractor, WhisperModel)

    import phimm

    root = Path(root)
    base = export_embedded_lm(root / "base")
    torch.manual_seed(seed)
    vision = root / "siglip"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=112, patch_size=14)).save_pretrained(str(vision))
    SiglipImageProcessor(size={"height": 112, "width": 112}).save_pretrained(str(vision))
    speech = root / "whisper"
    WhisperModel(WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                               max_source_positions=400, max_target_positions=16, vocab_size=64, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(str(speech))
    WhisperFeatureExtractor(feature_size=80, chunk_length=8).save_pretrained(str(speech))
    pipe = phimm.compose(base=base, vision=vision, speech=speech, seed=seed, threads=1)
    pipe.save_pretrained(root / "model")
    pipe.close()
    return root / "model"


# ---- data ------------------------------------------------------------------------------------------------------


def examples(stage: str, n: int, seed: int):
    """(request, answer) pairs of the toy domain's training split, rendered as `phimm eval` renders them."""
    from phimm.eval.asr import DEFAULT_PROMPT as ASR_PROMPT
    from phimm.eval.vqa import DEFAULT_SPOKEN_PROMPT
    from phimm.toy import data

    from ..types import Request

    kind = {"vision": "vqa", "speech": "asr", "vision_speech": "spoken_vqa"}[stage]
    out = []
    for s in data.iter_split(kind, n, seed, sample_rate=16000):
        if stage == "vision":
            parts = [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}]
            answer = s["answer"]
        elif stage == "speech":
            parts = [{"type": "audio", "audio": (s["audio"], s["sample_rate"])}, {"type": "text", "text": ASR_PROMPT}]
            answer = s["text"]
        else:
            parts = [{"type": "image", "image": s["image"]}, {"type": "audio", "audio": (s["audio"], s["sample_rate"])},
                     {"type": "text", "text": DEFAULT_SPOKEN_PROMPT}]
            answer = s["answer"]
        out.append((Request(messages=[{"role": "user", "content": parts}]), answer))
    return out


# ---- training --------------------------------------------------------------------------------------------------


def _trainable_lora(model, r: int) -> tuple[dict, int]:
    """A fresh trainable adapter on every decoder projection (peft's init: B = 0): (layers, its index)."""
    from adapters import wrap_targets

    paths = [p for p, m in model.hf.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(LORA_TARGETS, p)]
    paths += [p for p, m in model._targets.items() if re.fullmatch(LORA_TARGETS, p) and p not in paths]
    layers = wrap_targets(model.hf, sorted(set(paths)))
    n = len(model.adapter_names)  # the trainable one comes after the loaded ones, at the same index everywhere
    for mod in layers.values():
        if len(mod.lora_a) < n:
            mod.set_adapter_weights(n - 1, None, None, 1.0)
        if mod.add_trainable(r, 2.0 * r) != n:
            raise RuntimeError("a layer holds more adapters than the model has loaded")
    return layers, n


def _drop_trainable(layers: dict) -> dict:
    """Take the trained adapter off the layers: {path: (A, B)}."""
    out = {}
    for path, mod in layers.items():
        i = mod.trainable
        out[path] = (mod.lora_A.detach().clone(), mod.lora_B.detach().clone())
        del mod.lora_a[i], mod.lora_b[i], mod.lora_scale[i]
        mod.trainable = None
        del mod.lora_A, mod.lora_B
        mod._stacked = None
    return out


def _batch_loss(pipe, batch, rows, projector_for_row) -> torch.Tensor:
    """Mean LM loss over the answer tokens (and the end token) of `batch` [(prepared, answer ids)]."""
    model = pipe.model
    k = len(batch)
    seqs = [p.input_ids + a for p, a in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((k, width), pipe.pad_token_id, dtype=torch.long)
    labels = torch.full((k, width), -100, dtype=torch.long)
    mask = torch.zeros(k, width, dtype=torch.long)
    for j, ((p, a), s) in enumerate(zip(batch, seqs)):
        ids[j, :len(s)] = torch.tensor(s)
        labels[j, len(p.input_ids):len(s)] = torch.tensor(a)
        mask[j, :len(s)] = 1
    media = [(p.images, p.audios, projector_for_row(p)) for p, _ in batch]
    embeds = model.embed_inputs(ids, media, rows)
    with rows.active():
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model.hf.lm_head(hidden[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def train_stage(pipe, stage: str, opts: dict, log) -> dict:
    """Train one stage in place on `pipe`'s model; returns the trained adapter (vision, speech) and the log."""
    from adapters import LoraAdapter, RowAdapters
    from routers import AudioProjector, projector_for

    model = pipe.model
    torch.manual_seed(opts["seed"])
    model.feature_cache.capacity = 0  # features must carry gradients
    eos = pipe.eos_token_ids[0]
    pairs, skipped = [], 0
    for req, answer in examples(stage, opts["examples"], opts["seed"]):
        try:
            prepared = pipe.processor.prepare(req)
        except PhimmError:  # e.g. a clip longer than the speech encoder's window
            skipped += 1
            continue
        pairs.append((prepared, pipe.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]))
    if not pairs:
        raise ValueError(f"stage {stage}: none of the {skipped} examples fit this composition")
    params: list[nn.Parameter] = []
    layers = None
    if stage == "vision":
        proj = model.vision_projector
    else:
        proj = model.speech_projectors[AudioProjector.SPEECH.value if stage == "speech"
                                       else AudioProjector.VISION_SPEECH.value]
    proj.requires_grad_(True).train()
    params += list(proj.parameters())
    if stage in ("vision", "speech"):
        layers, index = _trainable_lora(model, opts["rank"])
        params += [p for m in layers.values() for p in (m.lora_A, m.lora_B)]
        rows = RowAdapters(uniform=index, ranks=())
    else:
        rows = model.row_adapters(["vision"]) if "vision" in model.adapter_info else RowAdapters()
    opt = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=0.0)
    warm = max(1, opts["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, opts["steps"])))))  # warm-up, then cosine to zero
    rng = random.Random(opts["seed"])
    t0 = time.perf_counter()
    losses = []
    with torch.enable_grad():
        for step in range(opts["steps"]):
            batch = rng.sample(pairs, min(opts["batch"], len(pairs)))
            loss = _batch_loss(pipe, batch, rows, lambda p: projector_for(p.route_input))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 25 == 0 or step == opts["steps"] - 1:
                log({"stage": stage, "step": step, "loss": sum(losses[-25:]) / len(losses[-25:]),
                     "s": round(time.perf_counter() - t0, 1)})
    proj.requires_grad_(False).eval()
    out = {"stage": stage, "steps": opts["steps"], "examples": len(pairs), "skipped": skipped,
           "first_loss": losses[0], "final_loss": sum(losses[-25:]) / len(losses[-25:]),
           "seconds": time.perf_counter() - t0}
    if layers is not None:
        weights = _drop_trainable(layers)
        adapter = LoraAdapter(stage, opts["rank"], 2.0 * opts["rank"], weights, 0.0, LORA_TARGETS)
        if stage in model.adapter_info:  # retrained: the new one replaces it
            raise ValueError(f"the composition already has an adapter {stage!r}; train a fresh one")
        model.add_adapter(adapter)
    model.feature_cache.capacity = 32
    return out


def run_composition(composition: str | Path, export: str | Path, stages=STAGES, overrides: dict | None = None,
                    threads: int = 1) -> dict:
    """Train `stages` of the saved composition at `composition`; write the result to `export`."""
    import phimm

    opts = {**DEFAULTS, **(overrides or {})}
    pipe = phimm.load(composition, threads=threads)
    export = Path(export)
    export.mkdir(parents=True, exist_ok=True)
    log_file = (export / "train_log.jsonl").open("w")

    def log(rec):
        print(json.dumps(rec), flush=True)
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    report = {"options": opts, "stages": []}
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; the stages are {STAGES}")
        report["stages"].append(train_stage(pipe, stage, opts, log))
    from ..compose import default_router

    pipe.router = default_router(pipe.model.adapter_names)
    pipe.save_pretrained(export)
    (export / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log_file.close()
    pipe.close()
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.train.composition", description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-parts", default=None, help="write toy parts and their composition under this folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.toy_parts:
        print(make_toy_parts(args.toy_parts, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
