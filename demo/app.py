"""phimm's web demo: a Gradio chat over the same `phimm.Pipeline` users call.

    phimm demo [--model PATH] [--host 127.0.0.1] [--port 7860] [--share] [--dtype float32]
    python -m demo.app [same options]

`build_app(pipe)` returns the `gr.Blocks`; `launch(app, ...)` starts it with the demo's safe defaults (localhost,
no public link, upload size limit, a queue). No model logic lives here: requests are built as
`phimm.Request(messages=...)` and answered by `pipe.stream(...)` (the chat) or `pipe(...)` (the API endpoint).

The API endpoint `/chat` takes (text, image file or None, audio file or None) and returns (answer, route), e.g.

    from gradio_client import Client, handle_file
    answer, route = Client("http://127.0.0.1:7860/").predict("what color is the circle", handle_file("x.png"),
                                                              None, api_name="/chat")
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo phones nobody

import gradio as gr  # noqa: E402

import phimm  # noqa: E402
from phimm.errors import AudioError, ImageError, PhimmError  # noqa: E402
from phimm.generation import GenerationOptions  # noqa: E402

from phimm.media import audio_duration  # noqa: E402

log = logging.getLogger("phimm.demo")

EXAMPLES_DIR = Path(__file__).parent / "examples"
CONCURRENCY_ID = "phimm-model"  # every event that runs the model shares this slot
CSS = """
#phimm-status { min-height: 2.2em; }
"""


@dataclass(frozen=True)
class Limits:
    """The demo's safety limits and defaults."""

    max_file_mb: float = 10.0  # largest upload (enforced by gradio's upload route and again here)
    max_audio_s: float = 60.0  # longest audio clip
    max_new_tokens: int = 64  # default answer length
    max_new_tokens_cap: int = 512  # the slider's top
    queue_size: int = 32  # requests that may wait; more are turned away with "queue is full"
    history_turns: int = 6  # earlier turns sent with a new message (older ones are still shown)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


# ------------------------------------------------------------------------------------------------- helpers


def _file_path(value: Any) -> str | None:
    """The server-side path of a file input however gradio hands it over (str, FileData dict or object)."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        return value.get("path") or None
    return getattr(value, "path", None) or None


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def route_text(route) -> str:
    """"vision", "speech", "none", "vision+vision_speech" (what `str(Route)` gives)."""
    return str(route) if route is not None else "none"


def route_details(route) -> str:
    adapter = (route.adapter if route is not None else None) or "none (base model)"
    proj = route.audio_projector.value if route is not None and route.audio_projector is not None else "none"
    return f"adapter `{adapter}`, audio projector `{proj}`"


def left_out_note(left_out: dict[str, int]) -> str:
    """"earlier image left out", "2 earlier audio clips left out", ...: the media a request did not carry."""
    names = {"image": ("image", "images"), "audio": ("audio clip", "audio clips")}
    parts = []
    for kind in ("image", "audio"):
        n = left_out.get(kind, 0)
        if n:
            parts.append(f"earlier {names[kind][0]}" if n == 1 else f"{n} earlier {names[kind][1]}")
    if not parts:
        return ""
    return " and ".join(parts) + " left out"


def footer_text(route, tail: str, note: str = "") -> str:
    """An answer's footer: its route, then `tail` (timings or "generating…"), then a note if any."""
    text = f"route **{route_text(route)}** ({route_details(route)}) · {tail}"
    return f"{text} · {note}" if note else text


def timing_text(ttft_s: float | None, tokens_per_s: float | None, n_tokens: int | None = None) -> str:
    parts = [f"first token {ttft_s:.2f} s" if ttft_s is not None else "first token —"]
    parts.append(f"{tokens_per_s:.1f} tok/s" if tokens_per_s else "— tok/s")
    if n_tokens is not None:
        parts.append(f"{n_tokens} token{'s' if n_tokens != 1 else ''}")
    return " · ".join(parts)


