"""`phimm.load()` and the `Pipeline`: requests in, outputs out, every batch row on its own route."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import torch

from adapters import save_peft_adapter
from routers import Route, resolve_router

from . import checkpoint
from .errors import CheckpointError, PhimmError, PromptError, RouteError, UnknownAdapterError
from .engine import Engine, EngineLimits, RequestStream
from .generation import GenerationOptions
from .compose import build as build_composition, default_router, read_meta
from .model import Phi4MMComposition
from .processor import Processor
from .types import Output, Prepared, Request

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


class Preparer:
    """Turns a request into its `Prepared` input and `Route` with no model at hand: the processor, the router and
    the names of the model's adapters. `phimm serve` prepares requests with one in its HTTP process (media
    decoding and processing on the other core) while the worker process's engine decodes."""

    def __init__(self, processor: Processor, router, adapters: Sequence[str], features=None):
        self.processor = processor
        self.router = router
        self.adapters = list(adapters)
        self.features = features  # Prepared -> pooled prompt embedding, for a router that `needs_features`

    def __call__(self, request: Request | str) -> tuple[Prepared, Route]:
        prepared = self.processor.prepare(request)
        if getattr(self.router, "needs_features", False) and prepared.route_input.forced is None:
            if self.features is None:
                raise RouteError("this router needs the prompt's embedding, and no model is at hand to make it")
            prepared.route_input = dataclasses.replace(prepared.route_input, features=self.features(prepared))
        try:
            route = self.router(prepared.route_input)
        except ValueError as e:
            raise RouteError(f"the router could not route this request: {e}") from e
        if not isinstance(route, Route):
            raise RouteError(f"the router returned {type(route).__name__}, not a phimm Route")
        if route.adapter is not None and route.adapter not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {route.adapter!r}; this model has "
                                      f"{self.adapters or 'no adapters'}")
        if prepared.audios and route.audio_projector is None:
            raise RouteError(f"route {route} has no audio projector but the request has audio")
        for medium in (*prepared.images, *prepared.audios):
            medium.digest()  # the feature cache's key, made here (the caller's thread or process), not in the engine
        return prepared, route


