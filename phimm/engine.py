"""The serving engine: iteration-level (continuous) batching, every row on its own route.

One thread loops over steps. Each step:

- admit: waiting requests, first come first served, while the limits allow (running rows, KV-cache budget,
  prompt tokens per step); while rows decode, arrivals may gather for `prefill_delay_steps` steps first;
- prefill: the admitted rows in buckets of similar length, one forward each (rows left-padded and masked, at most
  a quarter padding, each row on its own adapter), media features merged in by the model per row; each row's
  first token is chosen;
- join: prefilled rows enter the running batch's cache (`BatchCache`);
- decode: one forward for all running rows, each row's adapter passed with it (`RowAdapters`), one token each;
- or, when rows are running and the model allows it (`mixed_steps`), prefill and decode in one forward: the
  admitted rows' prompts and the running rows' next tokens together (`phimm.step.MixedStep`), every row on its
  own adapter; the admitted rows get their first token and join, the others their next;
- leave: finished, cancelled and failed rows leave the batch at once and their cache space is freed.

The engine owns scheduling and the KV cache; the model computes; callers (the `Pipeline`, the server) own the
requests. Everything is on `model.device`, so the same loop runs on CPU and CUDA.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from routers import Route

from . import graphs
from .cache import BatchCache, PreallocatedCache
from .errors import (ContextLengthError, EngineClosedError, EngineError, GenerationConfigError, PhimmError,
                     QueueFullError)
from .generation import GenerationOptions, choose, process_logits
from .step import MixedStep
from .types import Output, Prepared

log = logging.getLogger("phimm.engine")

_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_engines() -> None:
    """Stop every engine's thread before the interpreter tears down: a thread left inside a torch op while the
    process exits can abort it ("terminate called without an active exception")."""
    for engine in list(_LIVE):
        engine.close()


@dataclass(frozen=True)
class EngineLimits:
    """The engine's limits. A request that does not fit now waits; one that could never fit is refused."""

    max_running: int = 16  # rows decoding together
    max_waiting: int = 256  # requests queued for a place; beyond it `submit` raises QueueFullError
    kv_budget_tokens: int = 65536  # cache positions (rows x padded width) the running batch may reach
    max_prefill_tokens: int = 4096  # prompt tokens prefilled in one step (a longer prompt is prefilled alone)
    # while rows decode, a new request waits up to this many decode steps so that several arrivals share one
    # prefill forward (0: prefill each step's arrivals at once); an idle engine admits at once. None: 0 where
    # arrivals are prefilled inside the decode forward (`Engine.mixed_steps`: waiting saves no forward), else 2
    prefill_delay_steps: int | None = None

    def __post_init__(self):
        for name in ("max_running", "max_waiting", "kv_budget_tokens", "max_prefill_tokens", "prefill_delay_steps"):
            v = getattr(self, name)
            if v is None and name == "prefill_delay_steps":
                continue
            low = 0 if name == "prefill_delay_steps" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise GenerationConfigError(f"engine limit {name} must be an integer >= {low}, got {v!r}")


