"""Shared pieces of phimm's training recipe: the run folder, the tiny config and tokenizer, the soft-token
vocabulary (blank / scene-cell / separator tokens), chat-formatted examples, LoRA for training, stage state."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch
from torch import nn

from adapters import LoraLinear, RowAdapters, unwrap_targets, wrap_targets

from ..model import PHI4MM_LORA_TARGETS
from ..types import hd_grid
from ..tokenizer import AUDIO_TOKEN, IMAGE_TOKEN
from ..toy import domain
from .options import Options

# ---------------------------------------------------------------- the soft-token vocabulary

BLANK = "[blank]"  # a CTC blank frame
BG = "[bg]"  # a scene cell without a shape
ROW = "[row]"  # the end of a row of image cells (the model's sub-image feature separator)
GLB = "[glb]"  # the separator between the sub-crop grid and the global crop (global_img_feature_extensor)
CELL_CLASSES = (BG,) + tuple(f"[{c}_{s}]" for c in domain.COLOR_NAMES for s in domain.SHAPES)
PLAIN_TOKENS = (BLANK, ROW, GLB) + CELL_CLASSES
WORDS = domain.VOCAB  # the CTC head's classes are blank + WORDS
END = "<|end|>"


def cell_class(color: str, kind: str) -> int:
    return CELL_CLASSES.index(f"[{color}_{kind}]")


def setup_threads() -> None:
    """One torch thread, or PHIMM_TRAIN_THREADS (the recipe gives a stage that never runs beside another all its
    workers' cores)."""
    n = max(1, int(os.environ.get("PHIMM_TRAIN_THREADS", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the run folder and its stages


class Stage:
    """One stage's folder: `state.pt` (resumable), `log.jsonl` (losses), `done.json` (finished, wall time)."""

    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.dir = Path(run_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "log.jsonl"
        self.state_path = self.dir / "state.pt"
        self.done_path = self.dir / "done.json"
        self.t0 = time.time()
        self._last_save = time.time()

    @property
    def done(self) -> bool:
        return self.done_path.is_file()

    def log(self, **rec) -> None:
        rec = {"t": round(time.time() - self.t0, 2), **rec}
        with self.log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def load_state(self) -> dict | None:
        if self.state_path.is_file():
            return torch.load(self.state_path, weights_only=False)
        return None

    def save_state(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)
        self._last_save = time.time()

    def due(self, every_s: float = 60.0) -> bool:
        return time.time() - self._last_save > every_s

    def finish(self, **info) -> None:
        prev = json.loads(self.done_path.read_text()) if self.done_path.is_file() else {}
        elapsed = info.pop("wall_s", None)
        rec = {"stage": self.name, "wall_s": round(elapsed if elapsed is not None else time.time() - self.t0, 1),
               **prev, **info}
        self.done_path.write_text(json.dumps(rec, indent=2) + "\n")

    def resume(self, opt, **modules) -> tuple[int, float]:
        """Load the last `state.pt` (if any) into `modules` (by name) and the optimiser, all or nothing:
        (the step to continue from, seconds the stage had run before)."""
        state = self.load_state()
        if state is None:
            return 0, 0.0
        missing = [k for k in (*modules, "opt", "step") if k not in state]
        if missing:
            raise RuntimeError(f"{self.state_path} lacks {missing}; delete it to restart the stage")
        for name, mod in modules.items():
            mod.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        return int(state["step"]), float(state.get("elapsed", 0.0))

    def checkpoint(self, step: int, elapsed: float, opt, **modules) -> None:
        """Save what `resume` reads back: the modules (by name), the optimiser, the next step, the time so far."""
        self.save_state({**{name: mod.state_dict() for name, mod in modules.items()}, "opt": opt.state_dict(),
                         "step": step, "elapsed": elapsed})


class Timer:
    """Wall time of a stage, counting the time spent before an interruption."""

    def __init__(self, before: float = 0.0):
        self.start = time.time() - before

    def __call__(self) -> float:
        return time.time() - self.start


# ---------------------------------------------------------------- tokenizer, config, base model


def tokenizer_corpus(seed: int, n: int = 12000, prompts: int = 0) -> list[str]:
    """Toy-domain text to train the BPE tokenizer on; `prompts`: each instruction of the domain that many times."""
    rng = random.Random(f"phimm-train:tokenizer:{seed}")
    lines = domain.corpus(rng, n)
    # every domain word alone and after a space, often enough to be merged into one token
    for _ in range(60):
        words = list(WORDS)
        rng.shuffle(words)
        lines.append(" ".join(words))
        lines.extend(words)
    lines.extend([domain.ASR_INSTRUCTION, domain.SPOKEN_VQA_INSTRUCTION] * prompts)
    return lines


def build_tokenizer(opts: Options):
    from ..tokenizer import build_tokenizer as bpe

    tok = bpe(tokenizer_corpus(opts.seed, prompts=opts.tokenizer_prompts), vocab_size=opts.vocab)
    tok.add_tokens(list(PLAIN_TOKENS), special_tokens=False)
    for w in WORDS:
        for form in (w, " " + w):
            ids = tok(form)["input_ids"]
            if len(ids) != 1:
                raise RuntimeError(f"tokenizer: {form!r} is not one token ({ids}); raise the vocab size")
    return tok


def build_config(tok, opts: Options):
    from ..testing import tiny_config

    cfg = tiny_config(
        tok, hidden=opts.lm_hidden, layers=opts.lm_layers, heads=opts.lm_heads, kv_heads=opts.lm_kv_heads,
        intermediate=opts.lm_intermediate, vision_hidden=opts.vision_hidden, vision_layers=opts.vision_layers,
        audio_hidden=opts.audio_hidden, audio_blocks=opts.audio_blocks, crop_size=opts.crop,
        patch_size=opts.patch, max_position_embeddings=1024, original_max_position_embeddings=1024,
    )
    cfg.vision_config.feature_layer = -1  # the last SigLIP layer feeds the projector (the tiny tower has few)
    cfg.vision_config.num_attention_heads = max(1, opts.vision_hidden // 32)
    ac = cfg.audio_config
    ac.num_attention_heads = max(1, opts.audio_hidden // 32)
    ac.nemo_conv_channels = opts.audio_conv_channels
    ac.intermediate_size = opts.audio_hidden * 2
    return cfg


def build_processor(tok, cfg, opts: Options):
    from transformers import Phi4MultimodalFeatureExtractor, Phi4MultimodalImageProcessor

    from ..processor import Processor

    ip = Phi4MultimodalImageProcessor(size={"height": opts.crop, "width": opts.crop}, patch_size=opts.patch,
                                      dynamic_hd=1)
    fe = Phi4MultimodalFeatureExtractor()
    return Processor(tok, ip, fe, image_token_id=cfg.vision_config.image_token_id,
                     audio_token_id=cfg.audio_config.audio_token_id, crop_size=opts.crop, patch_size=opts.patch)


def fresh_model(opts: Options, seed: int):
    """(processor, randomly initialised model) of the run's configuration, for an encoder stage that trains its
    tower apart from the LM (the LM stage's weights are not needed there)."""
    from transformers import Phi4MultimodalForCausalLM

    tok = build_tokenizer(opts)
    cfg = build_config(tok, opts)
    proc = build_processor(tok, cfg, opts)
    torch.manual_seed(seed)
    return proc, bidirectional_vision(Phi4MultimodalForCausalLM(cfg).eval())


def bidirectional_vision(hf):
    """`hf` with SigLIP's attention bidirectional for every crop, as phimm runs it (`phimm.model`)."""
    from ..model import make_vision_attention_bidirectional

    make_vision_attention_bidirectional(hf)
    return hf


def stage_file(run_dir: Path, stage: str, name: str) -> Path | None:
    """`{run}/{stage}/{name}` once that stage has finished and written it, else None."""
    path = Path(run_dir) / stage / name
    return path if (Path(run_dir) / stage / "done.json").is_file() and path.is_file() else None


def base_dir(run_dir: Path) -> Path:
    """Where the frozen base LM of a run is: `{run}/lm_anneal/base` once that stage has finished with one, else
    `{run}/lm/base`."""
    annealed = Path(run_dir) / "lm_anneal" / "base"
    if (Path(run_dir) / "lm_anneal" / "done.json").is_file() and annealed.is_dir():
        return annealed
    return Path(run_dir) / "lm" / "base"


def load_base(run_dir: Path):
    """(hf model, processor) of the base checkpoint (`lm_anneal`'s where that stage trained one, else the LM
    stage's), everything frozen, eval mode."""
    from transformers import Phi4MultimodalForCausalLM

    from ..processor import Processor

    base = base_dir(run_dir)
    hf = Phi4MultimodalForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval().requires_grad_(False)
    bidirectional_vision(hf)
    proc = Processor.from_pretrained(base, hf.config)
    return hf, proc


def apply_parts(hf, run_dir: Path, names) -> None:
    """Load the trained parts (`{run}/{name}/parts.pt`, state-dict fragments of the hf model) into `hf`."""
    for name in names:
        sd = torch.load(Path(run_dir) / name / "parts.pt", weights_only=True)
        missing = hf.load_state_dict(sd, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"{name}/parts.pt: unexpected keys {missing.unexpected_keys[:3]}")


def save_parts(hf, stage: Stage, prefixes) -> None:
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items() if any(k.startswith(p) for p in prefixes)}
    torch.save(sd, stage.dir / "parts.pt")


IMAGE_EMBED = "model.embed_tokens_extend.image_embed."
AUDIO_EMBED = "model.embed_tokens_extend.audio_embed."
SPEECH_PROJ = (AUDIO_EMBED + "up_proj_for_speech.", AUDIO_EMBED + "down_proj_for_speech.")
VS_PROJ = (AUDIO_EMBED + "up_proj_for_vision_speech.", AUDIO_EMBED + "down_proj_for_vision_speech.")


# ---------------------------------------------------------------- token ids of the soft vocabulary


class Vocab:
    """Token ids the recipe needs."""

    def __init__(self, tok, cfg):
        ids = tok.convert_tokens_to_ids
        self.tok = tok
        self.blank = ids(BLANK)
        self.row = ids(ROW)
        self.glb = ids(GLB)
        self.cells = [ids(c) for c in CELL_CLASSES]
        self.words = {w: tok(w)["input_ids"][0] for w in WORDS}
        self.ctc_ids = [self.blank] + [self.words[w] for w in WORDS]  # CTC class -> LM token
        self.end = ids(END)
        self.image = cfg.vision_config.image_token_id
        self.audio = cfg.audio_config.audio_token_id
        self._prompt_cache: dict = {}
        self._answer_cache: dict = {}

    def prompt(self, text: str, n_image: int = 0, n_audio: int = 0) -> list[int]:
        """Chat-formatted user turn with `n_image` image and `n_audio` audio placeholder tokens before `text`,
        exactly as phimm's processor renders a request of content parts [image, audio, text]."""
        key = (text, n_image, n_audio)
        if key not in self._prompt_cache:
            content = IMAGE_TOKEN * n_image + AUDIO_TOKEN * n_audio + text
            rendered = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
            self._prompt_cache[key] = self.tok(rendered)["input_ids"]
        return list(self._prompt_cache[key])

    def answer(self, text: str) -> list[int]:
        if text not in self._answer_cache:
            self._answer_cache[text] = self.tok(text)["input_ids"] + [self.end]
        return list(self._answer_cache[text])


def word_labels(text: str) -> list[int]:
    """CTC targets (1-based word classes) of a transcript."""
    return [WORDS.index(w) + 1 for w in text.split()]


# ---------------------------------------------------------------- scene grids (the image's soft tokens)


def hd_geometry(width: int, height: int, crop: int, patch: int) -> dict:
    """Where a `width` x `height` image lands in the single HD crop (dynamic_hd=1), as the image processor places
    it (resized to `size` (h, w), padded by `pad` (w, h), patch `mask`), and the useful cell grid. A new dict
    and mask each call (worked out once per size: training asks for the same few hundred sizes all the time)."""
    out = dict(_hd_geometry(width, height, crop, patch))
    out["mask"] = out["mask"].clone()
    return out


@functools.lru_cache(maxsize=4096)
def _hd_geometry(width: int, height: int, crop: int, patch: int) -> dict:
    ratio_w, ratio_h = crop / width, crop / height
    if ratio_w < ratio_h:
        new_w, new_h = crop, int(height * ratio_w)
        pad_w, pad_h = 0, crop - new_h
    else:
        new_w, new_h = int(width * ratio_h), crop
        pad_w, pad_h = crop - new_w, 0
    ms = crop // patch
    mask = torch.ones(ms, ms)
    if pad_w >= patch:
        mask[:, -math.floor(pad_w / patch):] = 0
    if pad_h >= patch:
        mask[-math.floor(pad_h / patch):, :] = 0
    f = (ms + 1) // 2
    # one crop (dynamic_hd=1): the grid of a crop-sized image behind a global crop, as the processor counts it
    _, _, uh, uw = hd_grid(torch.stack([mask, mask]), (crop, crop), crop, f)
    return dict(f=f, uh=uh, uw=uw, sx=new_w / width, sy=new_h / height,
                cell=crop / f, size=(new_h, new_w), pad=(pad_w, pad_h), mask=mask)


SLOT_COLORS = domain.COLOR_NAMES  # scene slot k of the grid (row-major) holds the shape of colour k, if any


def slot_grid(scene: domain.Scene, f: int) -> list[list[int]]:
    """The f x f cell classes the vision encoder learns for a scene: colour slots. The first
    `len(SLOT_COLORS)` cells (row-major) stand for the colours in `SLOT_COLORS` order and hold the class of that
    colour's shape ([red_star]), or the background class when the scene has no shape of that colour; every other
    cell is background. Colours are distinct within a scene, so the slots list the scene's shapes exactly once,
    wherever and however large they are (SigLIP attends over the whole crop; every cell can see every shape)."""
    if f * f < len(SLOT_COLORS):
        raise ValueError(f"a {f}x{f} cell grid has fewer cells than the {len(SLOT_COLORS)} colour slots")
    flat = [0] * (f * f)
    for s in scene.shapes:
        flat[SLOT_COLORS.index(s.color)] = cell_class(s.color, s.kind)
    return [flat[r * f: (r + 1) * f] for r in range(f)]


def grid_tokens(grid: list[list[int]], uh: int, uw: int, vocab: Vocab) -> list[int]:
    """The image's token layout in Phi-4-multimodal's HD arrangement (dynamic_hd=1, one sub-crop): the useful
    sub-crop cells row by row, each row closed by a separator; the global separator; the global crop's cells
    row by row, each row closed by a separator."""
    f = len(grid)
    out = []
    for r in range(uh):
        out += [vocab.cells[grid[r][c]] for c in range(uw)] + [vocab.row]
    out.append(vocab.glb)
    for r in range(f):
        out += [vocab.cells[grid[r][c]] for c in range(f)] + [vocab.row]
    return out


# ---------------------------------------------------------------- noisy transcripts (the audio's soft tokens)


def noisy_frames(rng: random.Random, text: str, vocab: Vocab, word_span: tuple[int, int] = (2, 6)) -> list[int]:
    """The frame tokens a word-level CTC encoder emits for `text` at 80 ms frames: mostly blanks, each word as a
    spike of 1-2 frames somewhere in its `word_span` (2-6) frames, as many blanks before and after."""
    out = [vocab.blank] * rng.randint(1, word_span[1])
    for w in text.split():
        dur = rng.randint(*word_span)
        k = 1 if rng.random() < 0.65 or dur < 2 else 2
        pos = rng.randint(0, dur - k)
        span = [vocab.blank] * dur
        for i in range(k):
            span[pos + i] = vocab.words[w]
        if pos == 0 and out[-1] == vocab.words[w]:  # CTC puts a blank between a repeated word's two spikes
            span = [vocab.blank] + span
        out += span
    out += [vocab.blank] * rng.randint(1, word_span[1])
    return out


# ---------------------------------------------------------------- LoRA while training


def add_train_lora(hf, r: int, alpha: float | None = None) -> dict[str, LoraLinear]:
    """Wrap every Phi-4-multimodal LoRA target of `hf` in a `LoraLinear` with one trainable adapter (index 0;
    A random, B zero). Forwards apply it inside `train_rows(r).active()`."""
    alpha = float(alpha if alpha is not None else 2 * r)
    paths = [p for p, m in hf.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(PHI4MM_LORA_TARGETS, p)]
    out = wrap_targets(hf, paths)
    for mod in out.values():  # in module order: the random A's draw as they always did
        mod.add_trainable(r, alpha)
    return out


def train_rows(r: int) -> RowAdapters:
    """The rows' adapters while training: every row on the trainable adapter (index 0, rank `r`)."""
    return RowAdapters(uniform=0, ranks=(r,))


def remove_train_lora(hf, loras: dict[str, LoraLinear]) -> None:
    unwrap_targets(hf, loras)


def lora_state(loras: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in loras.items():
        out[f"{path}.lora_A"] = m.lora_A.detach().clone()
        out[f"{path}.lora_B"] = m.lora_B.detach().clone()
    return out


def load_lora_state(loras: dict[str, LoraLinear], sd: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, m in loras.items():
            m.lora_A.copy_(sd[f"{path}.lora_A"])
            m.lora_B.copy_(sd[f"{path}.lora_B"])


def lora_adapter(name: str, sd: dict[str, torch.Tensor], r: int, alpha: float | None = None):
    from adapters import LoraAdapter

    alpha = float(alpha if alpha is not None else 2 * r)
    paths = sorted({k.rsplit(".", 1)[0] for k in sd})
    weights = {p: (sd[f"{p}.lora_A"].clone(), sd[f"{p}.lora_B"].clone()) for p in paths}
    return LoraAdapter(name=name, r=r, alpha=alpha, weights=weights, target_modules=PHI4MM_LORA_TARGETS)


# ---------------------------------------------------------------- LM loss over mixed embeddings


class AnswerBody(nn.Module):
    """`hf.model` (a Phi-4-multimodal decoder, no LoRA) computing the final hidden states of chosen positions only.

    Its last layer needs keys and values at every position but queries, the attention output and the MLP only
    where a loss is taken: the answer positions, a few of the ~60 of an LM training row. The layers before it
    run as transformers runs them. `forward(inputs_embeds [B,T,D], attention_mask [B,T], sel [B,A])` ->
    the model's normed last hidden states at positions `sel` [B,A,D]: the same numbers as
    `hf.model(...).last_hidden_state` gathered at `sel`, in other float rounding. Shares `hf`'s parameters."""

    answers_only = True  # how `lm_batch_loss` tells it from a module returning every position

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, sel):
        from transformers.masking_utils import create_causal_mask
        from transformers.models.phi4_multimodal.modeling_phi4_multimodal import apply_rotary_pos_emb

        m = self.model
        B, T, _ = inputs_embeds.shape
        pos = torch.arange(T, device=inputs_embeds.device)[None]
        mask = create_causal_mask(config=m.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=None, position_ids=pos)
        cos, sin = m.rotary_emb(inputs_embeds, position_ids=pos)
        h = inputs_embeds
        for layer in m.layers[:-1]:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        last, attn = m.layers[-1], m.layers[-1].self_attn
        d, nq, nkv = attn.head_dim, attn.config.num_attention_heads, attn.num_key_value_heads
        def at_sel(t):  # [B, T, D] -> [B, A, D]: the rows of `sel`
            return t.gather(1, sel[..., None].expand(-1, -1, t.shape[-1]))

        x = last.input_layernorm(h)
        w = attn.qkv_proj.weight
        kv = nn.functional.linear(x, w[nq * d:]).view(B, T, 2 * nkv, d).transpose(1, 2)
        k, v = kv[:, :nkv], kv[:, nkv:]
        q = nn.functional.linear(at_sel(x), w[: nq * d]).view(B, -1, nq, d).transpose(1, 2)
        k = apply_rotary_pos_emb(k, k, cos, sin)[1]
        cs = cos[0][sel]  # [B, A, rotary dims]
        q = apply_rotary_pos_emb(q, q, cs, sin[0][sel])[0]
        allowed = (pos[:, None, :] <= sel[..., None]) & attention_mask.bool()[:, None, :]  # [B, A, T]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=attn.scaling,
                                                         enable_gqa=nq != nkv)
        hs = at_sel(h) + attn.o_proj(out.transpose(1, 2).reshape(B, sel.shape[1], nq * d))
        hs = hs + last.mlp(last.post_attention_layernorm(hs))
        return m.norm(hs)


def lm_batch_loss(hf, rows: list[list[int]], n_prompt: list[int], embed_fn=None, table: torch.Tensor | None = None,
                  body=None, sums: bool = False):
    """(cross-entropy, token accuracy) over the answer tokens of right-padded rows; with `sums`, (summed
    cross-entropy, right answer tokens, answer tokens), to add up over the parts of a batch.
    `embed_fn(ids [B,T], emb [B,T,D]) -> emb` puts media embeddings in. `table`: the (tied) embedding matrix to
    use instead of the model's own (the LM stage's parametrised one). `body`: what runs `hf.model` (a compiled
    version of it, sharing its parameters)."""
    B = len(rows)
    T = max(len(r) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, n_prompt)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, n: len(r)] = torch.tensor(r[n:])
    emb = hf.model.embed_tokens(ids) if table is None else nn.functional.embedding(ids, table)
    if embed_fn is not None:
        emb = embed_fn(ids, emb)
    if getattr(body, "answers_only", False):  # an `AnswerBody`: the answer positions' hidden states alone
        n_answer = torch.tensor([len(r) - n for r, n in zip(rows, n_prompt)])
        # row i's answer positions n_i - 1 .. len_i - 2, padded with its last one (masked out by `keep`)
        sel = torch.arange(int(n_answer.max()))[None] + (torch.tensor(n_prompt) - 1)[:, None]
        sel = torch.minimum(sel, (torch.tensor(n_prompt) + n_answer - 2)[:, None])
        tgt = labels.gather(1, sel + 1)
        keep = torch.arange(sel.shape[1])[None] < n_answer[:, None]
        hidden = body(emb, mask, sel)[keep]
    else:
        out = (hf.model if body is None else body)(inputs_embeds=emb, attention_mask=mask, use_cache=False)
        tgt = labels[:, 1:]
        keep = tgt != -100
        hidden = out.last_hidden_state[:, :-1][keep]  # the answer positions only: the rest have no loss
    logits = hf.lm_head(hidden) if table is None else nn.functional.linear(hidden, table)
    total = nn.functional.cross_entropy(logits, tgt[keep], reduction="sum")
    with torch.no_grad():
        right, count = int((logits.argmax(-1) == tgt[keep]).sum()), int(keep.sum())
    return (total, right, count) if sums else (total / count, right / count)
