"""Stages `vision_encoder` and `vision`.

vision_encoder: SigLIP (transformers' `Phi4MultimodalVisionModel`, the tiny config's vision part), trained from
scratch on scenes drawn afresh as it goes (each serves `cell_reuse` consecutive steps), with a classifier on the
pooled 2x2-patch cell features that `Phi4MultimodalImageEmbedding.get_img_features` produces. Its targets are
colour slots (`slot_grid`): the first cells of the grid stand for the colours and hold the class of that colour's
shape, or the background. A second head gives dense supervision: the shape class under each patch, on a middle
layer.

vision: with the base LM frozen, the image projector and the learnt separator vectors are fitted (MSE) so that
every image token is the LM embedding of its cell's target token or of the separator token: the LM reads an image
as the slot grids it was pretrained on. Then projector, separators and the vision LoRA are fine-tuned end to
end with the LM loss on VQA answers.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager

import torch
from torch import nn

from ..toy import data as toy_data
from ..toy import domain
from ..toy.scenes import random_layout_scene, widen
from .common import (CELL_CLASSES, IMAGE_EMBED, SLOT_COLORS, add_train_lora, train_rows, apply_parts, fresh_model,
                     grid_tokens, hd_geometry, lm_batch_loss, load_base, lora_state, Options, remove_train_lora,
                     save_parts, slot_grid, Stage, Timer, Vocab)
from .trainer import progress, train_loop, with_acc


def make_images(proc, opts: Options, kind: str, n: int, seed: int, heldout: bool = False, desc: str = "images",
                keep_audio: bool = False, audio: list | None = None):
    """[dict(image=ImageInput, grid, uh, uw, question, answer[, audio])] of toy-domain VQA samples; 40 % of the
    training scenes are moved onto non-square canvases. `audio`: the samples' processed audio, made beforehand
    (`spoken_audio`): kept instead of synthesising it again."""
    from ..toy.images import render_scene

    if audio is not None and len(audio) < n:
        raise ValueError(f"{len(audio)} processed clips for {n} samples")
    out = []
    samples = toy_data.iter_split(kind, n, seed, heldout=heldout, audio=keep_audio and audio is None)
    for j, s in enumerate(progress(samples, total=n, desc=desc, mininterval=10)):
        scene, img = s["scene"], s["image"]
        rng = random.Random(f"widen:{s['id']}")
        if not heldout and rng.random() < 0.4:
            scene = widen(rng, scene)
            img = render_scene(scene)
        ii = proc.process_image(img)
        g = hd_geometry(scene.width, scene.height, opts.crop, opts.patch)
        rec = dict(image=ii, grid=slot_grid(scene, g["f"]), uh=g["uh"], uw=g["uw"],
                   question=s["question"], answer=s["answer"], question_type=s["question_type"])
        if keep_audio:
            rec["audio"] = audio[j] if audio is not None else proc.process_audio((s["audio"], s["sample_rate"]))
        out.append(rec)
    return out


def spoken_audio(proc, n: int, seed: int, desc: str = "audio") -> list:
    """The processed audio (`AudioInput`) of spoken_vqa samples 0 .. n-1 of the training split `seed`."""
    samples = toy_data.iter_split("spoken_vqa", n, seed)
    return [proc.process_audio((s["audio"], s["sample_rate"]))
            for s in progress(samples, total=n, desc=desc, mininterval=10)]


def crop_batch(items):
    """(pixels, patch masks, cell labels) of the first crop of each item (with dynamic_hd=1 the sub-crop and the
    global crop of an image are the same picture)."""
    px = torch.stack([it["image"].pixel_values[0] for it in items])
    mask = torch.stack([it["image"].attention_mask[0] for it in items]).bool()
    labels = torch.tensor([sum(it["grid"], []) for it in items])
    return px, mask, labels


def patch_labels(scene: domain.Scene, crop: int, patch: int) -> list[int]:
    """The class of the shape under each patch centre of the (single, padded) HD crop, row-major (background
    outside the shapes and in the padding): dense labels that teach SigLIP's middle layers what shapes look like,
    the local evidence the colour slots are read from."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ..toy.images import shape_outline

    g = hd_geometry(scene.width, scene.height, crop, patch)
    label = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(label)
    for s in scene.shapes:
        k = CELL_CLASSES.index(f"[{s.color}_{s.kind}]")
        if s.kind == "circle":
            (cx, cy), r = s.center, s.size / 2
            draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=k)
        else:
            draw.polygon(shape_outline(s), fill=k)
    ms = crop // patch
    pixels = np.asarray(label)  # [height, width]: one read, not one getpixel call per patch
    out = []
    for r in range(ms):
        for c in range(ms):
            x, y = (c + 0.5) * patch / g["sx"], (r + 0.5) * patch / g["sy"]
            out.append(int(pixels[int(y), int(x)]) if x < scene.width and y < scene.height else 0)
    return out