def error_text(e: BaseException, paths=()) -> str:
    """A readable one-line message; server-side upload paths in it are shortened to their file names."""
    msg = str(e)
    for path in paths:
        if path:
            msg = msg.replace(str(path), Path(path).name)
    if isinstance(e, PhimmError):
        return f"{type(e).__name__}: {msg}"
    return f"internal error ({type(e).__name__}): {msg}. The demo keeps running; try another request."


def load_examples(examples_dir: str | Path | None = None) -> list[list[Any]]:
    """[[text, image path or None, audio path or None], ...] from `examples.json` (files that exist only)."""
    folder = Path(examples_dir) if examples_dir else EXAMPLES_DIR
    index = folder / "examples.json"
    if not index.is_file():
        return []
    try:
        items = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        log.warning("could not read %s: %s", index, e)
        return []
    rows = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        row = [item.get("text") or ""]
        ok = True
        for key in ("image", "audio"):
            name = item.get(key)
            if name:
                path = folder / name
                ok = ok and path.is_file()
                row.append(str(path.resolve()))
            else:
                row.append(None)
        if ok and (row[0] or row[1] or row[2]):
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ the chat


class DemoChat:
    """The demo's request handling: builds `phimm.Request`s from the chat's turns and submits them to the
    pipeline's engine, so concurrent users share its decode steps (each row on its own route)."""

    def __init__(self, pipe, limits: Limits | None = None):
        self.pipe = pipe
        self.limits = limits or Limits()

    # ---- checks and requests -------------------------------------------------------------------------------
    def check_upload(self, path: str, kind: str) -> None:
        err = ImageError if kind == "image" else AudioError
        if not os.path.isfile(path):
            raise err(f"the uploaded {kind} is gone from the server ({Path(path).name}); upload it again")
        size = os.path.getsize(path)
        if size > self.limits.max_file_bytes:
            raise err(f"the {kind} file is {_mb(size)}; this demo accepts files up to "
                      f"{self.limits.max_file_mb:g} MB")
        if kind == "audio":
            seconds = audio_duration(path)  # reads the header only; raises AudioError on a broken file
            if seconds > self.limits.max_audio_s:
                raise AudioError(f"the audio clip is {seconds:.1f} s long; this demo accepts clips up to "
                                 f"{self.limits.max_audio_s:g} s (trim it and try again)")

    @staticmethod
    def _parts(text: str, image: str | None, audio: str | None) -> list[dict]:
        parts: list[dict] = []
        if image:
            parts.append({"type": "image", "image": image})
        if audio:
            parts.append({"type": "audio", "audio": audio})
        if text:
            parts.append({"type": "text", "text": text})
        return parts

    def build_request(self, history: list[dict], text: str, image: str | None,
                      audio: str | None) -> tuple[phimm.Request, dict[str, int]]:
        """A chat request and what it left out: the last `history_turns` answered turns, then this one.

        The model was trained on one image and one audio clip per request, so the request carries at most one
        of each: the latest image and the latest audio clip of the conversation (this turn's own first). An
        earlier image is left out when a later turn (this one included) brings an image, and likewise for
        audio; the earlier turns' text and answers stay. Returns (request, {"image": n, "audio": n} left out);
        an earlier turn left with nothing to send (it was only a medium) is left out with its answer."""
        if image:
            self.check_upload(image, "image")
        if audio:
            self.check_upload(audio, "audio")
        answered = [t for t in history if not t.get("error") and t.get("done")]
        sent = answered[-self.limits.history_turns:] if self.limits.history_turns > 0 else []
        # the turn whose medium of each kind is sent: this one (index len(sent)) if it has one, else the latest
        keep = {kind: len(sent) if new else max((i for i, t in enumerate(sent) if t.get(kind)), default=None)
                for kind, new in (("image", image), ("audio", audio))}
        left_out = {"image": 0, "audio": 0}
        messages = []
        for i, t in enumerate(sent):
            media = {}
            for kind in ("image", "audio"):
                if t.get(kind) and i == keep[kind]:
                    media[kind] = t[kind]
                elif t.get(kind):
                    left_out[kind] += 1
            parts = self._parts(t.get("text") or "", media.get("image"), media.get("audio"))
            if not parts:
                continue
            messages.append({"role": "user", "content": parts})
            messages.append({"role": "assistant", "content": t.get("answer") or ""})
        messages.append({"role": "user", "content": self._parts(text, image, audio)})
        return phimm.Request(messages=messages), left_out

    def make_request(self, history: list[dict], text: str, image: str | None, audio: str | None) -> phimm.Request:
        """A chat request (see `build_request`): at most one image and one audio clip, the latest of each."""
        return self.build_request(history, text, image, audio)[0]

    def generation(self, max_new_tokens=None, do_sample=False, temperature=1.0, top_p=1.0) -> dict:
        n = self.limits.max_new_tokens if max_new_tokens in (None, "") else int(max_new_tokens)
        gen: dict[str, Any] = {"max_new_tokens": max(1, min(n, self.limits.max_new_tokens_cap)),
                               "do_sample": bool(do_sample)}
        if do_sample:
            gen.update(temperature=float(temperature), top_p=float(top_p))
        return gen

    # ---- running -------------------------------------------------------------------------------------------
    def _worker(self, request, gen: dict, out: queue.Queue, stop: threading.Event) -> None:
        try:
            if stop.is_set():  # cancelled before it started
                out.put(("done", time.perf_counter()))
                return
            start = time.perf_counter()
            pieces = self.pipe.stream(request, **gen)  # validated and routed before any model compute
            out.put(("route", pieces.route))
            out.put(("start", start))
            try:
                for piece in pieces:
                    out.put(("piece", piece, time.perf_counter()))
                    if stop.is_set():
                        break
            finally:
                pieces.close()
            out.put(("done", time.perf_counter()))
        except Exception as e:  # noqa: BLE001 - shown to the user; the demo keeps serving
            if not isinstance(e, PhimmError):
                log.exception("request failed")
            out.put(("error", e))

    def stream_events(self, request, gen: dict):
        """Run one request on a worker thread; yield its events: ("route", Route), ("start", t),
        ("piece", text, t), then ("done", t) or ("error", exception). The worker always finishes (and frees
        the model) even if the caller stops listening; closing this generator asks it to stop early."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=self._worker, args=(request, gen, events, stop), daemon=True,
                                  name="phimm-demo-generate")
        worker.start()
        try:
            while True:
                event = events.get()
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            stop.set()

    def _tokens(self, text: str) -> int:
        try:
            return len(self.pipe.tokenizer.encode(text, add_special_tokens=False))
        except Exception:  # noqa: BLE001 - only a figure for the footer
            return 0

    def respond(self, text, image, audio, turns, max_new_tokens=None, do_sample=False, temperature=1.0,
                top_p=1.0):
        """The chat's handler (a generator): yields (chat messages, turns, text box, image, audio, status)."""
        text = (text or "").strip()
        image, audio = _file_path(image), _file_path(audio)
        turns = [dict(t) for t in (turns or [])]
        keep = gr.update()
        if not (text or image or audio):
            yield (to_messages(turns), turns, keep, keep, keep,
                   "Type a message, or add an image or an audio clip, then press Send.")
            return
        turn = {"text": text, "image": image, "audio": audio, "answer": "", "footer": "waiting for the model…",
                "error": False, "done": False}
        turns.append(turn)
        yield to_messages(turns), turns, "", None, None, "waiting for the model…"

        try:
            request, left_out = self.build_request(turns[:-1], text, image, audio)
            turn["note"] = left_out_note(left_out)
            gen = self.generation(max_new_tokens, do_sample, temperature, top_p)
            GenerationOptions.from_kwargs(None, **gen)  # bad settings: an error before queueing
        except Exception as e:  # noqa: BLE001
            yield self._failed(turns, turn, e, (image, audio))
            return

        route = None
        start = first = last = None
        for event in self.stream_events(request, gen):
            kind = event[0]
            if kind == "route":
                route = event[1]
                turn["route"] = route_text(route)
                turn["footer"] = footer_text(route, "generating…", turn["note"])
                yield to_messages(turns), turns, keep, keep, keep, f"Generating… route **{route_text(route)}**"
            elif kind == "start":
                start = event[1]
            elif kind == "piece":
                first = first or event[2]
                last = event[2]
                turn["answer"] += event[1]
                yield to_messages(turns), turns, keep, keep, keep, keep
            elif kind == "error":
                yield self._failed(turns, turn, event[1], (image, audio))
                return
        n = self._tokens(turn["answer"])
        ttft = (first - start) if first and start else None
        speed = (n - 1) / (last - first) if first and last and last > first and n > 1 else None
        timing = timing_text(ttft, speed, n)
        turn.update(done=True, footer=footer_text(route, timing, turn["note"]))
        status = f"Last answer: route **{route_text(route)}** ({route_details(route)}) · {timing}"
        yield to_messages(turns), turns, keep, keep, keep, status

    @staticmethod
    def _failed(turns, turn, e: BaseException, paths=()):
        msg = error_text(e, paths)
        turn.update(answer="", footer="", error=msg, done=True)
        keep = gr.update()
        return to_messages(turns), turns, keep, keep, keep, f"Error: {msg}"

    def respond_example(self, text, image, audio, turns=None, max_new_tokens=None, do_sample=False,
                        temperature=1.0, top_p=1.0):
        """The examples' handler: like `respond`, but the example starts a fresh conversation (its own turn
        only), so the earlier turns' media and answers don't change its answer."""
        yield from self.respond(text, image, audio, [], max_new_tokens, do_sample, temperature, top_p)

    def api_chat(self, text, image=None, audio=None):
        """The `/chat` API endpoint: (text, image file or None, audio file or None) -> (answer, route)."""
        text = (text or "").strip()
        image, audio = _file_path(image), _file_path(audio)
        if not (text or image or audio):
            raise gr.Error("PromptError: send some text, an image or an audio clip", print_exception=False)
        try:
            request = self.make_request([], text, image, audio)
            out = self.pipe(request, **self.generation())
        except Exception as e:  # noqa: BLE001 - every failure comes back as a readable gr.Error
            if not isinstance(e, PhimmError):
                log.exception("API request failed")
            raise gr.Error(error_text(e, (image, audio)), print_exception=False) from None
        return out.text, route_text(out.route)


