"""`phimm.load()` and the `Pipeline`: requests in, outputs out, every batch row on its own route."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from adapters import save_peft_adapter
from routers import Route, resolve_router

from . import checkpoint
from .errors import CheckpointError, PhimmError, PromptError, RouteError, UnknownAdapterError
from .generation import GenerationOptions, run_batch
from .model import Phi4MMComposition
from .processor import Prepared, Processor
from .types import Output, Request

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
EMBEDDED_DIR = Path(__file__).parent / "embedded"


def default_threads() -> int:
    """One thread per two cores: torch's default (all cores) collapses when another process is busy."""
    env = os.environ.get("PHIMM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, (os.cpu_count() or 1) // 2)


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


class Pipeline:
    """Runs requests through one model. Create it with `phimm.load(...)`.

    `pipe(x, **generation)`: `x` is a prompt string or a `Request` (-> `Output`, raises on bad input), or a list
    of them (-> list of `Output`, run as one batch; a bad row gets `Output.error` and the others run).
    `pipe.stream(x, **generation)` yields text pieces as they are generated.
    """

    def __init__(self, model: Phi4MMComposition, processor: Processor, router=None,
                 generation: GenerationOptions | None = None, name: str = "", meta: dict | None = None):
        self.model = model
        self.processor = processor
        self.router = resolve_router(router)
        self.generation = generation or GenerationOptions()
        self.name = name
        self.meta = dict(meta or {})
        cfg = model.config
        eos = self.generation.eos_token_id or cfg.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else processor.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        # one generation at a time: the per-row adapter state lives on the model's layers
        self._lock = threading.RLock()

    @property
    def adapters(self) -> list[str]:
        return list(self.model.adapter_names)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, adapters={self.adapters}, dtype={self.model.dtype})"

    # ---- requests -> rows ----------------------------------------------------------------------------------
    def prepare(self, request: Request | str) -> tuple[Prepared, Route]:
        """Validate and process one request and route it; raises a `PhimmError` before any model compute."""
        prepared = self.processor.prepare(request)
        route = self.router(prepared.route_input)
        if not isinstance(route, Route):
            raise RouteError(f"the router returned {type(route).__name__}, not a phimm Route")
        self.model.check_route(route.adapter, route.audio_projector)
        if prepared.audios and route.audio_projector is None:
            raise RouteError(f"route {route} has no audio projector but the request has audio")
        return prepared, route

    def _embeds(self, rows: Sequence[Prepared], routes: Sequence[Route]):
        model = self.model

        def embeds_fn(indices: Sequence[int], ids: torch.Tensor) -> torch.Tensor:
            emb = model.embed_tokens(ids)  # [k, T, D]
            images = [img for i in indices for img in rows[i].images]
            image_feats = iter(model.image_features(images)) if images else None
            for j, i in enumerate(indices):
                row, route = rows[i], routes[i]
                if row.images:
                    feats = torch.cat([next(image_feats) for _ in row.images])
                    emb[j, ids[j] == model.image_token_id] = feats.to(emb.dtype)
                if row.audios:
                    feats = torch.cat([model.audio_features(a, route.audio_projector) for a in row.audios])
                    emb[j, ids[j] == model.audio_token_id] = feats.to(emb.dtype)
            return emb

        return embeds_fn

    # ---- running -------------------------------------------------------------------------------------------
    def _generate(self, rows: list[Prepared], routes: list[Route], opts: GenerationOptions, start: float):
        """Yields (step, per-row token lists) while generating; returns the per-row outputs at the end."""
        outputs = [Output(route=r, prompt_tokens=len(p.input_ids)) for p, r in zip(rows, routes)]
        eos_ids = opts.eos_token_id or self.eos_token_ids
        logits: list[list[torch.Tensor]] = [[] for _ in rows]
        first = last = None
        with torch.inference_mode():
            steps = run_batch(self.model, [p.input_ids for p in rows], self._embeds(rows, routes),
                              [r.adapter for r in routes], opts, eos_ids, self.pad_token_id)
            done = [False] * len(rows)
            for step in steps:
                first = first or step.time
                last = step.time
                for i, tok in enumerate(step.tokens):
                    if done[i]:
                        continue
                    if opts.output_logits:
                        logits[i].append(step.logits[i].clone())
                    if tok in eos_ids:
                        outputs[i].finish_reason = "stop"
                    else:
                        outputs[i].token_ids.append(tok)
                    done[i] = step.finished[i]
                yield step, outputs
        for i, out in enumerate(outputs):
            out.finish_reason = out.finish_reason or "length"
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            out.logits = torch.stack(logits[i]) if opts.output_logits and logits[i] else None
            out.ttft_s = first - start if first else None
            out.decode_s = (last - first) if first else None
            out.total_s = time.perf_counter() - start

    def __call__(self, x: Request | str | Sequence[Request | str], **generation) -> Output | list[Output]:
        opts = GenerationOptions.from_kwargs(self.generation, **generation)
        start = time.perf_counter()
        if isinstance(x, (str, Request)):
            prepared, route = self.prepare(x)
            outs = self._run([prepared], [route], opts, start)
            return outs[0]
        if not isinstance(x, (list, tuple)):
            raise PromptError(f"expected a prompt, a phimm.Request or a list of them, got {type(x).__name__}")
        results: list[Output | None] = [None] * len(x)
        rows, routes, where = [], [], []
        for i, req in enumerate(x):
            try:
                prepared, route = self.prepare(req)
            except PhimmError as e:
                results[i] = Output(error=e, finish_reason="error")
                continue
            rows.append(prepared)
            routes.append(route)
            where.append(i)
        if rows:
            for i, out in zip(where, self._run(rows, routes, opts, start)):
                results[i] = out
        return results

    def _run(self, rows, routes, opts, start) -> list[Output]:
        with self._lock:
            outputs = None
            for _, outputs in self._generate(rows, routes, opts, start):
                pass
            return outputs

    def stream(self, x: Request | str, **generation) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated (one request)."""
        opts = GenerationOptions.from_kwargs(self.generation, **generation)
        start = time.perf_counter()
        prepared, route = self.prepare(x)
        emitted = ""
        outputs = None
        with self._lock:
            for _, outputs in self._generate([prepared], [route], opts, start):
                text = self.tokenizer.decode(outputs[0].token_ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # a multi-byte character is not complete yet
                if len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted):]
                    emitted = text
        final = outputs[0].text if outputs else ""
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):]  # whatever an incomplete character held back

    # ---- saving --------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write phimm's layout (transformers-native files + `phimm.json`); `phimm.load(path)` reads it back."""
        if getattr(self.model, "quantized", None) or getattr(self.model, "packed", False):
            raise CheckpointError("a quantized or packed pipeline cannot be saved: load it with quantize=None and "
                                  "pack_weights=False to save it")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.hf.save_pretrained(str(path))
        self.processor.save_pretrained(path)
        folders = {}
        for name in self.model.adapter_names:
            folder = f"{name}-lora"
            save_peft_adapter(self.model.export_adapter(name), path / folder)
            folders[name] = folder
        meta = {**self.meta, "format_version": checkpoint.FORMAT_VERSION, "family": self.model.family,
                "adapters": folders}
        (path / checkpoint.PHIMM_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype="float32", router=None, *,
         threads: int | None = None, device_map=None, allow_pickle: bool = False, adapters=None,
         quantize: str | None = None, pack_weights: bool | None = None, **generation) -> Pipeline:
    """Load a checkpoint (transformers-native or original Phi-4-multimodal layout, or phimm's own) into a
    `Pipeline`. `path=None` loads the embedded default model. `router`: a callable or class mapping a
    `RouteInput` to a `Route` (default: the modality table). `adapters`: names to attach (default: all the
    checkpoint has; `[]` for the base model alone). `quantize="int8"` stores the base decoder's projections and
    output head in int8 (adapters stay in full precision). `pack_weights` (default: on for bfloat16 on CPU)
    re-lays the decoder's weights out for oneDNN's matmul, which reads them faster when decoding, each layer on
    its first forward (loading reads no weights); a packed pipeline cannot be saved. Extra keyword arguments set
    generation defaults."""
    torch.set_num_threads(threads or default_threads())
    if path is None:
        if not (EMBEDDED_DIR / "config.json").is_file():
            raise checkpoint.CheckpointError(
                f"no embedded model at {EMBEDDED_DIR}; pass the path of a checkpoint to phimm.load()"
            )
        path = EMBEDDED_DIR
    path = Path(path)
    loaded = checkpoint.load_checkpoint(path, dtype=resolve_dtype(dtype), device=device, device_map=device_map,
                                        allow_pickle=allow_pickle)
    chosen = loaded.adapters
    if adapters is not None:
        missing = sorted(set(adapters) - set(chosen))
        if missing:
            raise UnknownAdapterError(f"adapters {missing} are not in {path}; it has {sorted(chosen)}")
        chosen = {n: chosen[n] for n in adapters}
    model = Phi4MMComposition(loaded.hf_model, chosen)
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        from .quant import quantize_int8

        quantize_int8(model)
    elif pack_weights or (pack_weights is None and model.dtype == torch.bfloat16 and model.device.type == "cpu"):
        from .quant import pack_weights as pack

        pack(model)
    processor = Processor.from_pretrained(path, model.config)
    gen_defaults = dict(loaded.meta.get("generation", {}))
    gen_defaults.update(generation)
    opts = GenerationOptions.from_kwargs(None, **gen_defaults)
    name = "embedded" if path == EMBEDDED_DIR else str(path)
    return Pipeline(model, processor, router=router, generation=opts, name=name, meta=loaded.meta)