class Pipeline:
    """Runs requests through one model. Create it with `phimm.load(...)`.

    `pipe(x, **generation)`: `x` is a prompt string or a `Request` (-> `Output`, raises on bad input), or a list
    of them (-> list of `Output`, run as one batch; a bad row gets `Output.error` and the others run).
    `pipe.stream(x, **generation)` yields text pieces as they are generated. Every call goes through one
    continuous-batching `Engine`: calls from several threads (`pipe.submit`, `await pipe.generate`) share its
    decode steps, each row on its own route.
    """

    def __init__(self, model: Phi4MMComposition, processor: Processor, router=None,
                 generation: GenerationOptions | None = None, name: str = "", meta: dict | None = None,
                 limits: EngineLimits | None = None):
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
        self.limits = limits or EngineLimits()
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

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
        return self.preparer()(request)

    def preparer(self) -> "Preparer":
        """What `prepare` does, without the model: picklable (where the router is), for another process."""
        features = self.model.route_features if getattr(self.router, "needs_features", False) else None
        return Preparer(self.processor, self.router, list(self.model.adapter_names), features)

    # ---- running -------------------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The continuous-batching engine every call of this pipeline goes through (started on first use)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = Engine(self.model, self.tokenizer, limits=self.limits,
                                          eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                          max_context=getattr(self.model.config, "max_position_embeddings", None))
        return self._engine

    def close(self) -> None:
        """Stop the engine's thread (a later call starts a new one)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def open(self, x: Request | str, *, loop: asyncio.AbstractEventLoop | None = None,
             arrival: float | None = None, clip_to_context: bool = False, sink=None,
             **generation) -> RequestStream:
        """Prepare, route and queue one request; returns its `RequestStream` (deltas as they come, then the
        `Output`). With `loop`, iterate it with `async for` on that event loop; with `sink`, each delta is
        handed to that callable instead. `clip_to_context`: ask for no more new tokens than the model's context
        leaves after the prompt. Raises a `PhimmError` on bad input, before any model compute, and
        `QueueFullError` when the engine's queue is full."""
        arrival = time.perf_counter() if arrival is None else arrival
        prepared, route = self.prepare(x)
        return self.open_prepared(prepared, route, loop=loop, arrival=arrival, clip_to_context=clip_to_context,
                                  sink=sink, **generation)

    def open_prepared(self, prepared: Prepared, route: Route, *, loop: asyncio.AbstractEventLoop | None = None,
                      arrival: float | None = None, clip_to_context: bool = False, sink=None,
                      **generation) -> RequestStream:
        """`open` for a request already prepared and routed (by `prepare`, or a `Preparer` elsewhere)."""
        opts = GenerationOptions.from_kwargs(self.generation, **generation)
        arrival = time.perf_counter() if arrival is None else arrival
        room = (self.engine.max_context or 1 << 30) - len(prepared.input_ids)
        if clip_to_context and opts.max_new_tokens > room:
            opts = GenerationOptions.from_kwargs(opts, max_new_tokens=max(1, room),
                                                 min_new_tokens=min(opts.min_new_tokens, max(1, room)))
        return self.engine.submit(prepared, route, opts, arrival=arrival, loop=loop, sink=sink)

    def stats(self) -> dict:
        """The engine's counts: running and waiting rows, KV positions, steps, tokens, busy seconds."""
        return self.engine.stats()

    def submit(self, x: Request | str, **generation) -> Future:
        """Thread-safe: queue one request and return a `concurrent.futures.Future` of its `Output`. Bad input
        raises here, before any work."""
        opts = GenerationOptions.from_kwargs(self.generation, **generation)
        start = time.perf_counter()
        prepared, route = self.prepare(x)
        return self.engine.submit(prepared, route, opts, arrival=start, events=False).future

    async def generate(self, x: Request | str, **generation) -> Output:
        """The `Output` of one request, awaited (many callers' requests share the engine's decode steps)."""
        return await asyncio.wrap_future(self.submit(x, **generation))

    def __call__(self, x: Request | str | Sequence[Request | str], **generation) -> Output | list[Output]:
        opts = GenerationOptions.from_kwargs(self.generation, **generation)
        start = time.perf_counter()
        if isinstance(x, (str, Request)):
            prepared, route = self.prepare(x)
            out = self.engine.submit(prepared, route, opts, arrival=start, events=False).result()
            if out.error is not None:
                raise out.error
            return out
        if not isinstance(x, (list, tuple)):
            raise PromptError(f"expected a prompt, a phimm.Request or a list of them, got {type(x).__name__}")
        results: list[Output | None] = [None] * len(x)
        items, where = [], []
        for i, req in enumerate(x):
            try:
                prepared, route = self.prepare(req)
                self.engine.check_fits(len(prepared.input_ids), opts.max_new_tokens)
            except PhimmError as e:
                results[i] = Output(error=e, finish_reason="error")
                continue
            items.append((prepared, route, opts))
            where.append(i)
        # in slices the queue can take: a batch larger than it waits for room instead of failing
        step = self.engine.limits.max_waiting
        for lo in range(0, len(items), step):
            streams = self.engine.submit_many(items[lo:lo + step], arrival=start, events=False)
            for i, stream in zip(where[lo:lo + step], streams):
                results[i] = stream.result()
        return results

    def stream(self, x: Request | str, **generation) -> "TextStream":
        """The answer's text piece by piece as tokens are generated (one request). The returned iterator also
        carries `.route` (known before the first piece) and, once it is exhausted, `.output`; closing it early
        cancels the request."""
        return TextStream(self.open(x, **generation))

    # ---- saving --------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write phimm's layout (transformers-native files + `phimm.json`); `phimm.load(path)` reads it back."""
        if self.model.weight_format != "dense":
            raise CheckpointError("a quantized or packed pipeline cannot be saved: load it with quantize=None and "
                                  "pack_weights=False to save it")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        extra = {}
        if hasattr(self.model, "save_parts"):  # a composition: its parts in folders of their own
            extra["composition"] = self.model.save_parts(path, self.processor)
            extra["routing"] = _routing_table(self.router)
        else:
            self.model.hf.save_pretrained(str(path))
            self.processor.save_pretrained(path)
        folders = {}
        for name in self.model.adapter_names:
            folder = f"{name}-lora"
            save_peft_adapter(self.model.export_adapter(name), path / folder)
            folders[name] = folder
        if hasattr(self.router, "save") and getattr(self.router, "needs_features", False):
            self.router.save(path / "router")
            extra["router"] = "router"
        meta = {**self.meta, "format_version": checkpoint.FORMAT_VERSION, "family": self.model.family,
                "adapters": folders, **extra}
        (path / checkpoint.PHIMM_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class TextStream:
    """`pipe.stream(...)`'s iterator: text pieces; `.route` at once, `.output` once it is exhausted."""

    def __init__(self, stream: RequestStream):
        self._stream = stream
        self._deltas = iter(stream)
        self.route = stream.route

    @property
    def output(self) -> Output | None:
        return self._stream.output

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        for delta in self._deltas:
            if delta.output is not None and delta.output.error is not None:
                raise delta.output.error
            if delta.text:
                return delta.text
        raise StopIteration

    def close(self) -> None:
        """Stop listening; the request is cancelled if it is still running."""
        self._stream.cancel()

    def __del__(self):
        stream = getattr(self, "_stream", None)
        if stream is not None and stream.output is None:
            stream.cancel()


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype="float32", router=None, *,
         threads: int | None = None, device_map=None, allow_pickle: bool = False, adapters=None,
         quantize: str | None = None, pack_weights: bool | None = None, limits: EngineLimits | None = None,
         **generation) -> Pipeline:
    """Load a checkpoint (transformers-native or original Phi-4-multimodal layout, or phimm's own) into a
    `Pipeline`. `path=None` loads the embedded default model. `router`: a callable or class mapping a
    `RouteInput` to a `Route` (default: the modality table). `adapters`: names to attach (default: all the
    checkpoint has; `[]` for the base model alone). `quantize="int8"` (or `"int4"`, group-wise) stores the base
    decoder's projections and output head in int8 (int4; adapters stay in full precision). `pack_weights` (default: on for bfloat16 on CPU)
    re-lays the decoder's weights out for oneDNN's matmul, which reads them faster when decoding, each layer on
    its first forward (loading reads no weights); a packed pipeline cannot be saved. `limits`: the serving
    engine's `EngineLimits` (running rows, queue, KV-cache budget). Extra keyword arguments set generation
    defaults."""
    torch.set_num_threads(threads or default_threads())
    if path is not None:
        meta = read_meta(Path(path))
        if meta and meta.get("composition"):
            if device_map is not None:
                raise CheckpointError("device_map is not supported for compositions yet: give device=")
            return _load_composition(Path(path), meta, dtype=dtype, device=device,
                                     router=router or _saved_router(Path(path), meta), threads=threads,
                                     limits=limits, adapters=adapters, quantize=quantize,
                                     pack_weights=pack_weights, **generation)
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
    _weight_format(model, quantize, pack_weights)
    processor = Processor.from_pretrained(path, model.config)
    gen_defaults = dict(loaded.meta.get("generation", {}))
    gen_defaults.update(generation)
    opts = GenerationOptions.from_kwargs(None, **gen_defaults)
    name = "embedded" if path == EMBEDDED_DIR else str(path)
    if router is None and loaded.meta.get("router"):
        router = _saved_router(path, loaded.meta)
    return Pipeline(model, processor, router=router, generation=opts, name=name, meta=loaded.meta, limits=limits)