def cell_features(ie, hidden: torch.Tensor) -> torch.Tensor:
    """[B, cells, H] from SigLIP patch states [B, patches, H], pooled as `get_img_features` pools them."""
    w = int(math.isqrt(hidden.shape[1]))
    x = hidden.view(-1, w, w, hidden.shape[-1]).permute(0, 3, 1, 2)
    if getattr(ie, "img_processor_padding", None) is not None:
        x = ie.img_processor_padding(x)
    x = ie.image_token_compression(x).permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def scene_crops(proc, img) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel values [2, 3, crop, crop], patch masks [2, m, m]) of an RGB PIL image, equal to what
    `proc.process_image` makes with `dynamic_hd=1` (the global crop, then the one sub-crop: the same picture), by
    the same torchvision calls without the image processor's per-call overhead, which costs about as much as
    drawing the scene and a fifth of a vision-encoder step. tests/test_train_recipe.py checks that both are
    equal."""
    import numpy as np
    from torchvision.transforms.v2 import functional as tvF

    ip = proc.image_processor
    if ip.dynamic_hd != 1 or img.mode != "RGB":
        ii = proc.process_image(img)
        return ii.pixel_values, ii.attention_mask
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    g = hd_geometry(img.width, img.height, proc.crop_size, proc.patch_size)
    x = tvF.pad(tvF.resize(x, list(g["size"])), [0, 0, *g["pad"]], fill=[255, 255, 255])
    mean = torch.tensor(ip.image_mean) * (1.0 / ip.rescale_factor)
    std = torch.tensor(ip.image_std) * (1.0 / ip.rescale_factor)
    x = tvF.normalize(x.to(torch.float32), mean, std, inplace=True)
    return torch.stack([x, x]), torch.stack([torch.ones_like(g["mask"]), g["mask"]])


def fresh_batch(proc, opts: Options, rng: random.Random, n: int):
    """`n` newly drawn scenes (a third of them on non-square canvases), rendered and processed as at inference:
    the encoder sees each scene for `cell_reuse` steps at most (`reused_batch`), so it learns the shapes, not the
    training set."""
    from ..toy.images import render_scene

    px, mask, labels, local = [], [], [], []
    for _ in range(n):
        scene = random_layout_scene(rng, opts.cell_faint)
        pixels, masks = scene_crops(proc, render_scene(scene))
        g = hd_geometry(scene.width, scene.height, opts.crop, opts.patch)
        k = rng.randrange(pixels.shape[0])
        px.append(pixels[k])
        mask.append(masks[k])
        labels.append(sum(slot_grid(scene, g["f"]), []))
        local.append(patch_labels(scene, opts.crop, opts.patch))
    return torch.stack(px), torch.stack(mask).bool(), torch.tensor(labels), torch.tensor(local)


def reused_batch(proc, opts: Options, step: int, cache: dict):
    """Step `step`'s vision-encoder batch: the `fresh_batch`es of steps step - cell_reuse + 1 .. step, each
    ceil(cell_batch / cell_reuse) scenes, so every scene serves `cell_reuse` consecutive steps. `cache` keeps the
    recent ones between calls; a resumed run redraws them (each draw is seeded by its step alone)."""
    k = max(1, opts.cell_reuse)
    per = -(-opts.cell_batch // k)
    for s in [s for s in cache if s <= step - k]:
        del cache[s]
    for s in range(step - k + 1, step + 1):
        if s not in cache:
            cache[s] = fresh_batch(proc, opts, random.Random(f"slots:{opts.seed}:{s}"), per)
    parts = [cache[s] for s in range(step - k + 1, step + 1)]
    return tuple(torch.cat(t) for t in zip(*parts))


def slot_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy of the colour slots: per slot holding a shape, and whole scenes (every slot right)."""
    n = len(SLOT_COLORS)
    pred, gold = logits[:, :n].argmax(-1), labels[:, :n]
    held = gold != 0
    return {"shape_slot_acc": round((pred[held] == gold[held]).float().mean().item(), 4),
            "scene_acc": round((pred == gold).all(-1).float().mean().item(), 4)}


