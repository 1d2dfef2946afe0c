"""The server's engine in a process of its own.

Python runs one thread at a time per process: in one process, the HTTP event loop (parsing requests, writing
server-sent events) and the engine's decode loop would take turns. `phimm serve` therefore loads the model in a
worker process that runs the engine; the HTTP process prepares requests (tokens, image crops, audio features: a
`Preparer`, sent by the worker once it has loaded) and talks to it over a pipe:

    HTTP process                                  worker process
    Preparer(request): processed and routed here, on the other core
    EngineProcess.open(request) --("submit")-->   Pipeline.open_prepared(..., sink=...)  -> engine thread
    stream (asyncio queue)      <--("deltas")--   sender thread: every delta since its last send, in one message
    stream.cancel()             --("cancel")-->   the engine ends the row at its next step

A request's image crops and audio features are most of its bytes on the pipe (hundreds of kilobytes to tens of
megabytes), and a chat sends the same image at every turn. Both ends keep a `MediaTable` of the media sent
lately: a medium the worker already holds crosses as its digest only. The two tables change in the same order
(the HTTP side decides under the send lock, the worker reads messages in order), with the same byte limit, so
they always hold the same media.

`EngineProcess` offers what the app calls on a `Pipeline` (`open`, `stats`, `adapters`, `name`, `close`), so the
app serves either. If the worker dies, every open request ends with `EngineClosedError` and /health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import logging
import multiprocessing
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..engine import Delta, RequestStream
from ..errors import EngineClosedError, PhimmError
from ..types import Output, tensor_nbytes

log = logging.getLogger("phimm.serve.worker")

STATS_EVERY_S = 0.25  # the worker sends the engine's counts at least this often while busy, and each second idle
MEDIA_TABLE_BYTES = 128 << 20  # the media each end of the pipe keeps (tensor bytes), so that repeats cross by digest


@dataclasses.dataclass(frozen=True)
class MediaRef:
    """A medium the worker already holds, by its digest (`ImageInput.digest` / `AudioInput.digest`)."""

    digest: bytes


class MediaTable:
    """The media one end of the pipe has sent or received lately, least recently used first out, at most
    `max_bytes` of tensors (a medium larger than that is never kept). The HTTP side's `encode` and the worker's
    `decode` make the same changes for the same message, so the two tables stay equal."""

    def __init__(self, max_bytes: int = MEDIA_TABLE_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, Any] = OrderedDict()
        self.nbytes = 0

    def _add(self, digest: bytes, medium) -> None:
        size = tensor_nbytes(medium)
        if size > self.max_bytes:
            return
        self.entries[digest] = medium
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= tensor_nbytes(old)

    def _map(self, prepared, one):
        return dataclasses.replace(prepared, images=[one(m) for m in prepared.images],
                                   audios=[one(m) for m in prepared.audios])

    def encode(self, prepared):
        """`prepared` as it crosses: each medium the other end holds as a `MediaRef`."""
        def one(m):
            d = m.digest()
            if d in self.entries:
                self.entries.move_to_end(d)
                return MediaRef(d)
            self._add(d, m)
            return m
        return self._map(prepared, one)

    def decode(self, prepared):
        """`prepared` as it was sent, each `MediaRef` resolved; raises `KeyError` for one this end lacks."""
        def one(m):
            if isinstance(m, MediaRef):
                medium = self.entries[m.digest]
                self.entries.move_to_end(m.digest)
                return medium
            d = m.digest()
            if d in self.entries:  # sent in full although held (cannot happen while the tables agree)
                self.entries.move_to_end(d)
            else:
                self._add(d, m)
            return m
        return self._map(prepared, one)


def _tensor_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    flat = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    return flat.view(getattr(torch, dtype)).reshape(shape)


class _PlainPickler(pickle.Pickler):
    """Tensors travel as their bytes, copied into the message. `Connection.send` would pickle them with torch's
    reducers, which move every tensor's storage through shared memory: a socket connection, an authentication
    handshake and a passed file descriptor per tensor, on both sides, costing more CPU than the copy of a
    request's few hundred kilobytes."""

    def reducer_override(self, obj):
        if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
            t = obj.detach().contiguous().cpu()
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return _tensor_from_bytes, (data, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        return NotImplemented


def _dumps(msg) -> bytes:
    buf = io.BytesIO()
    _PlainPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(msg)
    return buf.getvalue()


def _send_msg(conn, msg, lock: threading.Lock | None = None) -> None:
    data = _dumps(msg)  # pickled before taking the lock: other senders wait only for the write
    with lock or contextlib.nullcontext():
        conn.send_bytes(data)


def _recv_msg(conn):
    return pickle.loads(conn.recv_bytes())


class EngineProcess:
    """The HTTP side of the worker process. `load_kwargs` go to `phimm.load` in the worker."""

    def __init__(self, load_kwargs: dict[str, Any], startup_timeout_s: float = 600.0):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks copied over
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_worker_main, args=(load_kwargs, child), name="phimm-engine-worker",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._send_lock = threading.Lock()
        self._media = MediaTable()  # what the worker holds (changed only under the send lock)
        self._ids = itertools.count(1)
        self._streams: dict[int, RequestStream] = {}
        self._opening: dict[int, list] = {}  # rid -> [event, error or None]
        self._lock = threading.Lock()
        self._stats: dict = {}
        self.closed: BaseException | None = None
        if not self._conn.poll(startup_timeout_s):
            self._proc.kill()
            raise EngineClosedError(f"the engine worker did not load the model in {startup_timeout_s:g} s")
        try:
            kind, info = _recv_msg(self._conn)
        except EOFError:
            raise EngineClosedError(f"the engine worker exited while loading (exit code {self._proc.exitcode})") \
                from None
        if kind == "load_failed":
            self._proc.join(timeout=10)
            raise info
        self.name, self.adapters, self.max_context = info["name"], info["adapters"], info["max_context"]
        self._preparer = pickle.loads(info["preparer"]) if info.get("preparer") else None
        self._reader = threading.Thread(target=self._read, name="phimm-worker-reader", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"EngineProcess({self.name!r}, pid={self._proc.pid})"

    # ---- what the app calls ---------------------------------------------------------------------------------
    def open(self, x, *, loop: asyncio.AbstractEventLoop | None = None, arrival: float | None = None,
             clip_to_context: bool = False, **generation) -> RequestStream:
        """As `Pipeline.open`: prepared here (in the caller's thread) and queued in the worker; raises its
        `PhimmError` here."""
        if self.closed is not None:
            raise EngineClosedError(f"the engine worker is gone: {self.closed}")
        msg = "open"
        if self._preparer is not None:
            x, msg = self._preparer(x), "submit"  # a PhimmError for bad input is raised here, before the worker
        rid = next(self._ids)
        stream = RequestStream(rid, None, 0, self, loop)
        done = threading.Event()
        with self._lock:
            self._streams[rid] = stream
            self._opening[rid] = [done, None, None]
        arrival = time.perf_counter() if arrival is None else arrival  # CLOCK_MONOTONIC: shared by processes
        try:
            if msg == "submit":
                prepared, route = x
                with self._send_lock:  # the table changes in the order the worker reads the messages
                    before = (self._media.entries.copy(), self._media.nbytes)
                    try:
                        data = _dumps((msg, rid, (self._media.encode(prepared), route), generation, arrival,
                                       clip_to_context))
                    except BaseException:  # not sent: the worker's table did not change either
                        self._media.entries, self._media.nbytes = before
                        raise
                    self._conn.send_bytes(data)
            else:
                self._send((msg, rid, x, generation, arrival, clip_to_context))
        except (OSError, ValueError) as e:
            raise EngineClosedError(f"the engine worker is gone: {e}") from None
        done.wait()
        with self._lock:
            _, error, info = self._opening.pop(rid)
            if error is not None:
                self._streams.pop(rid, None)
        if error is not None:
            raise error
        stream.route, stream.prompt_tokens, stream.audio_seconds = info
        return stream

    def stats(self) -> dict:
        return dict(self._stats)

    def close(self) -> None:
        try:
            self._send(("close",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    # ---- plumbing -------------------------------------------------------------------------------------------
    def _cancel(self, stream: RequestStream) -> None:  # RequestStream.cancel calls this
        try:
            self._send(("cancel", stream.id))
        except (OSError, ValueError):
            pass

    def _send(self, msg) -> None:
        _send_msg(self._conn, msg, self._send_lock)

    def _read(self) -> None:
        try:
            while True:
                msg = _recv_msg(self._conn)
                kind = msg[0]
                if kind == "deltas":
                    if msg[2] is not None:
                        self._stats = msg[2]
                    for rid, delta in msg[1]:
                        with self._lock:
                            stream = self._streams.get(rid)
                            if delta.finished:
                                self._streams.pop(rid, None)
                        if stream is not None:
                            stream._push(delta)
                elif kind == "opened":
                    _, rid, info = msg
                    with self._lock:
                        self._opening[rid][2] = info
                        self._opening[rid][0].set()
                elif kind == "failed":
                    _, rid, error = msg
                    with self._lock:
                        self._opening[rid][1] = error
                        self._opening[rid][0].set()
        except (EOFError, OSError) as e:
            self._fail_all(EngineClosedError(f"the engine worker exited (exit code {self._proc.exitcode}): "
                                             f"{type(e).__name__}"))

    def _fail_all(self, error: EngineClosedError) -> None:
        self.closed = error
        with self._lock:
            streams, self._streams = self._streams, {}
            for pending in self._opening.values():
                pending[1] = error
                pending[0].set()
        now = time.perf_counter()
        for stream in streams.values():
            stream._push(Delta("", [], now, Output(route=stream.route, error=error, finish_reason="error",
                                                   prompt_tokens=stream.prompt_tokens)))


def _worker_main(load_kwargs: dict[str, Any], conn) -> None:
    """The worker process: load the model, then open requests as the HTTP process asks and send their deltas."""
    try:
        import phimm
        from phimm.engine import EngineLimits

        kwargs = dict(load_kwargs)
        if isinstance(kwargs.get("limits"), dict):
            kwargs["limits"] = EngineLimits(**kwargs["limits"])
        pipe = phimm.load(**kwargs)
        pipe.engine  # started before the first request
    except BaseException as e:  # noqa: BLE001 - sent to the HTTP process, which reports it
        _send_msg(conn, ("load_failed", e if isinstance(e, PhimmError) else EngineClosedError(f"{type(e).__name__}: {e}")))
        return
    try:  # the HTTP process prepares requests itself (on the other core) when the preparer pickles
        if getattr(pipe.router, "needs_features", False):
            raise TypeError("a router that needs the model's embedding of the prompt routes here")
        preparer = pickle.dumps(pipe.preparer())
    except Exception:  # noqa: BLE001 - a router that does not pickle, or needs the model: prepared here
        log.info("requests are prepared in the worker process (the router does not pickle or needs the model)")
        preparer = None
    _send_msg(conn, ("ready", {"name": pipe.name, "adapters": list(pipe.adapters), "max_context": pipe.engine.max_context,
                         "preparer": preparer}))
    outbox: list = []
    cond = threading.Condition()
    send_lock = threading.Lock()  # the main thread and the sender thread both send
    streams: dict[int, RequestStream] = {}
    media = MediaTable()  # what the HTTP process has sent lately (its own table is the same)
    stop = threading.Event()

    def send(msg) -> None:
        _send_msg(conn, msg, send_lock)

    def sink_for(rid: int):
        def sink(delta: Delta) -> None:  # the engine's thread
            with cond:
                outbox.append((rid, delta))
                cond.notify()
        return sink

    def send_loop() -> None:
        last_stats = 0.0
        while not stop.is_set():
            with cond:
                if not outbox:
                    cond.wait(timeout=1.0)
                items = outbox[:]
                outbox.clear()
            now = time.perf_counter()
            due = now - last_stats >= (STATS_EVERY_S if items else 1.0)
            if items or due:
                try:  # the engine's counts ride along at most every STATS_EVERY_S (None: unchanged)
                    send(("deltas", items, pipe.stats() if due else None))
                except (OSError, ValueError):
                    return
                if due:
                    last_stats = now
            if items:
                time.sleep(0)  # let the engine thread run before the next batch is gathered

    sender = threading.Thread(target=send_loop, name="phimm-worker-sender", daemon=True)
    sender.start()
    try:
        while True:
            try:
                msg = _recv_msg(conn)
            except (EOFError, OSError):  # the HTTP process is gone
                break
            kind = msg[0]
            if kind in ("open", "submit"):
                _, rid, x, generation, arrival, clip = msg
                try:
                    if kind == "submit":  # prepared and routed by the HTTP process
                        try:
                            prepared = media.decode(x[0])
                        except KeyError:
                            raise EngineClosedError("a medium this request refers to is not in the worker's "
                                                    "table (the two ends of the pipe disagree)") from None
                        stream = pipe.open_prepared(prepared, x[1], arrival=arrival, clip_to_context=clip,
                                                    sink=sink_for(rid), **generation)
                    else:
                        stream = pipe.open(x, arrival=arrival, clip_to_context=clip, sink=sink_for(rid),
                                           **generation)
                except PhimmError as e:
                    send(("failed", rid, e))
                    continue
                except Exception as e:  # noqa: BLE001 - an unexpected failure fails this request only
                    log.exception("opening a request failed")
                    send(("failed", rid, EngineClosedError(f"{type(e).__name__}: {e}")))
                    continue
                send(("opened", rid, (stream.route, stream.prompt_tokens, stream.audio_seconds)))
                streams[rid] = stream
                for done in [k for k, v in streams.items() if v.output is not None]:  # finished ones
                    del streams[done]
            elif kind == "cancel":
                stream = streams.get(msg[1])
                if stream is not None:
                    stream.cancel()
            elif kind == "close":
                break
    finally:
        stop.set()
        with cond:
            cond.notify()
        pipe.close()
