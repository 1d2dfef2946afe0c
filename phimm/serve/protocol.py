"""The OpenAI wire format: chat-completion and transcription requests read into phimm requests, responses and
stream chunks written back, and OpenAI-style error bodies. No I/O here beyond decoding `data:` URLs and reading
files under the allowed media folder."""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routers import AudioProjector, Route

from ..errors import (ContextLengthError, EngineClosedError, GenerationConfigError, MediaError, PhimmError,
                      QueueFullError, UnknownAdapterError)
from ..types import Output, Request


class APIError(Exception):
    """An error answered with an OpenAI-style body: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_phimm_error(e: PhimmError, retry_after_s: int = 1) -> APIError:
    """The HTTP answer for a typed phimm error."""
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_overloaded", None, "queue_full",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(e, EngineClosedError):
        return APIError(503, str(e), "server_unavailable", None, "engine_closed")
    if isinstance(e, ContextLengthError):
        return bad_request(str(e), "messages", "context_length_exceeded")
    if isinstance(e, UnknownAdapterError):
        return bad_request(str(e), "adapter", "unknown_adapter")
    if isinstance(e, GenerationConfigError):
        return bad_request(str(e), None, "invalid_generation_option")
    if isinstance(e, MediaError):
        return bad_request(str(e), "messages", "invalid_media")
    if isinstance(e, (ValueError, TypeError)):  # prompt, placeholder, route, adapter errors
        return bad_request(f"{type(e).__name__}: {e}", "messages", None)
    return APIError(500, f"{type(e).__name__}: {e}", "internal_server_error")


# ------------------------------------------------------------------------------------------------ media


@dataclass
class MediaPolicy:
    """Where media may come from: `data:` URLs always; local paths only under `allowed_dir`; never the network."""

    allowed_dir: Path | None = None
    max_media: int = 8  # images and audio clips in one request, together

    def local_file(self, url: str, param: str) -> str:
        path = url[len("file://"):] if url.startswith("file://") else url
        if self.allowed_dir is None:
            raise bad_request(f"{param}: local paths are not allowed on this server (start it with "
                              "--allowed-media-dir to allow a folder); send a data: URL", param, "media_not_allowed")
        resolved = Path(path).expanduser().resolve()
        root = self.allowed_dir.resolve()
        if not resolved.is_relative_to(root):
            raise bad_request(f"{param}: {path!r} is outside the allowed media folder", param, "media_not_allowed")
        if not resolved.is_file():
            raise bad_request(f"{param}: no file {path!r} in the allowed media folder", param, "media_not_found")
        return str(resolved)

    def source(self, url: Any, param: str) -> bytes | str:
        """Bytes of a `data:` URL, or the path of an allowed local file."""
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param} must be a non-empty string URL", param)
        if url.startswith("data:"):
            return decode_data_url(url, param)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
            raise bad_request(f"{param}: this server never fetches media from the network; send the file as a "
                              "base64 data: URL", param, "media_not_allowed")
        return self.local_file(url, param)


def decode_base64(data: Any, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad_request(f"{param} must be a non-empty base64 string", param, "invalid_base64")
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param} is not valid base64 ({e})", param, "invalid_base64") from None


def decode_data_url(url: str, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad_request(f"{param}: expected a base64 data URL (data:<mime>;base64,<data>)", param,
                          "invalid_data_url")
    return decode_base64(payload, param)


# ------------------------------------------------------------------------------------------------ chat


@dataclass
class ChatCall:
    """A chat-completion request read from its JSON body."""

    request: Request
    generation: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_ROLES = {"system", "developer", "user", "assistant"}
_REFUSED_UNLESS_DEFAULT = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "n": 1,
                       "parallel_tool_calls": None, "tools": None, "tool_choice": None, "response_format": None}


def parse_chat(body: Any, policy: MediaPolicy) -> ChatCall:
    """Read an OpenAI chat-completion body. Raises `APIError` (400) on anything malformed."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    for name, default in _REFUSED_UNLESS_DEFAULT.items():
        value = body.get(name, default)
        if value not in (default, None) and not (name == "response_format" and value == {"type": "text"}):
            raise bad_request(f"'{name}' = {value!r} is not supported by this server", name, "unsupported_parameter")
    media_count = 0
    out_messages = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{param} must be an object", param)
        role = msg.get("role")
        if role not in _ROLES:
            raise bad_request(f"{param}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{param}.role")
        role = "system" if role == "developer" else role
        content = msg.get("content")
        if isinstance(content, str):
            out_messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{param}.content must be a string or a list of content parts", f"{param}.content")
        parts = []
        for j, part in enumerate(content):
            pp = f"{param}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad_request(f"{pp}.text must be a string", f"{pp}.text")
                parts.append({"type": "text", "text": text})
                continue
            if kind not in ("image_url", "input_audio", "audio_url"):
                raise bad_request(f"{pp}: unknown content part type {kind!r}; this server takes text, image_url, "
                                  "input_audio and audio_url", f"{pp}.type", "unknown_content_type")
            if role != "user":
                raise bad_request(f"{pp}: media are accepted in user messages only", pp)
            media_count += 1
            if media_count > policy.max_media:
                raise bad_request(f"too many media in one request: at most {policy.max_media}", "messages",
                                  "too_many_media")
            if kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                parts.append({"type": "image", "image": policy.source(url, f"{pp}.image_url.url")})
            elif kind == "audio_url":
                spec = part.get("audio_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                parts.append({"type": "audio", "audio": policy.source(url, f"{pp}.audio_url.url")})
            else:
                spec = part.get("input_audio")
                if not isinstance(spec, dict):
                    raise bad_request(f"{pp}.input_audio must be an object with 'data' and 'format'",
                                      f"{pp}.input_audio")
                fmt = spec.get("format")
                if fmt is not None and not isinstance(fmt, str):
                    raise bad_request(f"{pp}.input_audio.format must be a string", f"{pp}.input_audio.format")
                parts.append({"type": "audio", "audio": decode_base64(spec.get("data"), f"{pp}.input_audio.data")})
        if role != "user":  # system / assistant turns: their text
            out_messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            out_messages.append({"role": role, "content": parts})
    generation = generation_options(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    kinds = {p["type"] for m in out_messages if isinstance(m["content"], list) for p in m["content"]}
    adapter = forced_adapter(body.get("adapter"), "image" in kinds, "audio" in kinds)
    return ChatCall(Request(messages=out_messages, adapter=adapter), generation, stream,
                    bool(so.get("include_usage", False)), body.get("model"))


def forced_adapter(value: Any, has_image: bool, has_audio: bool) -> str | Route | None:
    """The `adapter` extension field: an adapter name forces that adapter; "none" forces the base model alone
    (with the audio projector the reference rule picks for the request's media)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise bad_request("'adapter' must be an adapter name (or \"none\" for the base model)", "adapter")
    if value != "none":
        return value
    projector = None
    if has_audio:
        projector = AudioProjector.VISION_SPEECH if has_image else AudioProjector.SPEECH
    return Route(None, projector)


def generation_options(body: dict) -> dict[str, Any]:
    """phimm generation options from OpenAI's sampling fields. No temperature: the model's defaults (greedy)."""
    gen: dict[str, Any] = {}

    def number(name, lo=None, hi=None, integer=False):
        v = body.get(name)
        if v is None:
            return None
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            kind = "an integer" if integer else "a number"
            rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
            raise bad_request(f"'{name}' must be {kind}{rng}, got {v!r}", name)
        return v

    max_tokens = number("max_completion_tokens", 1, integer=True)
    if max_tokens is None:
        max_tokens = number("max_tokens", 1, integer=True)
    if max_tokens is not None:
        gen["max_new_tokens"] = max_tokens
    min_tokens = number("min_tokens", 0, integer=True)  # an extension, as vLLM's: no end token before this many
    if min_tokens:
        if max_tokens is not None and min_tokens > max_tokens:
            raise bad_request(f"'min_tokens' ({min_tokens}) is larger than the maximum ({max_tokens})", "min_tokens")
        gen["min_new_tokens"] = min_tokens
    temperature = number("temperature", 0, 2)
    top_p = number("top_p", 0, 1)
    if temperature is not None and temperature > 0:
        gen["do_sample"] = True
        gen["temperature"] = float(temperature)
        if top_p is not None and top_p > 0:
            gen["top_p"] = float(top_p)
    elif temperature is not None:
        gen["do_sample"] = False
    seed = number("seed", integer=True)
    if seed is not None:
        gen["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise bad_request("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
        gen["stop_strings"] = tuple(stops)
    return gen


# ------------------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(out: Output) -> str:
    return "length" if out.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(cid: str, model: str, out: Output, created: int | None = None) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "finish_reason": finish_reason(out), "logprobs": None}],
        "usage": usage(out.prompt_tokens, len(out.token_ids)),
        "route": str(out.route),
    }


def chat_chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None,
               route: Route | None = None) -> dict:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if route is not None:
        chunk["route"] = str(route)
    return chunk


def usage_chunk(cid: str, model: str, created: int, out: Output) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(out.prompt_tokens, len(out.token_ids))}


# ------------------------------------------------------------------------------------------------ transcription

TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def transcription_body(fmt: str, text: str, seconds: float, language: str | None, out: Output):
    """(media type, body) of a finished transcription in OpenAI's `response_format`. One segment spans the
    whole clip: the model gives no timestamps."""
    if fmt == "text":
        return "text/plain; charset=utf-8", text
    if fmt == "srt":
        return "text/plain; charset=utf-8", f"1\n{_timestamp(0, ',')} --> {_timestamp(seconds, ',')}\n{text}\n"
    if fmt == "vtt":
        return "text/vtt; charset=utf-8", f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(seconds, '.')}\n{text}\n"
    if fmt == "verbose_json":
        return "application/json", {
            "task": "transcribe", "language": language or "english", "duration": seconds, "text": text,
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                          "tokens": list(out.token_ids), "temperature": 0.0, "avg_logprob": 0.0,
                          "compression_ratio": 0.0, "no_speech_prob": 0.0}],
            "usage": {"type": "duration", "seconds": int(round(seconds))},
        }
    return "application/json", {"text": text, "usage": {"type": "tokens", "input_tokens": out.prompt_tokens,
                                                        "output_tokens": len(out.token_ids),
                                                        "total_tokens": out.prompt_tokens + len(out.token_ids)}}


def transcription_request(audio: bytes, instruction: str) -> Request:
    return Request(messages=[{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                          {"type": "text", "text": instruction}]}])


__all__ = ["APIError", "ChatCall", "MediaPolicy", "TRANSCRIPTION_FORMATS", "bad_request",
           "chat_chunk", "chat_completion", "from_phimm_error", "parse_chat", "transcription_body",
           "transcription_request", "usage_chunk"]