@dataclass
class Delta:
    """What one step added to a request: its new text and token ids; `output` is set on the last delta."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    time: float = 0.0
    output: Output | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None


class RequestStream:
    """One request inside the engine: iterate it for its `Delta`s (`for d in s` or `async for d in s`), or
    wait for its `Output` (`s.result()`, `await s.aresult()`, `s.future`). `cancel()` ends it at the next step.
    Thread-safe: the engine's thread pushes, any one consumer reads."""

    def __init__(self, request_id: int, route: Route, prompt_tokens: int, engine,
                 loop: asyncio.AbstractEventLoop | None = None, events: bool = True, sink=None):
        self.id = request_id
        self.route = route
        self.prompt_tokens = prompt_tokens
        self.audio_seconds = 0.0  # the request's audio, in seconds
        self._sink = sink  # called with each delta instead of queueing it (a server's worker forwards them)
        self.future: Future[Output] = Future()
        self.cancelled = False  # asked to stop; the engine ends it at its next step
        self._engine = engine
        self._loop = loop
        self._events = events
        self._queue: asyncio.Queue | collections.deque | None = None
        self._cond = threading.Condition()
        if events:
            self._queue = asyncio.Queue() if loop is not None else collections.deque()

    @property
    def output(self) -> Output | None:
        return self.future.result() if self.future.done() else None

    def _push(self, delta: Delta) -> None:  # engine thread
        if delta.output is not None and not self.future.done():
            self.future.set_result(delta.output)
        if self._sink is not None:
            self._sink(delta)
            return
        if not self._events:
            return
        if self._loop is not None:
            if not _mailbox(self._loop).put(self._queue, delta):  # the consumer's event loop is gone
                self.cancel()
            return
        with self._cond:
            self._queue.append(delta)
            self._cond.notify_all()

    def cancel(self) -> None:
        """Stop generating for this request; it ends with finish_reason "cancelled" (no-op once finished)."""
        if not self.future.done():
            self.cancelled = True
            self._engine._cancel(self)

    def __iter__(self) -> Iterator[Delta]:
        if self._loop is not None or not self._events:
            raise TypeError("this stream is consumed with `async for` (or through .future)")
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                delta = self._queue.popleft()
            yield delta
            if delta.finished:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        async for batch in self.batches():
            for delta in batch:
                yield delta

    async def batches(self) -> AsyncIterator[list[Delta]]:
        """The deltas in lists: everything that arrived by the time the consumer woke up (under load, several
        steps' worth), so that a server can write them at once."""
        if self._loop is None:
            raise TypeError("this stream was opened without an event loop: iterate it with `for`")
        while True:
            batch = [await self._queue.get()]
            while not batch[-1].finished and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            yield batch
            if batch[-1].finished:
                return

    def result(self, timeout: float | None = None) -> Output:
        return self.future.result(timeout)

    async def aresult(self) -> Output:
        return await asyncio.wrap_future(self.future)


class _Mailbox:
    """Deltas bound for one event loop's streams, handed over in one wake-up of that loop for everything pushed
    meanwhile (a step's worth of rows), instead of one wake-up per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Delta]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, delta: Delta) -> bool:
        with self.lock:
            first = not self.items
            self.items.append((queue, delta))
        if first:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed
                return False
        return True

    def _drain(self) -> None:  # on the loop
        with self.lock:
            items, self.items = self.items, []
        for queue, delta in items:
            queue.put_nowait(delta)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _MAILBOXES_LOCK:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = _Mailbox(loop)
        return box


@dataclass
class _Row:
    """A request's state inside the engine."""

    stream: RequestStream
    prepared: Prepared
    route: Route
    opts: GenerationOptions
    eos: tuple[int, ...]
    arrival: float
    generator: torch.Generator | None = None
    sampled: list[int] = field(default_factory=list)  # every chosen token, end tokens included
    tokens: list[int] = field(default_factory=list)  # the answer's tokens (no end token)
    logits: list[torch.Tensor] = field(default_factory=list)
    emitted: str = ""
    text: str = ""  # the answer's text decoded so far, complete characters only (`Engine._text`)
    prefix_offset: int = 0  # tokens[prefix_offset:read_offset] decode to the end of `text`
    read_offset: int = 0
    first_time: float | None = None
    last_time: float | None = None
    finish_reason: str | None = None
    error: PhimmError | None = None
    last_delta: tuple[str, list[int]] = ("", [])  # the final step's text and token, sent with the Output
    queued_step: int = 0  # the engine's decode-step count when the request was queued
    eos_tensor: torch.Tensor | None = None  # `eos` as a tensor, for logits processing

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    @property
    def prompt_len(self) -> int:
        return len(self.prepared.input_ids)

    @property
    def final_len(self) -> int:
        """Cache positions the row holds at most: its prompt and every token it may generate."""
        return self.prompt_len + self.opts.max_new_tokens


