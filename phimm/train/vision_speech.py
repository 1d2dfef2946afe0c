"""Stage `vision_speech`: the vision-speech projector for spoken questions about images.

It starts as a copy of the trained speech projector (both emit the same soft tokens: the LM embeddings of the
CTC encoder's blank / words), then is fine-tuned end to end with the LM loss on spoken image questions, with the
vision projector, both encoders and the base LM frozen. The vision LoRA, which both image routes share, is frozen
too (`vs_lora_lr=0`) or fine-tuned with it on spoken and written questions in turn (`{run}/vision_speech/lora.pt`
then replaces the vision stage's for export).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..toy import domain
from .common import (VS_PROJ, Options, Stage, Timer, Vocab, add_train_lora, train_rows, apply_parts, lm_batch_loss,
                     load_base, load_lora_state, lora_state, remove_train_lora, save_parts, stage_file)
from .trainer import train_loop, with_acc
from .vision import cache_features, image_embeds, make_images, spoken_audio, vqa_loss


def run_data(run_dir, opts: Options) -> None:
    """Stage `vision_speech_data`: the spoken questions of `vision_speech` synthesised and processed ahead, in
    `{run}/vision_speech_data/audio.pt`: with nothing trained to wait for, the recipe makes them beside other
    stages."""
    from .common import build_config, build_processor, build_tokenizer

    stage = Stage(run_dir, "vision_speech_data")
    if stage.done:
        return
    tok = build_tokenizer(opts)
    proc = build_processor(tok, build_config(tok, opts), opts)
    clips = spoken_audio(proc, opts.svqa_samples, opts.seed, desc="vision_speech_data")
    torch.save({"features": [c.features for c in clips], "num_tokens": [c.num_tokens for c in clips],
                "seconds": [c.seconds for c in clips]}, stage.dir / "audio.pt")
    stage.log(event="end", clips=len(clips))
    stage.finish(clips=len(clips))


def load_audio(run_dir, opts: Options) -> list | None:
    """`vision_speech_data`'s clips, or None where that stage has not run (`vision_speech` makes them itself)."""
    from ..types import AudioInput

    path = stage_file(run_dir, "vision_speech_data", "audio.pt")
    if path is None:
        return None
    d = torch.load(path, weights_only=True)
    if len(d["features"]) < opts.svqa_samples:
        return None
    return [AudioInput(f, n, sec) for f, n, sec in zip(d["features"], d["num_tokens"], d["seconds"])]


def run(run_dir, opts: Options) -> None:
    stage = Stage(run_dir, "vision_speech")
    if stage.done:
        return
    timer = Timer()
    hf, proc = load_base(run_dir)
    apply_parts(hf, run_dir, ["speech_encoder", "speech", "vision_encoder", "vision"])
    vocab = Vocab(proc.tokenizer, hf.config)
    ie = hf.model.embed_tokens_extend.image_embed
    ae = hf.model.embed_tokens_extend.audio_embed
    made = load_audio(run_dir, opts)
    stage.log(event="data", audio="vision_speech_data" if made is not None else "synthesised here")
    items = make_images(proc, opts, "spoken_vqa", opts.svqa_samples, opts.seed, desc="vision_speech:data",
                        keep_audio=True, audio=made)
    cache_features(ie, items)
    with torch.no_grad():
        for it in items:
            a = it["audio"]
            it["enc"] = ae.encoder(a.features[None], None)[0, : a.num_tokens]
            it["img_emb"] = image_embeds(ie, [it], hf.config.hidden_size, vocab.image)
    up, down = ae.up_proj_for_vision_speech, ae.down_proj_for_vision_speech
    with torch.no_grad():
        up.load_state_dict(ae.up_proj_for_speech.state_dict())
        down.load_state_dict(ae.down_proj_for_speech.state_dict())
    loras = add_train_lora(hf, opts.lora_r)
    with train_rows(opts.lora_r).active():  # every forward below on the adapter being trained
        load_lora_state(loras, torch.load(run_dir / "vision" / "lora.pt", weights_only=True))
        lparams = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
        for m in loras.values():
            m.requires_grad_(False)
        params = list(up.parameters()) + list(down.parameters())
        for p in params:
            p.requires_grad_(True)
        groups, peaks = [{"params": params, "lr": 5e-4}], [5e-4]
        written = []
        if opts.vs_lora_lr > 0:
            for p in lparams:
                p.requires_grad_(True)
            groups.append({"params": lparams, "lr": opts.vs_lora_lr})
            peaks.append(opts.vs_lora_lr)
            written = make_images(proc, opts, "vqa", opts.svqa_samples, opts.seed + 77, desc="vision_speech:written")
            cache_features(ie, written)
        opt = torch.optim.AdamW(groups, weight_decay=0.0)

        def loss_of(batch):
            rows, n_prompt = [], []
            for it in batch:
                p = vocab.prompt(domain.SPOKEN_VQA_INSTRUCTION, n_image=it["image"].num_tokens,
                                 n_audio=it["audio"].num_tokens)
                rows.append(p + vocab.answer(it["answer"]))
                n_prompt.append(len(p))

            def embed_fn(ids, emb):  # the rows' image / audio tokens at once, in row order
                emb = emb.clone()
                emb[ids == vocab.image] = torch.cat([it["img_emb"] for it in batch])
                emb[ids == vocab.audio] = down(nn.functional.gelu(up(torch.cat([it["enc"] for it in batch]))))
                return emb

            return lm_batch_loss(hf, rows, n_prompt, embed_fn)

        probe = items[:32]
        with torch.no_grad():
            acc0 = loss_of(probe)[1]
        stage.log(event="e2e_start", answer_acc=round(acc0, 4))
        rng = random.Random(f"vs-e2e:{opts.seed}")

        def e2e_step(step):
            if written and step % 2 == 1:  # the LoRA keeps answering written questions
                return vqa_loss(hf, ie, rng.sample(written, min(opts.e2e_batch, len(written))), vocab)
            return loss_of(rng.sample(items, min(opts.e2e_batch, len(items))))

        train_loop(stage, opt, opts.vs_steps, with_acc(e2e_step), peak=peaks, warmup=10, desc="e2e",
                   clip=params + (lparams if written else []), phase="e2e")
        with torch.no_grad():
            acc1 = loss_of(probe)[1]
        stage.log(event="e2e_end", answer_acc=round(acc1, 4))
        if written:
            torch.save(lora_state(loras), stage.dir / "lora.pt")
    remove_train_lora(hf, loras)
    save_parts(hf, stage, VS_PROJ)
    stage.finish(wall_s=timer(), answer_acc_before=round(acc0, 4), answer_acc_after=round(acc1, 4))
