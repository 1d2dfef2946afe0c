"""Stages `speech_encoder` and `speech`.

speech_encoder: the conformer (transformers' `Phi4MultimodalAudioModel`, the tiny config's audio part) with a
word-level CTC head (blank + the domain's words) on log-mel features made by phimm's own processor.

speech: with the base LM frozen, the speech projector (Linear-GELU-Linear) learns to emit soft tokens: for each
80 ms frame, sum_k p(k | frame) E[k] with p the frozen CTC posteriors and E the LM's embeddings of the blank token
and the words, so the LM reads audio as the noisy transcripts it was pretrained on. Then the projector and the
speech LoRA are fine-tuned end to end with the LM loss on transcripts.
"""

from __future__ import annotations

import random
import time

import torch
from torch import nn

from ..toy import data as toy_data
from ..toy import domain
from .common import (AUDIO_EMBED, SPEECH_PROJ, WORDS, add_train_lora, train_rows, apply_parts, fresh_model,
                     lm_batch_loss, load_base, lora_state, Options, remove_train_lora, save_parts, Stage, stage_file,
                     Timer, Vocab, word_labels)
from .trainer import progress, train_loop, with_acc


def make_clips(proc, kind: str, n: int, seed: int, heldout: bool = False, start: int = 0, desc: str = "clips"):
    """[(features [T, 80], n_tokens, text)] of toy-domain utterances, features made as phimm's processor makes
    them at inference (any file sample rate, resampled by phimm.media)."""
    out = []
    for s in progress(toy_data.iter_split(kind, n, seed, heldout=heldout, start=start), total=n, desc=desc,
                      mininterval=10):
        a = proc.process_audio((s["audio"], s["sample_rate"]))
        text = s["text"] if kind == "asr" else s["question"]
        out.append((a.features, a.num_tokens, text))
    return out


def buckets(lengths: list[int], size: int, rng: random.Random) -> list[list[int]]:
    """Batches of indices of similar length (little padding), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i: i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def pad_features(feats: list[torch.Tensor]) -> torch.Tensor:
    T = max(f.shape[0] for f in feats)
    x = torch.zeros(len(feats), T, feats[0].shape[1])
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x


def spec_augment(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    x = x.clone()
    for i in range(x.shape[0]):
        if rng.random() < 0.5:
            w = rng.randint(1, 8)
            f0 = rng.randint(0, x.shape[2] - w)
            x[i, :, f0: f0 + w] = x[i].mean()
        if rng.random() < 0.3:
            w = rng.randint(1, 4)
            t0 = rng.randint(0, max(0, x.shape[1] - w))
            x[i, t0: t0 + w] = x[i].mean()
    return x


def freq_warp(x: torch.Tensor, rng: random.Random, low: float, high: float) -> torch.Tensor:
    """Vocal tract length perturbation on log-mel features `[B, T, F]`: each row's mel axis stretched by a factor
    drawn in [low, high] (bin f reads bin f / alpha, linearly interpolated; the top bins repeat the last one), as
    another speaker's formants would shift it."""
    B, T, F = x.shape
    out = torch.empty_like(x)
    bins = torch.arange(F, dtype=torch.float32)
    for i in range(B):
        src = (bins / rng.uniform(low, high)).clamp(max=F - 1)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=F - 1)
        w = (src - lo.float())
        out[i] = x[i][:, lo] * (1 - w) + x[i][:, hi] * w
    return out


def ctc_greedy(logp: torch.Tensor, n: int) -> str:
    ids = logp[:n].argmax(-1).tolist()
    words, prev = [], 0
    for k in ids:
        if k != prev and k != 0:
            words.append(WORDS[k - 1])
        prev = k
    return " ".join(words)


def encode(encoder, head, clips, batch: int = 32):
    """Frozen encoder outputs and CTC log-posteriors per clip (one clip at a time: as at inference)."""
    outs = []
    with torch.no_grad():
        for f, n, text in clips:
            h = encoder(f[None], None)[0, :n]
            outs.append((h, head(h).log_softmax(-1), text))
    return outs


FIT_ENCODED = "fit_encoded.pt"  # `encode` of the speech stage's clips, written by the speech_encoder stage


def fit_clips(opts: Options) -> int:
    """How many of the training clips the speech stage fits its projector and LoRA on."""
    return min(opts.asr_samples, 2500)