def to_messages(turns: list[dict]) -> list[dict]:
    """The chat's turns as gr.Chatbot messages: the user's media and text, then the answer with its route and
    timings (or the error)."""
    messages: list[dict] = []
    for t in turns:
        for key in ("image", "audio"):
            if t.get(key):
                messages.append({"role": "user", "content": {"path": t[key]}})
        if t.get("text"):
            messages.append({"role": "user", "content": t["text"]})
        if t.get("error"):
            body = f"**Error.** {t['error']}"
        else:
            answer = t.get("answer") or ("" if not t.get("done") else "*(empty answer)*")
            body = f"{answer}\n\n<sub>{t['footer']}</sub>" if t.get("footer") else answer
        messages.append({"role": "assistant", "content": body})
    return messages


# ------------------------------------------------------------------------------------------------- the app


def model_concurrency(pipe) -> int:
    """Chat events that may run at once: as many as the engine decodes together (they share its steps)."""
    limits = getattr(pipe, "limits", None)
    return int(getattr(limits, "max_running", 1) or 1)


def _header(pipe, limits: Limits) -> str:
    name = getattr(pipe, "name", "") or "model"
    adapters = ", ".join(getattr(pipe, "adapters", []) or []) or "none"
    dtype = str(getattr(getattr(pipe, "model", None), "dtype", "")).replace("torch.", "")
    return (
        "# phimm demo\n"
        f"Model **{name}** · adapters: {adapters}{' · ' + dtype if dtype else ''}. Ask about an image, an audio "
        "clip (upload or record), both, or neither: each answer shows the route the router picked (LoRA adapter "
        "and audio projector) and its timings. The model takes one image and one audio clip per request: a new "
        "one replaces the conversation's earlier one, and each example starts a new conversation. Uploads up to "
        f"{limits.max_file_mb:g} MB, audio up to {limits.max_audio_s:g} s."
    )


