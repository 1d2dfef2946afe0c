"""Where spoken image questions go wrong: held-out spoken questions scored (teacher forced, whole answer right) on
inputs that take the trained parts away one at a time.

    python -m phimm.train.probe --run runs/embedded [--n 150]

Rows, each per question type:
- `base, slot grid, posteriors`: the frozen base LM alone, the image as its exact slot grid (no vision encoder),
  the question as sum_k p_k E[k] of the trained speech encoder's CTC posteriors (what the projectors are fitted to
  emit);
- `base, slot grid, argmax frames`: the same with each frame's most likely CTC class as a plain token;
- `trained route`: the image projector, the vision-speech projector and the vision LoRA (the model as exported),
  once the stages that make them have finished.
Held-out split: the eval stage's (`heldout=True`, seed + 7919).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from adapters import NO_ADAPTER

from ..toy import domain
from .common import (Options, Vocab, add_train_lora, train_rows, apply_parts, grid_tokens, lm_batch_loss, load_base,
                     load_lora_state, setup_threads)


def probe(run_dir: Path, n: int = 150) -> dict[str, dict[str, float]]:
    """{row: {question type: accuracy, "all": accuracy}} (rows as in the module's doc)."""
    from .evaluate import HELDOUT_SEED_OFFSET
    from .speech import encode, load_encoder
    from .vision import cache_features, image_embeds, make_images

    opts = Options.load(run_dir / "options.json")
    hf, proc = load_base(run_dir)
    trained = all((run_dir / s / "done.json").is_file() for s in ("vision", "vision_speech"))
    apply_parts(hf, run_dir, ["vision_encoder", "vision", "vision_speech"] if trained else [])
    vocab = Vocab(proc.tokenizer, hf.config)
    encoder, head = load_encoder(run_dir, hf, opts)
    items = make_images(proc, opts, "spoken_vqa", n, opts.seed + HELDOUT_SEED_OFFSET, heldout=True,
                        keep_audio=True, desc="probe:data")
    encoded = encode(encoder, head, [(it["audio"].features, it["audio"].num_tokens, None) for it in items])
    table = hf.model.embed_tokens.weight
    ctc = table[vocab.ctc_ids]
    ie, ae = hf.model.embed_tokens_extend.image_embed, hf.model.embed_tokens_extend.audio_embed
    names = ["base, slot grid, posteriors", "base, slot grid, argmax frames"] + (["trained route"] if trained else [])
    rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in names}
    with torch.no_grad():
        if trained:
            cache_features(ie, items)
        for it, (h, logp, _) in zip(items, encoded):
            p = logp.exp()
            grid = table[torch.tensor(grid_tokens(it["grid"], it["uh"], it["uw"], vocab))]
            rows["base, slot grid, posteriors"].append((grid, p @ ctc))
            rows["base, slot grid, argmax frames"].append((grid, ctc[p.argmax(-1)]))
            if trained:
                vs = ae.down_proj_for_vision_speech(nn.functional.gelu(ae.up_proj_for_vision_speech(h)))
                rows["trained route"].append((image_embeds(ie, [it], hf.config.hidden_size, vocab.image), vs))

    def right(image: torch.Tensor, audio: torch.Tensor, it: dict) -> bool:
        prompt = vocab.prompt(domain.SPOKEN_VQA_INSTRUCTION, n_image=image.shape[0], n_audio=audio.shape[0])

        def embed(ids, emb):
            emb = emb.clone()
            emb[0, ids[0] == vocab.image] = image
            emb[0, ids[0] == vocab.audio] = audio
            return emb

        return lm_batch_loss(hf, [prompt + vocab.answer(it["answer"])], [len(prompt)], embed)[1] == 1.0

    out = {}
    active = NO_ADAPTER  # the base model alone until the trained route's adapter is attached
    for name, inputs in rows.items():
        if name == "trained route":
            active = train_rows(opts.lora_r)
            lora_path = run_dir / "vision_speech" / "lora.pt"
            loras = add_train_lora(hf, opts.lora_r)
            load_lora_state(loras, torch.load(lora_path if lora_path.is_file() else run_dir / "vision" / "lora.pt",
                                              weights_only=True))
        by_type: dict[str, list[bool]] = {}
        with torch.no_grad(), active.active():
            for (image, audio), it in zip(inputs, items):
                by_type.setdefault(it["question_type"], []).append(right(image, audio, it))
        scores = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_type.items())}
        scores["all"] = round(sum(sum(v) for v in by_type.values()) / len(items), 4)
        out[name] = scores
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phimm.train.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder of `python -m phimm.train`")
    p.add_argument("--n", type=int, default=150, help="held-out spoken questions")
    args = p.parse_args(argv)
    setup_threads()
    run_dir = Path(args.run)
    for stage in ("lm", "speech_encoder"):
        if not (run_dir / stage / "done.json").is_file():
            raise SystemExit(f"{run_dir}: stage {stage} has not finished; the probe needs it")
    result = probe(run_dir, args.n)
    for name, scores in result.items():
        print(f"{name:32s} " + "  ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