def run_encoder(run_dir, opts: Options) -> None:
    from ..eval.metrics import wer

    stage = Stage(run_dir, "speech_encoder")
    if stage.done:
        return
    proc, hf = fresh_model(opts, opts.seed + 1)  # only its audio encoder is used (same init as the base's)
    encoder = hf.model.embed_tokens_extend.audio_embed.encoder.eval()
    # transformers' init (normal, std 0.02) leaves the conv front-end's output almost constant, and the layer
    # norms after it turn that into exploding gradients: start from PyTorch's default (fan-in) init instead
    for m in encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.reset_parameters()
    head = nn.Linear(opts.audio_hidden, len(WORDS) + 1)
    clips = make_clips(proc, "asr", opts.asr_samples, opts.seed, desc="speech_encoder:data")
    dev = make_clips(proc, "asr", max(16, opts.eval_asr // 2), opts.seed + 1000, heldout=True,
                     desc="speech_encoder:dev")
    with torch.no_grad():
        allf = torch.cat([c[0] for c in clips[:500]])
        encoder.encoder_embedding.global_mean.copy_(allf.mean(0))
        encoder.encoder_embedding.global_invstd.copy_(1.0 / allf.std(0).clamp(min=1e-3))
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    start, before = stage.resume(opt, encoder=encoder, head=head)
    timer = Timer(before + (time.time() - stage.t0))
    lengths = [c[0].shape[0] for c in clips]
    plan: list[list[int]] = []
    if opts.ctc_sortagrad_steps > 0:  # SortaGrad (Deep Speech 2): the shortest clips first, in length order
        order = sorted(range(len(clips)), key=lambda i: lengths[i])
        k = opts.ctc_batch
        plan += [order[i:i + k] for i in range(0, len(order), k)][:opts.ctc_sortagrad_steps]
    epoch = 0
    while len(plan) < opts.ctc_steps:
        plan += buckets(lengths, opts.ctc_batch, random.Random(f"ctc:{opts.seed}:{epoch}"))
        epoch += 1

    def ctc_step(step):
        idx = plan[step]
        rng = random.Random(f"ctc-aug:{opts.seed}:{step}")
        x = pad_features([clips[i][0] for i in idx])
        if opts.ctc_freq_warp > 0:
            x = freq_warp(x, rng, 1.0 - opts.ctc_freq_warp, 1.0 + opts.ctc_freq_warp)
        x = spec_augment(x, rng)
        logp = head(encoder(x, None)).log_softmax(-1)
        n = torch.tensor([clips[i][1] for i in idx])
        targets = [torch.tensor(word_labels(clips[i][2])) for i in idx]
        loss = nn.functional.ctc_loss(logp.transpose(0, 1), torch.cat(targets), n,
                                      torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)
        return loss, {}

    train_loop(stage, opt, opts.ctc_steps, ctc_step, peak=2e-3, warmup=min(100, opts.ctc_steps // 10), desc="ctc",
               start=start, clip=params, checkpoint={"encoder": encoder, "head": head}, timer=timer)
    encoder.eval()
    enc_dev = encode(encoder, head, dev)
    dev_wer = wer([t for _, _, t in enc_dev], [ctc_greedy(lp, lp.shape[0]) for _, lp, _ in enc_dev])  # corpus WER
    stage.log(event="end", heldout_ctc_wer=round(dev_wer, 4))
    save_parts(hf, stage, (AUDIO_EMBED + "encoder.",))
    torch.save(head.state_dict(), stage.dir / "ctc_head.pt")
    if not opts.speech_fit_unseen:
        # the speech stage fits its projector to the first of these clips read by this encoder: read them here,
        # where they are already made, so that the speech stage need not make them again
        torch.save(encode(encoder, head, clips[:fit_clips(opts)]), stage.dir / FIT_ENCODED)
    stage.finish(wall_s=timer(), heldout_ctc_wer=round(dev_wer, 4), steps=opts.ctc_steps)
    if stage.state_path.exists():
        stage.state_path.unlink()


def load_encoder(run_dir, hf, opts: Options):
    apply_parts(hf, run_dir, ["speech_encoder"])
    head = nn.Linear(opts.audio_hidden, len(WORDS) + 1)
    head.load_state_dict(torch.load(run_dir / "speech_encoder" / "ctc_head.pt", weights_only=True))
    return hf.model.embed_tokens_extend.audio_embed.encoder.eval(), head.eval().requires_grad_(False)


def fit_projector(up: nn.Linear, down: nn.Linear, encoded, table: torch.Tensor, steps: int, seed: int,
                  stage: Stage, desc: str) -> float:
    """MSE of down(gelu(up(h))) to the soft tokens sum_k p_k table[k], over all frames."""
    H = torch.cat([h for h, _, _ in encoded])
    P = torch.cat([lp.exp() for _, lp, _ in encoded])
    Y = P @ table
    params = list(up.parameters()) + list(down.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    scale = Y.pow(2).mean()

    def mse_step(step):
        idx = torch.randint(0, H.shape[0], (1024,), generator=g)
        pred = down(nn.functional.gelu(up(H[idx])))
        return (pred - Y[idx]).pow(2).mean() / scale, {}

    loss = train_loop(stage, opt, steps, mse_step, peak=3e-3, warmup=20, desc=desc, log_every=50, phase=desc,
                      loss_key="rel_mse", digits=5)
    return loss.item() if loss is not None else 0.0


def audio_rows(encoded, vocab: Vocab, instruction: str):
    rows, n_prompt = [], []
    for h, _, text in encoded:
        p = vocab.prompt(instruction, n_audio=h.shape[0])
        rows.append(p + vocab.answer(text))
        n_prompt.append(len(p))
    return rows, n_prompt


def run_adapt(run_dir, opts: Options) -> None:
    stage = Stage(run_dir, "speech")
    if stage.done:
        return
    timer = Timer()
    hf, proc = load_base(run_dir)
    vocab = Vocab(proc.tokenizer, hf.config)
    ready = None if opts.speech_fit_unseen else stage_file(run_dir, "speech_encoder", FIT_ENCODED)
    if ready is not None:  # the same clips through the same encoder, read where they were made
        encoded = torch.load(ready, weights_only=True)
    else:  # new clips (or a run whose speech_encoder stage predates the file): made and read here
        encoder, head = load_encoder(run_dir, hf, opts)
        start = opts.asr_samples if opts.speech_fit_unseen else 0  # after the encoder's own clips: never heard
        encoded = encode(encoder, head, make_clips(proc, "asr", fit_clips(opts), opts.seed, start=start,
                                                   desc="speech:data"))
        stage.log(event="fit_clips", n=len(encoded), start=start)
    ae = hf.model.embed_tokens_extend.audio_embed
    up, down = ae.up_proj_for_speech, ae.down_proj_for_speech
    table = hf.model.embed_tokens.weight[vocab.ctc_ids].detach()
    torch.manual_seed(opts.seed + 2)
    up.reset_parameters()
    down.reset_parameters()
    for m in (up, down):
        m.requires_grad_(True)
    mse = fit_projector(up, down, encoded, table, opts.proj_steps, opts.seed, stage, "projector")

    # end to end: projector + speech LoRA, LM loss on transcripts
    loras = add_train_lora(hf, opts.lora_r)
    with train_rows(opts.lora_r).active():  # every forward below on the adapter being trained
        lparams = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
        pparams = list(up.parameters()) + list(down.parameters())
        opt = torch.optim.AdamW([{"params": lparams, "lr": 2e-3}, {"params": pparams, "lr": 5e-4}], weight_decay=0.0)
        rows, n_prompt = audio_rows(encoded, vocab, domain.ASR_INSTRUCTION)

        def batch_loss(idx):
            feats = [encoded[i][0] for i in idx]

            def embed_fn(ids, emb):  # every row's audio tokens through the projector at once, in row order
                emb = emb.clone()
                emb[ids == vocab.audio] = down(nn.functional.gelu(up(torch.cat(feats))))
                return emb

            return lm_batch_loss(hf, [rows[i] for i in idx], [n_prompt[i] for i in idx], embed_fn)

        probe = list(range(min(32, len(rows))))
        with torch.no_grad():
            acc0 = batch_loss(probe)[1]
        stage.log(event="e2e_start", answer_acc=round(acc0, 4))
        rng = random.Random(f"speech-e2e:{opts.seed}")
        plan = []
        while len(plan) < opts.speech_e2e_steps:
            plan += buckets([r.__len__() for r in rows], opts.e2e_batch, rng)
        train_loop(stage, opt, opts.speech_e2e_steps, with_acc(lambda step: batch_loss(plan[step])),
                   peak=(2e-3, 5e-4), warmup=10, desc="e2e", clip=lparams + pparams, phase="e2e")
        with torch.no_grad():
            acc1 = batch_loss(probe)[1]
        stage.log(event="e2e_end", answer_acc=round(acc1, 4))
        torch.save(lora_state(loras), stage.dir / "lora.pt")
    remove_train_lora(hf, loras)
    save_parts(hf, stage, SPEECH_PROJ)
    stage.finish(wall_s=timer(), projector_rel_mse=round(mse, 5), answer_acc_before=round(acc0, 4),
                 answer_acc_after=round(acc1, 4))