def _weight_format(model, quantize: str | None, pack_weights: bool | None) -> None:
    """Quantize the base decoder's weights (`quantize`), or re-lay them out for oneDNN (`pack_weights`, default
    on for bfloat16 on a CPU)."""
    if quantize is not None:
        from .quant import pack_encoders, quantize as apply_quantization

        apply_quantization(model, quantize)
        if pack_weights is not False:
            pack_encoders(model)  # the decoder is in 8 or 4 bits; bf16 encoders are packed still
    elif pack_weights or (pack_weights is None and model.dtype == torch.bfloat16 and model.device.type == "cpu"):
        from .quant import pack_weights as pack

        pack(model)


_ROUTE_KEYS = {"text": (False, False), "image": (True, False), "audio": (False, True), "image+audio": (True, True)}


def _routing_table(router) -> dict | None:
    """A modality router's table for phimm.json (None for other routers: they are not saved)."""
    from routers import ModalityRouter

    if type(router) is not ModalityRouter:
        return None
    return {name: router.table[key] for name, key in _ROUTE_KEYS.items()}


def _saved_router(path: Path, meta: dict):
    """The router phimm.json records: a learned router's folder, or a modality table (None: the default)."""
    from routers import LearnedRouter, ModalityRouter

    if meta.get("router"):
        return LearnedRouter.load(path / meta["router"])
    table = meta.get("routing")
    if not table:
        return None
    return ModalityRouter({key: table.get(name) for name, key in _ROUTE_KEYS.items()})


