"""The OpenAI-compatible HTTP app over one `Pipeline` and its engine (FastAPI).

    app = build_app(pipe, ServeConfig(api_key="..."))        # or build_app(loader=lambda: phimm.load(...))

Endpoints: `POST /v1/chat/completions` (streamed or not), `POST /v1/audio/transcriptions`, `GET /v1/models`,
`GET /health` (200 once the model is loaded, 503 before), `GET /metrics` (Prometheus text). The app owns the wire
format, auth, limits and metrics; requests are prepared and routed by the pipeline and run by its engine, so
concurrent users share decode steps, each row on its own route.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineClosedError, PhimmError, QueueFullError
from .metrics import Metrics
from .protocol import (TRANSCRIPTION_FORMATS, APIError, MediaPolicy, bad_request, chat_chunk, chat_completion,
                       from_phimm_error, new_id, parse_chat, transcription_body, transcription_request,
                       usage_chunk)

log = logging.getLogger("phimm.serve")

TRANSCRIBE_INSTRUCTION = "Transcribe the audio clip into text."  # Phi-4-multimodal's (and the embedded model's)


@dataclass
class ServeConfig:
    """What the server enforces and how it names itself."""

    served_model_name: str | None = None  # default: the model folder's name ("phimm-embedded" for the default)
    api_key: str | None = None  # when set, /v1 requests need `Authorization: Bearer <key>`
    allowed_media_dir: str | None = None  # local media paths allowed only under this folder
    max_body_mb: float = 32.0  # a larger request body gets 413
    max_media: int = 8  # images and audio clips per request
    retry_after_s: int = 1  # told to clients refused because the queue is full
    transcription_instruction: str = TRANSCRIBE_INSTRUCTION
    transcription_max_tokens: int = 448
    metric_labels: dict[str, str] = field(default_factory=dict)  # added to every metric series
    health_info: dict[str, Any] = field(default_factory=dict)  # added to /health's body (a Ray replica: its id, pid)


class _State:
    def __init__(self, pipe, loader: Callable[[], Any] | None, config: ServeConfig):
        self.pipe = pipe
        self.loader = loader
        self.config = config
        self.error: BaseException | None = None
        self.created = int(time.time())
        self.policy = MediaPolicy(Path(config.allowed_media_dir) if config.allowed_media_dir else None,
                                  config.max_media)
        self.metrics = Metrics(self.stats, config.metric_labels)

    def stats(self) -> dict:
        return self.pipe.stats() if self.pipe is not None else {}

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        name = getattr(self.pipe, "name", "") if self.pipe is not None else ""
        return "phimm-embedded" if name in ("", "embedded") else Path(name).name

    def load(self) -> None:
        try:
            self.pipe = self.loader()
            self.pipe.stats()  # the engine is started before the first request
            log.info("model loaded: %s", self.pipe)
        except BaseException as e:  # noqa: BLE001 - reported by /health and every request
            log.exception("loading the model failed")
            self.error = e

    def ready(self):
        gone = getattr(self.pipe, "closed", None)  # an engine worker process that died
        if gone is not None:
            raise APIError(503, str(gone), "server_unavailable", None, "engine_closed")
        if self.pipe is not None:
            return self.pipe
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", "server_unavailable", None,
                           "model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly", "server_unavailable", None,
                       "model_loading", headers={"Retry-After": "5"})


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (declared or streamed) gets 413 before it is read whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than this server's limit of "
                                  f"{self.max_bytes / 1e6:g} MB", "invalid_request_error", None, "body_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await _send_error(send, too_large)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited, send)


async def _send_error(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(pipe=None, config: ServeConfig | None = None, *, loader: Callable[[], Any] | None = None) -> FastAPI:
    """The FastAPI app serving `pipe` (or the pipeline `loader()` returns, loaded in the background at start-up:
    /health answers 503 until it is ready)."""
    if (pipe is None) == (loader is None):
        raise ValueError("give exactly one of pipe and loader")
    config = config or ServeConfig()
    state = _State(pipe, loader, config)

    @asynccontextmanager
    async def lifespan(app):
        if state.pipe is None:
            threading.Thread(target=state.load, name="phimm-load", daemon=True).start()
        yield
        if state.pipe is not None and loader is not None:
            state.pipe.close()

    app = FastAPI(title="phimm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.phimm = state
    app.add_middleware(_BodyLimit, max_bytes=int(config.max_body_mb * 1e6))

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", "internal_server_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "invalid_api_key")

    def check_model(name: Any) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None

    async def open_stream(request: Request, pipe, x, arrival: float, **gen):
        """Prepare (media decoding, routing) off the event loop and queue the request in the engine."""
        loop = asyncio.get_running_loop()
        try:
            return await anyio.to_thread.run_sync(partial(pipe.open, x, loop=loop, arrival=arrival, **gen))
        except PhimmError as e:
            state.metrics.request("unrouted", "bad_request" if not _is_overload(e) else "refused")
            raise from_phimm_error(e, config.retry_after_s) from None

    async def deltas(request: Request, stream, arrival: float, watch_disconnect: bool) -> AsyncIterator[list]:
        """The stream's deltas in batches (all that arrived by each wake-up), with metrics; the request is
        cancelled if the client goes away."""
        watcher = asyncio.ensure_future(_watch_disconnect(request, stream)) if watch_disconnect else None
        last = None
        status = "cancelled"
        try:
            async for batch in stream.batches():
                for d in batch:
                    if d.token_ids:
                        if last is None:
                            state.metrics.first_token(d.time - arrival)
                        else:
                            state.metrics.inter_token(d.time - last)
                        last = d.time
                    if d.output is not None:
                        out = d.output
                        status = "ok" if out.error is None else ("cancelled" if out.finish_reason == "cancelled"
                                                                 else "error")
                        state.metrics.tokens(out.prompt_tokens, len(out.token_ids))
                yield batch
        finally:
            if watcher is not None:
                watcher.cancel()
            if stream.output is None:
                stream.cancel()
            state.metrics.request(str(stream.route), status)

    async def final_output(request: Request, stream, arrival: float):
        """A non-streamed request's `Output` (None if the client went away); its error raised as an APIError."""
        out = None
        async for batch in deltas(request, stream, arrival, watch_disconnect=True):
            out = batch[-1].output
        if out is None or out.finish_reason == "cancelled":
            return None
        if out.error is not None:
            raise from_phimm_error(out.error, config.retry_after_s)
        return out

    # ---- endpoints -----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        gone = getattr(state.pipe, "closed", None)
        if gone is not None:
            return JSONResponse({"status": f"failed: {gone}", **config.health_info}, status_code=503)
        if state.pipe is not None:
            return {"status": "ok", "model": state.model_name, **config.health_info}
        detail = f"failed: {state.error}" if state.error is not None else "loading"
        return JSONResponse({"status": detail, **config.health_info}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        state.ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "phimm", "adapters": list(state.pipe.adapters)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        authorize(request)
        pipe = state.ready()
        call = parse_chat(await read_json(request), state.policy)
        check_model(call.model)
        stream = await open_stream(request, pipe, call.request, arrival, **call.generation)
        cid, created, model = new_id("chatcmpl"), int(time.time()), state.model_name
        if not call.stream:
            out = await final_output(request, stream, arrival)
            if out is None:
                return Response(status_code=499)  # the client went away
            return chat_completion(cid, model, out, created)

        async def events():
            yield _sse(chat_chunk(cid, model, created, {"role": "assistant", "content": ""}, route=stream.route))
            # a content chunk is this prefix, the text as a JSON string, and a fixed suffix: made once
            head, _, tail = json.dumps(chat_chunk(cid, model, created, {"content": "\x00"}),
                                       ensure_ascii=False).partition('"\\u0000"')
            async for batch in deltas(request, stream, arrival, watch_disconnect=False):
                parts = [f"data: {head}{json.dumps(d.text, ensure_ascii=False)}{tail}\n\n" for d in batch if d.text]
                out = batch[-1].output
                if out is not None:
                    if out.error is not None:
                        parts.append(_sse(from_phimm_error(out.error).body()))
                    else:
                        finish = "length" if out.finish_reason == "length" else "stop"
                        parts.append(_sse(chat_chunk(cid, model, created, {}, finish)))
                        if call.include_usage:
                            parts.append(_sse(usage_chunk(cid, model, created, out)))
                if parts:
                    yield "".join(parts)  # everything that arrived together, in one write
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        arrival = time.perf_counter()
        authorize(request)
        pipe = state.ready()
        form = await _read_form(request)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad_request("'file' (the audio file) is required", "file")
        audio = await upload.read()
        check_model(form.get("model") or None)
        fmt = form.get("response_format") or "json"
        if fmt not in TRANSCRIPTION_FORMATS:
            raise bad_request(f"'response_format' must be one of {list(TRANSCRIPTION_FORMATS)}, got {fmt!r}",
                              "response_format")
        gen: dict[str, Any] = {}
        temperature = _form_float(form, "temperature", 0.0, 1.0)
        if temperature:
            gen.update(do_sample=True, temperature=temperature)
        want_stream = _form_bool(form, "stream")
        instruction = form.get("prompt") or config.transcription_instruction
        x = transcription_request(audio, instruction)

        stream = await open_stream(request, pipe, x, arrival, clip_to_context=True,
                                   max_new_tokens=config.transcription_max_tokens, **gen)
        seconds = stream.audio_seconds
        language = form.get("language") or None

        if not want_stream:
            out = await final_output(request, stream, arrival)
            if out is None:
                return Response(status_code=499)  # the client went away
            media_type, body = transcription_body(fmt, out.text.strip(), seconds, language, out)
            if isinstance(body, str):
                return PlainTextResponse(body, media_type=media_type)
            return JSONResponse(body, media_type=media_type)

        async def events():
            async for batch in deltas(request, stream, arrival, watch_disconnect=False):
                parts = [_sse({"type": "transcript.text.delta", "delta": d.text, "logprobs": None})
                         for d in batch if d.text]
                out = batch[-1].output
                if out is not None:
                    if out.error is not None:
                        parts.append(_sse(from_phimm_error(out.error).body()))
                    else:
                        parts.append(_sse({"type": "transcript.text.done", "text": out.text.strip(), "logprobs": None,
                                           "usage": {"type": "tokens", "input_tokens": out.prompt_tokens,
                                                     "output_tokens": len(out.token_ids),
                                                     "total_tokens": out.prompt_tokens + len(out.token_ids)}}))
                if parts:
                    yield "".join(parts)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _is_overload(e: PhimmError) -> bool:
    return isinstance(e, (QueueFullError, EngineClosedError))


async def _watch_disconnect(request: Request, stream) -> None:
    """Cancel `stream` when the client disconnects (a non-streamed request's handler is otherwise not told)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.cancel()
            return


async def _read_form(request: Request):
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad_request("send the audio as multipart/form-data with a 'file' field", "file")
    try:
        return await request.form(max_files=1, max_fields=32)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed multipart body
        raise bad_request(f"the multipart body could not be read: {e}", "file") from None


def _form_float(form, name: str, lo: float, hi: float) -> float | None:
    v = form.get(name)
    if v in (None, ""):
        return None
    try:
        x = float(v)
    except ValueError:
        raise bad_request(f"'{name}' must be a number, got {v!r}", name) from None
    if not lo <= x <= hi:
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {x}", name)
    return x


def _form_bool(form, name: str) -> bool:
    v = form.get(name)
    if v in (None, "", "false", "False", "0"):
        return False
    if v in ("true", "True", "1"):
        return True
    raise bad_request(f"'{name}' must be true or false, got {v!r}", name)