def build_app(pipe, *, limits: Limits | None = None, examples_dir: str | Path | None = None,
              max_new_tokens: int | None = None) -> gr.Blocks:
    """The demo's `gr.Blocks` over `pipe` (a `phimm.Pipeline`). Start it with `launch(app, ...)` (safe
    defaults) or `app.launch(...)`."""
    limits = limits or Limits()
    if max_new_tokens is not None:
        limits = Limits(**{**limits.__dict__, "max_new_tokens": int(max_new_tokens)})
    chat = DemoChat(pipe, limits)
    examples = load_examples(examples_dir)
    if examples:  # the bundled example files may be served as they are
        gr.set_static_paths([str(Path(examples_dir or EXAMPLES_DIR).resolve())])

    with gr.Blocks(title="phimm demo", analytics_enabled=False) as app:
        gr.Markdown(_header(pipe, limits))
        turns = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="phimm-chat", height=480, feedback_options=None,
                                     buttons=["copy", "copy_all"],
                                     placeholder="Ask a question, or click an example below.")
                with gr.Row():
                    text = gr.Textbox(label="Message", show_label=False,
                                      placeholder="Ask about the image or the audio… (Enter sends)",
                                      elem_id="phimm-text", scale=5, lines=1, max_lines=6)
                    send = gr.Button("Send", variant="primary", elem_id="phimm-send", scale=1, min_width=80)
                status = gr.Markdown("", elem_id="phimm-status")
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="phimm-stop", size="sm")
                    clear = gr.Button("Clear", elem_id="phimm-clear", size="sm")
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 elem_id="phimm-image", height=240)
                audio = gr.Audio(label=f"Audio (upload or record, up to {limits.max_audio_s:g} s)",
                                 sources=["upload", "microphone"], type="filepath", elem_id="phimm-audio")
                with gr.Accordion("Generation settings", open=False, elem_id="phimm-settings"):
                    max_new = gr.Slider(1, limits.max_new_tokens_cap, value=limits.max_new_tokens, step=1,
                                        label="Max new tokens", elem_id="phimm-max-new-tokens")
                    sample = gr.Checkbox(False, label="Sampling (off: greedy decoding)", elem_id="phimm-sample")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature (sampling only)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p (sampling only)")

        inputs = [text, image, audio, turns, max_new, sample, temperature, top_p]
        outputs = [chatbot, turns, text, image, audio, status]
        # preprocess=False: the handler gets the uploaded files' paths as they are, so a broken file reaches
        # phimm's media checks (clear messages) instead of failing inside gradio's image preprocessing.
        run_kwargs = dict(fn=chat.respond, inputs=inputs, outputs=outputs, preprocess=False,
                          concurrency_limit=model_concurrency(pipe), concurrency_id=CONCURRENCY_ID,
                          api_visibility="private", show_progress="minimal")
        events = [text.submit(**run_kwargs), send.click(**run_kwargs)]

        if examples:
            ex = gr.Examples(examples=examples, inputs=[text, image, audio], label="Examples (click one to run it)",
                             examples_per_page=10, elem_id="phimm-examples")
            # every column gets a header (the text box's label is hidden in the form, not in the table)
            names = {text._id: "Message", image._id: "Image", audio._id: "Audio"}
            ex.dataset.headers = [names.get(c._id, c.label or "") for c in ex.dataset._components]
            # an example starts a fresh conversation (its own turn only); a chat turn still running is stopped
            events.append(ex.load_input_event.then(**{**run_kwargs, "fn": chat.respond_example},
                                                   cancels=list(events)))

        def stop_turn(ts):
            ts = [dict(t) for t in (ts or [])]
            if ts and not ts[-1].get("done"):
                ts[-1].update(done=True, footer=(ts[-1].get("footer") or "").replace("generating…", "stopped"))
            return to_messages(ts), ts, "Stopped."

        stop.click(stop_turn, inputs=[turns], outputs=[chatbot, turns, status], cancels=events, queue=False,
                   api_visibility="private")
        clear.click(lambda: ([], [], "", None, None, ""), outputs=[chatbot, turns, text, image, audio, status],
                    queue=False, api_visibility="private", cancels=events)
        chatbot.clear(lambda: ([], ""), outputs=[turns, status], queue=False, api_visibility="private")

        gr.Markdown(f"<sub>phimm {getattr(phimm, '__version__', '')} · one request runs at a time, others "
                    f"wait in a queue of {limits.queue_size} · API: `/chat` (text, image, audio) → "
                    "(answer, route)</sub>")

        # API-only endpoint: gr.File inputs hand over the uploaded file untouched (phimm checks it).
        with gr.Column(visible=False):
            api_text = gr.Textbox(label="text")
            api_image = gr.File(label="image", type="filepath")
            api_audio = gr.File(label="audio", type="filepath")
            api_answer = gr.Textbox(label="answer")
            api_route = gr.Textbox(label="route")
            api_button = gr.Button("chat")
        api_button.click(chat.api_chat, inputs=[api_text, api_image, api_audio], outputs=[api_answer, api_route],
                         api_name="chat", concurrency_limit=model_concurrency(pipe), concurrency_id=CONCURRENCY_ID,
                         api_description="Answer (text, image file or None, audio file or None) with the demo's "
                                         "model; returns (answer, route such as 'vision', 'speech', 'none').")

    app.queue(default_concurrency_limit=model_concurrency(pipe), max_size=limits.queue_size)
    app.phimm_limits = limits  # read by launch()
    app.phimm_chat = chat
    return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           max_file_mb: float | None = None, prevent_thread_lock: bool = False, quiet: bool = False, **kwargs):
    """Start `app` with the demo's defaults: binds `host` (localhost), no public link unless `share`, uploads
    capped at `max_file_mb` (default: the app's limit). Returns gradio's (app, local_url, share_url)."""
    limits: Limits = getattr(app, "phimm_limits", Limits())
    mb = limits.max_file_mb if max_file_mb is None else max_file_mb
    return app.launch(server_name=host, server_port=port, share=bool(share), max_file_size=f"{mb:g}mb",
                      prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True, ssr_mode=False,
                      css=CSS, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_in_background(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, **kwargs) -> str:
    """Launch `app` on `host` (a free port unless given) without blocking; returns its local URL. Stop it with
    `app.close()`. For tests and scripts."""
    _, url, _ = launch(app, host=host, port=port or free_port(host), prevent_thread_lock=True, quiet=True, **kwargs)
    return url


def run(args) -> int:
    """`phimm demo`: load the model, build the app, serve until interrupted."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        pipe = phimm.load(args.model, dtype=args.dtype, threads=getattr(args, "threads", None))
    except PhimmError as e:
        print(f"phimm demo: error: {e}", file=sys.stderr)
        return 2
    limits = Limits(max_file_mb=args.max_file_mb, max_audio_s=args.max_audio_s, max_new_tokens=args.max_new_tokens,
                    queue_size=args.queue_size)
    app = build_app(pipe, limits=limits, examples_dir=getattr(args, "examples", None))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"phimm demo: listening on {args.host}: other machines on your network can use this demo",
              file=sys.stderr)
    if args.share:
        print("phimm demo: --share: a public link will be created; anyone who has it can use the demo",
              file=sys.stderr)
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0


def main(argv=None) -> int:
    from .cli import add_arguments

    parser = argparse.ArgumentParser(prog="python -m demo.app", description="phimm's Gradio web demo")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