class Engine:
    """Continuous batching over one model. Create it through `Pipeline.engine`; `submit` prepared rows."""

    def __init__(self, model, tokenizer, *, limits: EngineLimits | None = None, eos_token_ids: Sequence[int],
                 pad_token_id: int, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_context = max_context
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []
        self._graphs = None  # CUDA graphs of the decode step (`phimm.graphs`), on a GPU
        if graphs.enabled(model.device) and graphs.supports(model):
            self._graphs = graphs.GraphDecoder(model)
        self._cache = self._new_cache()
        # arrivals prefilled in the running batch's decode forward (`phimm.step`); CUDA graphs decode apart
        self.mixed_steps = self._graphs is None and bool(getattr(model, "mixed_steps", False))
        self._row_adapters = None  # RowAdapters of the running rows, remade when they change
        self.kv_bytes_peak = 0  # the running batch's cache, at its largest
        self._thread: threading.Thread | None = None
        self._closed = False
        self._threads = torch.get_num_threads()
        self.counters = collections.Counter()  # steps, prefills, tokens, finished by reason
        self.busy_s = 0.0  # seconds the loop spent in steps (the rest it waited for work)
        # PHIMM_PROFILE=1: seconds per phase of the step (the device synchronised at each phase's ends)
        self.profile = os.environ.get("PHIMM_PROFILE", "") not in ("", "0")
        self.phase_s: collections.Counter = collections.Counter()
        _LIVE.add(self)

    # ---- callers' side (any thread) ------------------------------------------------------------------------
    def submit(self, prepared: Prepared, route: Route, opts: GenerationOptions, *, arrival: float | None = None,
               loop: asyncio.AbstractEventLoop | None = None, events: bool = True, sink=None) -> RequestStream:
        """Queue one prepared, routed request. Raises `ContextLengthError` if it can never fit and
        `QueueFullError` if the queue is full, before any work. `sink`: a callable that takes each delta
        (from the engine's thread) instead of the stream's queue."""
        return self.submit_many([(prepared, route, opts)], arrival=arrival, loop=loop, events=events, sink=sink)[0]

    def submit_many(self, items: Sequence[tuple[Prepared, Route, GenerationOptions]], *,
                    arrival: float | None = None, loop: asyncio.AbstractEventLoop | None = None,
                    events: bool = True, sink=None) -> list[RequestStream]:
        """Queue several requests at once (they are admitted together as far as the limits allow)."""
        arrival = time.perf_counter() if arrival is None else arrival
        rows = []
        for prepared, route, opts in items:
            self.check_fits(len(prepared.input_ids), opts.max_new_tokens)
            stream = RequestStream(next(self._ids), route, len(prepared.input_ids), self, loop, events, sink)
            stream.audio_seconds = float(sum(a.seconds for a in prepared.audios))
            generator = None
            if opts.do_sample:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
            eos = opts.eos_token_id or self.eos_token_ids
            rows.append(_Row(stream, prepared, route, opts, tuple(eos), arrival, generator))
        with self._cond:
            for r in rows:
                r.queued_step = self.counters["steps"]
            if self._closed:
                raise EngineClosedError("the engine is closed; load the model again")
            if len(self._waiting) + len(rows) > self.limits.max_waiting:
                raise QueueFullError(f"the queue is full ({len(self._waiting)} requests waiting, at most "
                                     f"{self.limits.max_waiting}); retry later")
            self._waiting.extend(rows)
            self._start()
            self._cond.notify_all()
        return [r.stream for r in rows]

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise `ContextLengthError` for a request that could never run: longer than the model's context or
        than the KV-cache budget."""
        need = prompt_tokens + max_new_tokens
        if self.max_context is not None and need > self.max_context:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                f"{need} > the model's context of {self.max_context} tokens; shorten the prompt or ask for fewer")
        if need > self.limits.kv_budget_tokens:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: {need} > "
                f"the engine's KV-cache budget of {self.limits.kv_budget_tokens} tokens")

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time one phase of a step into `phase_s` (only with PHIMM_PROFILE=1)."""
        if not self.profile:
            yield
            return
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda *a: None)
        sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.phase_s[name] += time.perf_counter() - t

    def _new_cache(self) -> BatchCache:
        layers = self.model.config.num_hidden_layers
        if self._graphs is not None:
            return graphs.StaticBatchCache(layers, self.limits.max_running, self.limits.kv_budget_tokens)
        return BatchCache(layers, self.limits.max_running, self.limits.kv_budget_tokens)

    def stats(self) -> dict:
        with self._cond:
            out = {"running": len(self._running), "waiting": len(self._waiting),
                   "kv_positions": self._cache.positions, "kv_bytes_peak": self.kv_bytes_peak,
                   "busy_s": round(self.busy_s, 3), **self.counters}
            if self.profile:
                out.update({f"{k}_s": round(v, 4) for k, v in self.phase_s.items()})
            if self._graphs is not None:
                out.update(graph_captures=self._graphs.captures, graph_replays=self._graphs.replays)
                if self._graphs.capture_error:
                    out["graph_capture_error"] = self._graphs.capture_error
            return out

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end with `EngineClosedError`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _cancel(self, stream: RequestStream) -> None:  # the stream is marked; wake the loop to end it
        with self._cond:
            self._cond.notify_all()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="phimm-engine", daemon=True)
            self._thread.start()

    # ---- the loop (engine thread) --------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._closed and not self._waiting and not self._running:
                            self._cond.wait()
                        if self._closed:
                            break
                        cancelled = [r for r in self._waiting if r.cancelled]
                        for r in cancelled:
                            self._waiting.remove(r)
                        admitted = self._admit()
                    for r in cancelled:
                        self._finish(r, "cancelled")
                    t = time.perf_counter()
                    self.step(admitted)
                    self.busy_s += time.perf_counter() - t
                    del admitted, cancelled  # their inputs (image crops, audio features) not kept while idle
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            log.exception("the engine loop stopped")
            self._fail_all(EngineClosedError(f"the engine stopped on an internal error: {e!r}"))
            raise
        self._fail_all(EngineClosedError("the engine was closed before this request finished"))

    def _fail_all(self, error: PhimmError) -> None:
        with self._cond:
            self._closed = True
            rows = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
        for r in rows:
            r.error = error
            self._finish(r, "error")

    def _admit(self) -> list[_Row]:
        """Waiting rows that fit now, first come first served (called with the lock held). While rows decode,
        arrivals gather for `prefill_delay_steps` steps first, unless they would fill the batch anyway."""
        limits = self.limits
        admitted: list[_Row] = []
        n_rows = len(self._running)
        delay = limits.prefill_delay_steps
        if delay is None:
            delay = 0 if self.mixed_steps else 2
        if (n_rows and self._waiting and len(self._waiting) < limits.max_running - n_rows
                and self.counters["steps"] - self._waiting[0].queued_step < delay):
            return admitted
        width = max((r.final_len for r in self._running), default=0)
        prefill = 0
        while self._waiting:
            row = self._waiting[0]
            new_width = max(width, row.final_len)
            if n_rows + 1 > limits.max_running or (n_rows + 1) * new_width > limits.kv_budget_tokens:
                break
            if admitted and prefill + row.prompt_len > limits.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
            n_rows, width, prefill = n_rows + 1, new_width, prefill + row.prompt_len
        return admitted

    def step(self, admitted: Sequence[_Row] = ()) -> None:
        """One iteration: drop cancelled rows, prefill `admitted` and join them, decode one token for every
        running row, drop finished rows."""
        self._leave([r for r in self._running if r.cancelled], "cancelled")
        if admitted and self._running and self.mixed_steps:
            self._mixed(admitted)
            return
        joined = self._prefill(admitted)
        if joined:
            with self._phase("join"):
                self._cache.add_rows([(cache, j, start, r.prompt_len) for r, cache, j, start in joined])
            with self._cond:
                self._running.extend(r for r, _, _, _ in joined)
            self._row_adapters = None
        # rows admitted in this step already have their first token; the others get their next one
        if self._running:
            self._decode()

    def _prefill(self, rows: Sequence[_Row]) -> list[tuple[_Row, PreallocatedCache, int, int]]:
        """Prefill `rows` in buckets of similar length (`prefill_buckets`): one decoder forward per bucket, rows
        left-padded to its longest and masked, each row on its own adapter; media features are made per row,
        the encoders on that row's adapter. Returns (row, cache, row in it, first column) for the rows
        that go on decoding; rows whose input fails get their error, the others go on."""
        joined = []
        for bucket in prefill_buckets([r.prompt_len for r in rows]):
            with self._phase("embed"):
                group = self._embed_rows([rows[i] for i in bucket])
            if not group:
                continue
            try:
                with self._phase("prefill"):
                    cache, logits, width = self._prefill_forward(group)
            except Exception as e:  # noqa: BLE001 - this bucket's rows fail, the engine serves on
                self._fail([r for r, _ in group], e)
                continue
            group = [r for r, _ in group]
            self.counters["prefills"] += 1
            self.counters["prompt_tokens"] += sum(r.prompt_len for r in group)
            with self._phase("choose"):
                chosen = self._choose(group, logits)
            for j, (r, more) in enumerate(zip(group, chosen)):
                if more:
                    joined.append((r, cache, j, width - r.prompt_len))
                else:
                    self._finish(r, r.finish_reason, *r.last_delta)
        return joined

    def _embed_rows(self, rows: Sequence[_Row]) -> list[tuple[_Row, torch.Tensor]]:
        """Each row's input embeddings `[T, D]` (media features merged in, the encoders on the row's adapter); a
        row whose media do not fit its prompt fails alone."""
        model = self.model
        out = []
        prefetched = None
        if sum(len(r.prepared.images) + len(r.prepared.audios) for r in rows) > 1 and hasattr(model, "prefetch_media"):
            try:  # the rows' media through the encoders together (a failure here: each row alone, below)
                prefetched = model.prefetch_media([(r.prepared.images, r.prepared.audios, r.route.audio_projector,
                                                    r.route.adapter) for r in rows])
            except Exception:  # noqa: BLE001 - the per-row path finds which row fails
                log.debug("encoding the rows' media together failed; encoding them one by one", exc_info=True)
        for r in rows:
            try:
                ids = torch.tensor([r.prepared.input_ids], dtype=torch.long, device=model.device)
                media = [(r.prepared.images, r.prepared.audios, r.route.audio_projector)]
                rows_arg = model.row_adapters([r.route.adapter])
                extra = {"prefetched": prefetched} if prefetched else {}  # (a model without prefetch_media)
                out.append((r, model.embed_inputs(ids, media, rows_arg, **extra)[0]))
            except Exception as e:  # noqa: BLE001 - this row fails, the others go on
                self._fail([r], e)
        return out

    def _prefill_forward(self, group: Sequence[tuple[_Row, torch.Tensor]]):
        """One decoder forward over left-padded rows: (their cache, last-position logits `[k, V]`, width)."""
        model = self.model
        device = model.device
        width = max(r.prompt_len for r, _ in group)
        k = len(group)
        embeds = group[0][1].new_zeros(k, width, group[0][1].shape[-1])  # [k, T, D]
        mask = torch.zeros(k, width, dtype=torch.long, device=device)
        pos = torch.zeros(k, width, dtype=torch.long, device=device)
        for j, (r, emb) in enumerate(group):
            n = r.prompt_len
            embeds[j, width - n:] = emb
            mask[j, width - n:] = 1
            pos[j, width - n:] = torch.arange(n, device=device)
        cache = PreallocatedCache(model.config.num_hidden_layers, width)
        rows_arg = model.row_adapters([r.route.adapter for r, _ in group])
        hidden = model.decode(embeds, mask, pos, cache, rows_arg)
        return cache, model.logits(hidden[:, -1], rows_arg), width

    def _mixed(self, admitted: Sequence[_Row]) -> None:
        """One forward that prefills `admitted` and decodes the running rows (`phimm.step`): the running rows get
        their next token, the admitted ones their first, and join the batch. If the forward fails, the batch's
        cache is put back, the admitted rows fail and the running ones decode as usual."""
        model = self.model
        device = model.device
        with self._phase("embed"):
            group = self._embed_rows(admitted)
        running = list(self._running)
        if not group:
            self._decode()
            return
        new = [r for r, _ in group]
        rows = running + new
        try:
            with self._phase("mixed"):
                tokens = torch.tensor([r.sampled[-1] for r in running], dtype=torch.long, device=device)
                embeds = torch.cat([model.embed_tokens(tokens)] + [e for _, e in group])[:, None]  # [N, 1, D]
                step = MixedStep(self._cache, [r.prompt_len for r in new])
                token_rows = model.row_adapters([r.route.adapter for r in running]
                                                + [r.route.adapter for r in new for _ in range(r.prompt_len)])
                try:
                    with step.active():
                        hidden = model.decode(embeds, None, step.positions(device), step, token_rows)
                    rows_arg = model.row_adapters([r.route.adapter for r in rows])
                    last = torch.tensor(step.last_tokens(), device=device)
                    logits = model.logits(hidden[:, -1].index_select(0, last), rows_arg)  # [B, V]
                except BaseException:
                    step.abort()
                    raise
                step.finish()
        except Exception as e:  # noqa: BLE001 - the joining rows fail, the running ones go on
            self._fail(new, e)
            self._decode()
            return
        with self._cond:
            self._running = rows
        self._row_adapters = rows_arg
        self.kv_bytes_peak = max(self.kv_bytes_peak, self._cache.nbytes)
        self.counters["steps"] += 1
        self.counters["prefills"] += 1
        self.counters["mixed_steps"] += 1
        self.counters["prompt_tokens"] += sum(r.prompt_len for r in new)
        self._next_tokens(rows, logits)

    def _decode(self) -> None:
        model = self.model
        device = model.device
        running = self._running
        try:
            if self._row_adapters is None:
                self._row_adapters = model.row_adapters([r.route.adapter for r in running])
            if self._graphs is not None:
                with self._phase("decode"):
                    logits = self._graphs.step(self._cache, [r.sampled[-1] for r in running], self._row_adapters)
                self._cache.advance()
            else:
                with self._phase("decode"):
                    tokens = torch.tensor([[r.sampled[-1]] for r in running], dtype=torch.long, device=device)
                    mask = self._cache.attention_mask(1, device=device)
                    pos = self._cache.next_positions(device=device)
                    hidden = model.decode(model.embed_tokens(tokens), mask, pos, self._cache, self._row_adapters)
                    self._cache.advance()
                    logits = model.logits(hidden[:, -1], self._row_adapters)  # [B, V]
            self.kv_bytes_peak = max(self.kv_bytes_peak, self._cache.nbytes)
        except Exception as e:  # noqa: BLE001 - the batch's rows fail, the engine serves on
            self._fail(list(running), e)
            self._cache = self._new_cache()
            with self._cond:
                self._running = []
            self._row_adapters = None
            return
        self.counters["steps"] += 1
        self._next_tokens(running, logits)

    def _next_tokens(self, rows: Sequence[_Row], logits: torch.Tensor) -> None:
        """Choose and emit each running row's token from its logits `[B, V]`; the rows that are done leave."""
        with self._phase("choose"):
            more = self._choose(rows, logits)
        done = [r for r, m in zip(rows, more) if not m]
        if done:
            self._leave(done, None)  # out of the batch first: a caller told "finished" finds it gone
            for r in done:
                self._finish(r, r.finish_reason, *r.last_delta)

    def _leave(self, rows: Sequence[_Row], reason: str | None) -> None:
        """Remove `rows` from the running batch (freeing their cache columns); `reason`: finish them so."""
        if not rows:
            return
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self._running) if id(r) not in gone]
        with self._phase("leave"):
            self._cache.keep_rows(keep)
        with self._cond:
            self._running = [self._running[i] for i in keep]
        self._row_adapters = None
        if reason is not None:
            for r in rows:
                self._finish(r, reason)

    def _fail(self, rows: Sequence[_Row], e: Exception) -> None:
        if not isinstance(e, PhimmError):
            log.exception("a forward failed for %d row(s)", len(rows))
            e = EngineError(f"the model failed on this request: {type(e).__name__}: {e}")
        for r in rows:
            r.error = e
            self._finish(r, "error")

    # ---- tokens --------------------------------------------------------------------------------------------
    def _choose(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[bool]:
        """Choose each row's next token from its `[V]` logits, emit it; returns whether each row goes on."""
        now = time.perf_counter()
        tokens: list[int | None] = [None] * len(rows)
        # greedy rows with nothing to process: one argmax for all. Before `min_new_tokens` an end token is
        # masked, which changes the choice only where the argmax is an end token: those rows go the long way
        plain = [i for i, r in enumerate(rows) if r.opts.greedy_unprocessed]
        if plain:
            idx = torch.tensor(plain, device=logits.device)
            for i, t in zip(plain, logits.index_select(0, idx).argmax(-1).tolist()):
                r = rows[i]
                if t not in r.eos or r.opts.argmax_at(len(r.sampled)):
                    tokens[i] = t
        for i, r in enumerate(rows):
            if tokens[i] is None:
                generated = torch.tensor([r.sampled], dtype=torch.long, device=logits.device)
                if r.eos_tensor is None:  # made once per row, on the first step that processes logits
                    r.eos_tensor = torch.tensor(sorted(set(r.eos)), dtype=torch.long, device=logits.device)
                scores = process_logits(logits[i:i + 1], generated, len(r.sampled), r.opts, r.eos_tensor)
                tokens[i] = int(choose(scores, r.opts, r.generator)[0])
        return [self._emit(r, t, logits[i] if r.opts.output_logits else None, now)
                for i, (r, t) in enumerate(zip(rows, tokens))]

    def _emit(self, row: _Row, token: int, logits: torch.Tensor | None, now: float) -> bool:
        """Record a row's new token and send its text; returns False when the row is done (the caller finishes
        it with `row.finish_reason` and `row.last_delta` once it has left the batch)."""
        row.sampled.append(token)
        row.first_time = row.first_time or now
        row.last_time = now
        self.counters["generated_tokens"] += 1
        if logits is not None:
            row.logits.append(logits.float().clone())
        reason = None
        new_ids: list[int] = []
        if token in row.eos:
            reason = "stop"
        else:
            row.tokens.append(token)
            new_ids = [token]
        final = reason is not None or len(row.sampled) >= row.opts.max_new_tokens
        text = self._text(row, final)
        stops = row.opts.stop_strings
        if stops and reason is None:
            cut = _first_stop(text, stops, start=max(0, len(row.emitted) - max(map(len, stops))))
            if cut is not None:
                text, reason = text[:cut], "stop"
        if reason is None and len(row.sampled) >= row.opts.max_new_tokens:
            reason = "length"
        if reason is None:
            # hold back an incomplete character, and a tail that may be the start of a stop string
            hold = max((len(s) - 1 for s in stops), default=0)
            visible = text[: len(text) - hold] if hold else text
            if visible.endswith("\ufffd") or not visible.startswith(row.emitted):
                visible = row.emitted
            delta, row.emitted = visible[len(row.emitted):], visible
            row.stream._push(Delta(delta, new_ids, now))
            return True
        row.finish_reason = reason
        row.last_delta = (text[len(row.emitted):] if text.startswith(row.emitted) else "", new_ids)
        row.emitted = text
        return False

    def _text(self, row: _Row, full: bool) -> str:
        """The row's answer so far. `full`: decoded whole (a finished row's exact text). Otherwise
        incrementally: only the tokens since the last complete character are decoded (with the window before them,
        so that tokenizers that drop a leading space at the start of a decode are diffed right), not the whole
        answer at every step."""
        if full:
            return self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        toks = row.tokens
        prefix = self.tokenizer.decode(toks[row.prefix_offset:row.read_offset], skip_special_tokens=True)
        window = self.tokenizer.decode(toks[row.prefix_offset:], skip_special_tokens=True)
        if len(window) > len(prefix) and window.startswith(prefix) and not window.endswith("\ufffd"):
            row.text += window[len(prefix):]
            row.prefix_offset, row.read_offset = row.read_offset, len(toks)
        return row.text

    def _finish(self, row: _Row, reason: str, delta: str = "", new_ids: Sequence[int] = ()) -> None:
        now = time.perf_counter()
        out = Output(
            text=row.emitted if row.error is None else "",
            token_ids=list(row.tokens),
            route=row.route,
            logits=torch.stack(row.logits) if row.logits else None,
            error=row.error,
            finish_reason=reason,
            prompt_tokens=row.prompt_len,
            ttft_s=(row.first_time - row.arrival) if row.first_time else None,
            decode_s=(row.last_time - row.first_time) if row.first_time else None,
            total_s=now - row.arrival,
        )
        self.counters[f"finished_{reason}"] += 1
        row.stream._push(Delta(delta, list(new_ids), now, out))


PAD_WASTE = 0.25  # a prefill bucket computes at most this share more positions than its rows have


def prefill_buckets(lengths: Sequence[int], pad_waste: float = PAD_WASTE) -> list[list[int]]:
    """Rows to prefill in one forward each: sorted by length, a bucket grows while padding every row to its
    longest costs at most `pad_waste` more positions than the rows hold (equal lengths: no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            b = buckets[-1]
            total = sum(lengths[x] for x in b) + lengths[i]
            if lengths[i] * (len(b) + 1) <= (1 + pad_waste) * total:
                b.append(i)
                continue
        buckets.append([i])
    return buckets


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the first stop string begins (searching from `start`), or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