# ---- compositions -------------------------------------------------------------------------------------------


def compose(base: str | Path, vision: str | Path | None = None, speech: str | Path | None = None,
            adapters: dict | None = None, router=None, *, dtype="float32", device="cpu", speech_stack: int = 4,
            seed: int = 0, threads: int | None = None, limits: EngineLimits | None = None,
            projectors: str | Path | None = None, meta: dict | None = None, quantize: str | None = None,
            pack_weights: bool | None = None, **generation) -> Pipeline:
    """A `Pipeline` over a composition of local Hugging Face parts (`phimm.compose`'s module docstring):
    `base` any causal LM folder, `vision` a SigLIP / CLIP folder, `speech` a Whisper folder, `adapters`
    name -> peft folder. `router`: any phimm router (default: the modality table over the adapters given).
    `projectors`: a safetensors file of trained projectors (default: new ones, drawn with `seed`). `quantize`,
    `pack_weights`: as `phimm.load`. Extra keyword arguments set generation defaults."""
    torch.set_num_threads(threads or default_threads())
    model, processor = build_composition(base, vision, speech, adapters, dtype=resolve_dtype(dtype), device=device,
                                         speech_stack=speech_stack, seed=seed, projectors=projectors)
    _weight_format(model, quantize, pack_weights)
    meta = dict(meta or {})
    meta.setdefault("sources", {"base": str(base), "vision": str(vision) if vision else None,
                                "speech": str(speech) if speech else None})
    opts = GenerationOptions.from_kwargs(None, **generation)
    return Pipeline(model, processor, router=router or default_router(model.adapter_names), generation=opts,
                    name=str(base), meta=meta, limits=limits)


def _load_composition(path: Path, meta: dict, *, dtype="float32", device="cpu", router=None, threads=None,
                      limits=None, adapters=None, quantize=None, pack_weights=None, **generation) -> Pipeline:
    """`phimm.load` of a saved composition (phimm.json with a `composition` entry)."""
    entry = meta["composition"]
    folders = {name: path / rel for name, rel in (meta.get("adapters") or {}).items()}
    if adapters is not None:
        missing = sorted(set(adapters) - set(folders))
        if missing:
            raise UnknownAdapterError(f"adapters {missing} are not in {path}; it has {sorted(folders)}")
        folders = {n: folders[n] for n in adapters}
    gen = dict(meta.get("generation") or {})
    gen.update(generation)
    return compose(path / entry["base"], path / entry["vision"] if entry.get("vision") else None,
                   path / entry["speech"] if entry.get("speech") else None, folders, router, dtype=dtype,
                   device=device, speech_stack=int(entry.get("speech_stack", 4)), threads=threads, limits=limits,
                   projectors=path / entry["projectors"], meta=meta, quantize=quantize, pack_weights=pack_weights,
                   **gen)
