"""The web demo through Gradio's API (`gradio_client`): the `/chat` endpoint answers text, image and audio
requests with their route, serves two clients at once, and turns bad input into a readable error while it keeps
serving. Runs on a tiny random checkpoint (or the embedded model when it exists)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo needs gradio (pip install -e '.[demo]')")
gradio_client = pytest.importorskip("gradio_client", reason="the API test needs gradio_client")

from gradio_client import Client, handle_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "phimm" / "embedded" / "config.json"


@pytest.fixture(scope="module")
def server(request):
    """The demo on a free localhost port: the embedded model if it exists, else the suite's tiny random
    checkpoint (its answers are noise; its routes are real)."""
    import phimm
    from demo.app import build_app, serve_in_background

    if EMBEDDED.is_file():
        pipe, max_new = phimm.load(None, threads=1), 12
    else:
        pipe, max_new = phimm.load(request.getfixturevalue("tiny_ckpt"), threads=1), 8
    app = build_app(pipe, max_new_tokens=max_new)
    url = serve_in_background(app)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("demo-media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(d / "picture.png")
    t = np.arange(16000) / 16000
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 20)
    sf.write(d / "long.wav", np.zeros(61 * 8000, dtype=np.int16), 8000)  # 61 s: over the demo's 60 s limit
    return d


def test_binds_localhost_with_limits(server):
    app, url = server
    assert url.startswith("http://127.0.0.1:")
    assert app.max_file_size == 10 * 1024 * 1024
    assert app._queue.max_size == 32
    assert not getattr(app, "share", False)


def test_chat_routes(server, media):
    _, url = server
    client = Client(url, verbose=False)
    cases = [
        (("what color is the circle", handle_file(str(media / "picture.png")), None), "vision"),
        (("transcribe the audio clip into text", None, handle_file(str(media / "tone.wav"))), "speech"),
        (("the star is red . what color is the star ?", None, None), "none"),
        (("answer the spoken question about the image", handle_file(str(media / "picture.png")),
          handle_file(str(media / "tone.wav"))), "vision+vision_speech"),
    ]
    for args, route in cases:
        answer, got = client.predict(*args, api_name="/chat")
        assert isinstance(answer, str)
        assert got == route, (args[0], got)
    if EMBEDDED.is_file():
        assert answer.strip(), "the embedded model gave an empty answer"
    # optional inputs default to None
    assert client.predict("hello", api_name="/chat")[1] == "none"


def test_two_clients_at_once(server, media):
    _, url = server
    results, errors = {}, []

    def ask(name, args):
        try:
            results[name] = Client(url, verbose=False).predict(*args, api_name="/chat")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {type(e).__name__}: {e}")

    jobs = {
        "image": ("what shape is it", handle_file(str(media / "picture.png")), None),
        "audio": ("transcribe the audio clip into text", None, handle_file(str(media / "tone.wav"))),
    }
    threads = [threading.Thread(target=ask, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert results["image"][1] == "vision"
    assert results["audio"][1] == "speech"


def test_errors_are_readable_and_app_keeps_serving(server, media):
    from gradio_client.exceptions import AppError

    _, url = server
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as bad_image:
        client.predict("what is this", handle_file(str(media / "corrupt.png")), None, api_name="/chat")
    msg = str(bad_image.value)
    assert "ImageError" in msg and "corrupt.png" in msg, msg
    assert "/tmp/gradio" not in msg  # the server's upload path is shortened to the file name

    with pytest.raises(AppError, match=r"AudioError: .*61\.0 s.*up to 60 s"):
        client.predict("transcribe", None, handle_file(str(media / "long.wav")), api_name="/chat")

    with pytest.raises(AppError, match="PromptError"):
        client.predict("", None, None, api_name="/chat")

    big = media / "big.png"
    big.write_bytes(b"\0" * (10 * 1024 * 1024 + 1))
    with pytest.raises(Exception, match="maximum file size"):  # refused at upload, before the model
        client.predict("x", handle_file(str(big)), None, api_name="/chat")

    answer, route = client.predict("what color is the circle", handle_file(str(media / "picture.png")), None,
                                   api_name="/chat")
    assert route == "vision"


def test_ui_handler_shows_errors_in_chat(server, media):
    """The chat handler itself (no browser): an error becomes a chat message, and the next turn works."""
    app, _ = server
    chat = app.phimm_chat
    *_, last = chat.respond("what is this", str(media / "corrupt.png"), None, [])
    messages, turns, *_, status = last
    assert turns[-1]["error"] and "ImageError" in messages[-1]["content"]
    assert status.startswith("Error: ImageError")
    *_, last = chat.respond("what is in the picture", str(media / "picture.png"), None, turns)
    messages, turns, *_, status = last
    assert turns[-1]["done"] and not turns[-1]["error"]
    assert "route **vision**" in messages[-1]["content"] and "tok/s" in status
    # a follow-up with audio carries the earlier image in its turn: both encoders, the vision-speech projector
    *_, last = chat.respond("and this?", None, str(media / "tone.wav"), turns)
    assert "route **vision+vision_speech**" in last[0][-1]["content"]


def test_cli_registers_demo_without_importing_gradio():
    import phimm.cli

    # `phimm demo` is registered, with safe defaults
    parser = phimm.cli.build_parser()
    args = parser.parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, None)
    assert parser.parse_args(["demo", "--share", "--port", "7000"]).share

    # importing the subcommand does not import gradio (`phimm run` stays fast): checked in a fresh interpreter
    code = ("import sys, argparse, demo.cli as c; p = argparse.ArgumentParser(); "
            "c.register(p.add_subparsers()); p.parse_args(['demo', '--port', '1']); print('gradio' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing demo.cli must not import gradio"


class _FakePipe:
    """A stand-in pipeline that streams fixed pieces (the tiny random model's answers are unprintable)."""

    name, adapters = "fake", ["vision", "speech"]

    class tokenizer:  # noqa: N801
        @staticmethod
        def encode(text, add_special_tokens=False):
            return text.split()

    def __init__(self, pieces=("The", " circle", " is", " red")):
        self.pieces = pieces
        self.fail_next: Exception | None = None
        self.requests = []

    def stream(self, request, **gen):
        """As `Pipeline.stream`: routed at once (`.route`), then the pieces; closing it cancels."""
        import time

        from routers import Route

        self.requests.append(request)
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e

        class _Stream:
            route = Route("vision")

            def __init__(self, pieces):
                self._it = self._gen(pieces)

            @staticmethod
            def _gen(pieces):
                for piece in pieces:
                    time.sleep(0.01)
                    yield piece

            def __iter__(self):
                return self._it

            def close(self):
                self._it.close()

        return _Stream(self.pieces)


def test_ui_streams_piece_by_piece_and_survives_internal_errors(media):
    from demo.app import DemoChat, Limits

    pipe = _FakePipe()
    chat = DemoChat(pipe, Limits(max_new_tokens=4))
    states = list(chat.respond("what color is the circle", str(media / "picture.png"), None, []))
    answers = [s[0][-1]["content"].split("\n\n<sub>")[0] for s in states]  # the last chat message, each time
    assert "The circle" in answers and "The circle is" in answers  # the chat grows token by token
    messages, turns, *_, status = states[-1]
    assert messages[-1]["content"].startswith("The circle is red")
    assert "route **vision**" in messages[-1]["content"]
    assert "first token" in status and "tok/s" in status and "— tok/s" not in status and "4 tokens" in status

    pipe.fail_next = RuntimeError("boom")
    *_, last = chat.respond("again", None, None, turns)
    assert "internal error (RuntimeError): boom" in last[0][-1]["content"]
    turns = last[1]
    *_, last = chat.respond("and now?", None, None, turns)  # still serving
    assert last[1][-1]["done"] and last[1][-1]["answer"] == "The circle is red"
    # the failed turn is left out of the conversation sent to the model; the answered one is in it
    sent = pipe.requests[-1].messages
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == "The circle is red" and sent[0]["content"][0]["type"] == "image"


def _sent_media(request) -> list[tuple[str, str]]:
    """(role, medium kind or "text") for every part of every message sent to the model, in order."""
    out = []
    for m in request.messages:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text"}]
        out += [(m["role"], p["type"]) for p in parts]
    return out


def test_new_medium_replaces_the_earlier_one_of_its_kind(media):
    """The model takes one image and one audio clip per request: a turn with a new image leaves the earlier image
    out of the request (its text and answer stay), while an earlier audio clip stays when the new turn has only an
    image; the turn's footer says what was left out."""
    import shutil

    from demo.app import DemoChat, Limits

    pipe = _FakePipe()
    chat = DemoChat(pipe, Limits(max_new_tokens=4))
    first, second = media / "picture.png", media / "picture2.png"
    shutil.copy(first, second)

    *_, last = chat.respond("what color is the circle", str(first), None, [])
    turns = last[1]
    *_, last = chat.respond("what does it say", None, str(media / "tone.wav"), turns)  # the image stays
    turns = last[1]
    assert [p["image"] for p in pipe.requests[-1].messages[0]["content"] if p["type"] == "image"] == [str(first)]
    assert "left out" not in last[0][-1]["content"]

    *_, last = chat.respond("and in this one?", str(second), None, turns)  # a new image, no audio
    sent = pipe.requests[-1]
    images = [p["image"] for m in sent.messages if isinstance(m["content"], list)
              for p in m["content"] if p["type"] == "image"]
    assert images == [str(second)], "the earlier image must not be sent with a new one"
    assert _sent_media(sent) == [
        ("user", "text"), ("assistant", "text"),  # turn 1: its text and answer stay, its image is left out
        ("user", "audio"), ("user", "text"), ("assistant", "text"),  # turn 2: the audio stays (no new audio)
        ("user", "image"), ("user", "text"),  # this turn
    ]
    assert sent.messages[0]["content"] == [{"type": "text", "text": "what color is the circle"}]
    assert sent.messages[-1]["content"][0] == {"type": "image", "image": str(second)}
    footer = last[0][-1]["content"]
    assert "earlier image left out" in footer and "audio" not in footer.split("·")[-1], footer
    assert last[1][-1]["done"] and not last[1][-1]["error"]

    # a new audio clip leaves the earlier one out too; the latest image (turn 3's) stays
    *_, last = chat.respond("and now?", None, str(media / "tone.wav"), last[1])
    kinds = [k for _, k in _sent_media(pipe.requests[-1])]
    assert kinds.count("image") == 1 and kinds.count("audio") == 1
    assert "earlier image and earlier audio clip left out" in last[0][-1]["content"]  # turn 1's image too


def test_examples_start_a_fresh_conversation_and_have_headers(media):
    """An example's handler sends only the example's own turn; every examples column has a header."""
    from demo.app import DemoChat, Limits, build_app, load_examples

    pipe = _FakePipe()
    chat = DemoChat(pipe, Limits(max_new_tokens=4))
    *_, last = chat.respond("what color is the circle", str(media / "picture.png"), None, [])
    *_, last = chat.respond_example("the star is red . what color is the star ?", None, None, last[1])
    messages, turns, *_ = last
    assert len(turns) == 1 and turns[0]["text"].startswith("the star is red")
    assert [m["role"] for m in pipe.requests[-1].messages] == ["user"]
    assert [m["role"] for m in messages] == ["user", "assistant"]

    examples = load_examples()
    if not examples:
        pytest.skip("no bundled examples")
    app = build_app(_FakePipe())
    config = app.get_config_file()
    datasets = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "phimm-examples"]
    assert len(datasets) == 1
    headers = datasets[0]["props"]["headers"]
    assert headers == ["Message", "Image", "Audio"], headers