def run_encoder(run_dir, opts: Options) -> None:
    stage = Stage(run_dir, "vision_encoder")
    if stage.done:
        return
    proc, hf = fresh_model(opts, opts.seed + 3)
    ie = hf.model.embed_tokens_extend.image_embed
    siglip = ie.img_processor.train()
    for m in siglip.modules():  # as for the conformer: PyTorch's fan-in init trains faster from scratch
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
    # SigLIP's last hidden states are not normalised: the classifier normalises them itself
    head = nn.Sequential(nn.LayerNorm(opts.vision_hidden), nn.Linear(opts.vision_hidden, len(CELL_CLASSES)))
    local_head = nn.Sequential(nn.LayerNorm(opts.vision_hidden), nn.Linear(opts.vision_hidden, len(CELL_CLASSES)))
    mid = max(1, opts.vision_layers // 2)  # the hidden state the dense patch labels supervise
    dev = make_images(proc, opts, "vqa", max(32, opts.eval_vqa), opts.seed + 1000, heldout=True,
                      desc="vision_encoder:dev")
    params = list(siglip.parameters()) + list(head.parameters()) + list(local_head.parameters())
    slot_weight = torch.ones(len(CELL_CLASSES))
    slot_weight[1:] = 4.0  # the shapes, not the (many, easy) empty slots and cells
    opt = torch.optim.AdamW(params, lr=opts.cell_lr, weight_decay=0.01)
    start, before = stage.resume(opt, siglip=siglip, head=head, local_head=local_head)
    timer = Timer(before + (time.time() - stage.t0))

    def dev_scores():
        with torch.no_grad():
            px, mask, labels = crop_batch(dev)
            return slot_scores(head(ie.get_img_features(px, mask)), labels)

    drawn: dict = {}

    def slots_step(step):
        px, mask, labels, local = reused_batch(proc, opts, step, drawn)
        states = siglip(px, patch_attention_mask=mask, output_hidden_states=True).hidden_states
        logits = head(cell_features(ie, states[-1]))
        local_logits = local_head(states[mid])
        loss = (nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            weight=slot_weight)
                + 0.5 * nn.functional.cross_entropy(local_logits.reshape(-1, local_logits.shape[-1]),
                                                    local.reshape(-1)))

        def fields():  # the batch's accuracies, worked out on the steps that log them
            with torch.no_grad():
                on_shape = local != 0
                local_acc = (local_logits.argmax(-1)[on_shape] == local[on_shape]).float().mean().item()
            return {"shape_patch_acc": round(local_acc, 4), **slot_scores(logits.detach(), labels)}

        return loss, fields

    def dev_every_500(step):
        if step % 500 == 499:
            stage.log(step=step, dev=dev_scores())

    train_loop(stage, opt, opts.cell_steps, slots_step, peak=opts.cell_lr, warmup=min(200, opts.cell_steps // 10),
               desc="slots", start=start, clip=params, after_step=dev_every_500,
               checkpoint={"siglip": siglip, "head": head, "local_head": local_head}, timer=timer)
    siglip.eval()
    scores = dev_scores()
    stage.log(event="end", heldout=scores)
    save_parts(hf, stage, (IMAGE_EMBED + "img_processor.",))
    torch.save(head.state_dict(), stage.dir / "cell_head.pt")
    stage.finish(wall_s=timer(), heldout=scores, steps=opts.cell_steps)
    if stage.state_path.exists():
        stage.state_path.unlink()


# ---------------------------------------------------------------- the projector, with SigLIP frozen


def cache_features(ie, items, batch: int = 64) -> None:
    """Frozen SigLIP cell features of every item (`item["feats"]`, [crops, f*f, vision hidden]), the crops of up to
    `batch` items in one forward pass (each crop attends within itself only, so a crop's features do not depend on
    its neighbours in the batch; one item at a time took 2.5 times longer)."""
    with torch.no_grad():
        for a in range(0, len(items), batch):
            chunk = items[a: a + batch]
            px = torch.cat([it["image"].pixel_values for it in chunk])
            mask = torch.cat([it["image"].attention_mask for it in chunk]).bool()
            feats = ie.get_img_features(px, mask)
            k = 0
            for it in chunk:
                n = it["image"].pixel_values.shape[0]
                it["feats"], k = feats[k: k + n], k + n


@contextmanager
def cached_features(ie, feats: torch.Tensor):
    """Run `Phi4MultimodalImageEmbedding.forward` on precomputed SigLIP features (same arrangement code)."""
    ie.get_img_features = lambda *a, **k: feats
    try:
        yield
    finally:
        del ie.get_img_features


def image_embeds(ie, items, hidden: int, image_token_id: int) -> torch.Tensor:
    """[sum of tokens, hidden]: the model's own image embedding of `items` (features from the cache)."""
    n = sum(it["image"].num_tokens for it in items)
    feats = torch.cat([it["feats"] for it in items])
    px = torch.stack([it["image"].pixel_values for it in items])
    mask = torch.stack([it["image"].attention_mask for it in items])
    sizes = torch.tensor([it["image"].size for it in items])
    with cached_features(ie, feats):
        out = ie(torch.full((1, n), image_token_id), torch.zeros(1, n, hidden), image_pixel_values=px,
                 image_sizes=sizes, image_attention_mask=mask)
    return out[0]


def projector_params(ie) -> list[nn.Parameter]:
    return (list(ie.img_projection_up.parameters()) + list(ie.img_projection_down.parameters())
            + [ie.global_img_feature_extensor, ie.sub_img_feature_extensor])


def fit_projector(ie, items, vocab: Vocab, table: torch.Tensor, steps: int, batch: int, seed: int, stage: Stage,
                  image_token_id: int) -> float:
    params = projector_params(ie)
    with torch.no_grad():  # SigLIP's last hidden states are not normalised: scale the first layer to them
        allf = torch.cat([it["feats"].reshape(-1, it["feats"].shape[-1]) for it in items[:500]])
        mean, std = allf.mean(0), allf.std(0).clamp(min=1e-3)
        up = ie.img_projection_up
        up.weight.div_(std)
        up.bias.sub_(up.weight @ mean)
        ie.sub_img_feature_extensor.copy_(mean + std * torch.randn_like(mean))
        ie.global_img_feature_extensor.copy_(mean + std * torch.randn_like(mean))
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    rng = random.Random(f"vision-proj:{seed}")
    targets = [table[torch.tensor(grid_tokens(it["grid"], it["uh"], it["uw"], vocab))] for it in items]
    scale = table.pow(2).mean()

    def mse_step(step):
        idx = rng.sample(range(len(items)), min(batch, len(items)))
        pred = image_embeds(ie, [items[i] for i in idx], table.shape[1], image_token_id)
        return (pred - torch.cat([targets[i] for i in idx])).pow(2).mean() / scale, {}

    loss = train_loop(stage, opt, steps, mse_step, peak=3e-3, warmup=20, desc="projector", log_every=50,
                      phase="projector", loss_key="rel_mse", digits=5)
    return loss.item() if loss is not None else 0.0


def vqa_loss(hf, ie, items, vocab: Vocab):
    rows, n_prompt = [], []
    for it in items:
        p = vocab.prompt(it["question"], n_image=it["image"].num_tokens)
        rows.append(p + vocab.answer(it["answer"]))
        n_prompt.append(len(p))

    def embed_fn(ids, emb):  # every row's image tokens in one call, in row order
        emb = emb.clone()
        emb[ids == vocab.image] = image_embeds(ie, items, emb.shape[-1], vocab.image)
        return emb

    return lm_batch_loss(hf, rows, n_prompt, embed_fn)


def run_adapt(run_dir, opts: Options) -> None:
    stage = Stage(run_dir, "vision")
    if stage.done:
        return
    timer = Timer()
    hf, proc = load_base(run_dir)
    apply_parts(hf, run_dir, ["vision_encoder"])
    vocab = Vocab(proc.tokenizer, hf.config)
    ie = hf.model.embed_tokens_extend.image_embed
    items = make_images(proc, opts, "vqa", opts.vqa_samples, opts.seed, desc="vision:data")
    cache_features(ie, items)
    table = hf.model.embed_tokens.weight.detach()
    torch.manual_seed(opts.seed + 4)
    ie.img_projection_up.reset_parameters()
    ie.img_projection_down.reset_parameters()
    mse = fit_projector(ie, items, vocab, table, opts.proj_steps // 3, 16, opts.seed, stage, vocab.image)

    loras = add_train_lora(hf, opts.lora_r)
    with train_rows(opts.lora_r).active():  # every forward below on the adapter being trained
        lparams = [p for m in loras.values() for p in (m.lora_A, m.lora_B)]
        pparams = projector_params(ie)
        opt = torch.optim.AdamW([{"params": lparams, "lr": 2e-3}, {"params": pparams, "lr": 5e-4}], weight_decay=0.0)
        probe = items[:32]
        with torch.no_grad():
            acc0 = vqa_loss(hf, ie, probe, vocab)[1]
        stage.log(event="e2e_start", answer_acc=round(acc0, 4))
        rng = random.Random(f"vision-e2e:{opts.seed}")
        train_loop(stage, opt, opts.vision_e2e_steps,
                   with_acc(lambda step: vqa_loss(hf, ie, rng.sample(items, min(opts.e2e_batch, len(items))), vocab)),
                   peak=(2e-3, 5e-4), warmup=10, desc="e2e", clip=lparams + pparams, phase="e2e")
        with torch.no_grad():
            acc1 = vqa_loss(hf, ie, probe, vocab)[1]
        stage.log(event="e2e_end", answer_acc=round(acc1, 4))
        torch.save(lora_state(loras), stage.dir / "lora.pt")
    remove_train_lora(hf, loras)
    save_parts(hf, stage, (IMAGE_EMBED + "img_projection", IMAGE_EMBED + "global_img", IMAGE_EMBED + "sub_img"))
    stage.finish(wall_s=timer(), projector_rel_mse=round(mse, 5), answer_acc_before=round(acc0, 4),
                 answer_acc_after=round(acc1, 4))
