"""The web demo in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright loads the page,
uploads an image and asks about it, follows up with an audio clip and then a new image (the earlier image is left
out), clears, clicks every example in turn (each starts a fresh conversation: its route and, on the embedded model,
its expected answer from examples.json), records from the (fake) microphone, and checks that answers and their
routes appear. Saves a screenshot to runs/demo-screenshot.png.

Skips (with the reason) only when Chromium or Playwright is missing: `apt-get install -y chromium` and
`pip install playwright` (never `playwright install`: the system browser is used)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo needs gradio (pip install -e '.[demo]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                               "(pip install playwright; the system chromium is used, no `playwright install`)")

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "phimm" / "embedded" / "config.json"
SCREENSHOT = ROOT / "runs" / "demo-screenshot.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 # a synthetic microphone (a beep) so that recording can be tested headless
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    for cand in (os.environ.get("PHIMM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium found at /usr/bin/chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"Chromium at {exe} does not start under Playwright: {e}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(request):
    """The demo on a free localhost port: the embedded model if it exists, else the suite's tiny checkpoint."""
    import phimm
    from demo.app import build_app, serve_in_background

    if EMBEDDED.is_file():
        pipe, max_new = phimm.load(None, threads=1), 12
    else:
        pipe, max_new = phimm.load(request.getfixturevalue("tiny_ckpt"), threads=1), 8
    app = build_app(pipe, max_new_tokens=max_new)
    url = serve_in_background(app)
    yield url
    app.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import soundfile as sf
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("demo-ui-media")
    im = Image.new("RGB", (224, 224), (245, 245, 245))
    ImageDraw.Draw(im).ellipse((40, 40, 140, 140), fill=(220, 30, 30))
    im.save(d / "red_circle.png")
    t = np.arange(16000) / 16000
    sf.write(d / "tone.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return d


def answers_done(page, n: int) -> None:
    """Wait until the chat holds `n` finished answers (their footer carries the timings)."""
    page.wait_for_function(
        """n => {
            const chat = document.querySelector('#phimm-chat');
            return chat && (chat.innerText.match(/tok\\/s/g) || []).length >= n;
        }""",
        arg=n, timeout=TIMEOUT_MS,
    )


def bot_messages(page) -> list[str]:
    return [m.inner_text() for m in page.locator("#phimm-chat [data-testid='bot']").all()]


EXAMPLES_JSON = ROOT / "demo" / "examples" / "examples.json"
EXAMPLE_ROUTES = {(False, False): "none", (True, False): "vision", (False, True): "speech",
                  (True, True): "vision+vision_speech"}

# Watches the chat: `window.__phimmPending` turns true whenever the chat's last answer is unfinished (no timings in
# it yet). The embedded model answers in a fraction of a second, so the test can't rely on seeing that state itself;
# the observer records it even when it lasts a single frame.
WATCH_CHAT_JS = """() => {
    const chat = document.querySelector('#phimm-chat');
    window.__phimmPending = false;
    if (window.__phimmWatch) return;
    window.__phimmWatch = new MutationObserver(() => {
        const bots = chat.querySelectorAll("[data-testid='bot']");
        if (!bots.length || !bots[bots.length - 1].innerText.includes('tok/s')) window.__phimmPending = true;
    });
    window.__phimmWatch.observe(chat, {childList: true, subtree: true, characterData: true});
}"""

# True once the chat's last answer is finished and was (re)drawn after the click: the observer saw it unfinished,
# or the user's messages changed (in case every update reached the page in one frame). The test then checks that
# it is the only turn.
EXAMPLE_DONE_JS = """([before, text]) => {
    const chat = document.querySelector('#phimm-chat');
    const bots = chat.querySelectorAll("[data-testid='bot']");
    const users = [...chat.querySelectorAll("[data-testid='user']")].map(u => u.innerText.trim()).join('|');
    const fresh = window.__phimmPending || users !== before;
    return fresh && bots.length > 0 && bots[bots.length - 1].innerText.includes('tok/s') && users.endsWith(text);
}"""

# The answer's text without its footer (route and timings).
ANSWER_JS = """el => {
    const c = el.cloneNode(true);
    c.querySelectorAll('sub').forEach(s => s.remove());
    return c.textContent.trim();
}"""


def user_text(page) -> str:
    return "|".join(m.inner_text().strip() for m in page.locator("#phimm-chat [data-testid='user']").all())


def run_every_example(page) -> list[dict]:
    """Click each example in the table in turn (no clearing in between); after each, check that the chat holds the
    example's turn alone, its route, and (on the embedded model) its expected answer. Returns what was seen."""
    items = json.loads(EXAMPLES_JSON.read_text())
    headers = [h.inner_text().strip() for h in page.locator("#phimm-examples thead th").all()]
    assert headers and all(headers), f"every examples column needs a header: {headers}"
    rows = page.locator("#phimm-examples tbody tr")
    assert rows.count() == len(items), f"the table shows {rows.count()} examples, examples.json has {len(items)}"
    page.evaluate(WATCH_CHAT_JS)
    seen = []
    for i, item in enumerate(items):
        text = item["text"]
        route = EXAMPLE_ROUTES[(bool(item.get("image")), bool(item.get("audio")))]
        row = rows.nth(i)
        assert row.locator("td").first.inner_text().strip() == text, (i, row.inner_text())
        before = user_text(page)
        page.evaluate("() => { window.__phimmPending = false; }")
        row.locator("td").first.click()
        page.wait_for_function(EXAMPLE_DONE_JS, arg=[before, text], timeout=TIMEOUT_MS)

        bot = page.locator("#phimm-chat [data-testid='bot']")
        assert bot.count() == 1, f"example {i} ({text!r}) must start a fresh conversation: {bot_messages(page)}"
        footer = bot.first.inner_text()
        got_route = re.search(r"route (\S+) \(", footer)
        answer = bot.first.evaluate(ANSWER_JS)
        seen.append({"example": i, "text": text, "route": got_route and got_route.group(1), "answer": answer})
        where = f"example {i} ({text!r}): {footer!r}"
        assert got_route and got_route.group(1) == route, where
        assert "left out" not in footer, where  # a fresh conversation: nothing earlier to leave out
        user = page.locator("#phimm-chat [data-testid='user']")
        assert user_text(page).endswith(text), where
        # the example's media, each in its own message (and nothing from earlier turns)
        assert user.filter(has=page.locator("img")).count() == (1 if item.get("image") else 0), where
        assert user.filter(has=page.locator("audio, [data-testid='waveform-Audio']")).count() == \
            (1 if item.get("audio") else 0), where
        if EMBEDDED.is_file():
            assert answer == item["expected"], f"{where}: answered {answer!r}, expected {item['expected']!r}"
    return seen


def test_demo_in_browser(browser, server, media, capsys):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, permissions=["microphone"])
    page = context.new_page()
    console_errors: list[str] = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.goto(server)
    page.wait_for_selector("#phimm-text textarea", timeout=TIMEOUT_MS)
    assert "phimm demo" in page.inner_text("body")

    # 1. an image and a question about it
    page.locator("#phimm-image input[type=file]").set_input_files(str(media / "red_circle.png"))
    page.wait_for_selector("#phimm-image img", timeout=TIMEOUT_MS)
    page.fill("#phimm-text textarea", "what color is the circle")
    page.click("#phimm-send")
    answers_done(page, 1)
    chat = page.inner_text("#phimm-chat")
    assert "what color is the circle" in chat
    assert "route vision" in chat and "adapter vision" in chat, chat
    assert "first token" in page.inner_text("#phimm-status")
    assert page.locator("#phimm-chat img").count() >= 1  # the uploaded image is shown in its turn

    # 2. a follow-up with an audio clip (Enter sends): the earlier image stays in the conversation
    page.locator("#phimm-audio input[type=file]").set_input_files(str(media / "tone.wav"))
    page.wait_for_function("!!document.querySelector('#phimm-audio audio, #phimm-audio .waveform-container, "
                           "#phimm-audio [data-testid=\"waveform-Audio\"]')", timeout=TIMEOUT_MS)
    page.fill("#phimm-text textarea", "what does the clip say")
    page.press("#phimm-text textarea", "Enter")
    answers_done(page, 2)
    chat = page.inner_text("#phimm-chat")
    assert "route vision+vision_speech" in chat and "audio projector vision_speech" in chat, chat
    assert len(bot_messages(page)) == 2
    if EMBEDDED.is_file():
        assert all(m.split("route ")[0].strip() not in ("", "(empty answer)") for m in bot_messages(page))
    assert "left out" not in chat  # an audio clip added to an image conversation replaces nothing

    # 2b. a new image: the earlier image is left out of the request (the footer says so); the audio clip stays
    page.locator("#phimm-image input[type=file]").set_input_files(str(media / "red_circle.png"))
    page.wait_for_selector("#phimm-image img", timeout=TIMEOUT_MS)
    page.fill("#phimm-text textarea", "and this one?")
    page.click("#phimm-send")
    answers_done(page, 3)
    last = bot_messages(page)[-1]
    assert "earlier image left out" in last and "route vision+vision_speech" in last, last
    assert "left out" not in "".join(bot_messages(page)[:-1])

    # show the conversation from its start (the uploaded image); the chat autoscrolls, so scroll back up
    page.wait_for_timeout(300)
    page.evaluate("() => { const w = document.querySelector('#phimm-chat .bubble-wrap'); if (w) w.scrollTop = 0; }")
    page.wait_for_timeout(300)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    with capsys.disabled():
        print(f"\n[demo browser test] screenshot: {SCREENSHOT}")

    # 3. every example, one click each, one after another (the first one while the conversation above is still
    # shown): each starts a fresh conversation and gets its route and expected answer
    if EXAMPLES_JSON.is_file():
        start = time.perf_counter()
        seen = run_every_example(page)
        with capsys.disabled():
            print(f"[demo browser test] {len(seen)} examples in {time.perf_counter() - start:.1f} s: "
                  + "; ".join(f"{s['text'][:24]!r} -> {s['answer']!r} ({s['route']})" for s in seen))

    # 4. record from the microphone (Chromium's fake device), then ask: the speech route
    page.click("#phimm-clear")
    page.wait_for_function("!document.querySelector('#phimm-chat').innerText.includes('tok/s')",
                           timeout=TIMEOUT_MS)
    page.click("#phimm-audio button[aria-label='Record audio']")
    page.locator("#phimm-audio button:visible", has_text="Record").first.click()
    page.wait_for_timeout(1200)
    page.locator("#phimm-audio button:visible", has_text="Stop").first.click()
    page.wait_for_selector("#phimm-audio button[aria-label='Play']", timeout=TIMEOUT_MS)
    page.fill("#phimm-text textarea", "what did I say")
    page.click("#phimm-send")
    answers_done(page, 1)
    chat = page.inner_text("#phimm-chat")
    assert "what did I say" in chat and "route speech" in chat, chat

    # 5. the app keeps serving after an empty send
    page.click("#phimm-send")
    page.wait_for_function("document.querySelector('#phimm-status').innerText.includes('Type a message')",
                           timeout=TIMEOUT_MS)
    assert not console_errors, console_errors
    context.close()
