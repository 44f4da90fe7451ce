"""The dashboard in a real browser (Debian's chromium through Playwright; tests/browser.py):
sign in, load and unload the built-in chat model, a download from the test hub with a moving
progress bar and its cancel, a spec with errors shown by field, the version history's diff and
rollback, the GPUs page, the playground (a streamed chat, a two-speaker espeak-ng recording
shown by speaker, embeddings), traffic, the token, a phone-sized screen, sign out. One gateway
for the module, with the built-in models; each page is saved to docs/dashboard/."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import DESKTOP, PHONE, chromium, missing, shot
from tests.conftest import Gateway, GatewayFactory, fake_model
from tests.fake_hub import FakeHub

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

ADMIN_KEY = "sk-browser-admin"
CHAT = "smollm2-135m"
WEIGHTS = 600_000
SLOW = 60_000  # bytes/s from the hub while a download is watched: ten seconds for the file
LOADS = 240_000  # ms: a model loaded on a busy two-core machine


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("hub")
    repo = root / "org" / "tiny" / "main"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "tiny"}')
    (repo / "weights.bin").write_bytes(os.urandom(WEIGHTS))
    with FakeHub(root) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory, hub: FakeHub,
            tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    return module_gateway_factory(
        [fake_model("tiny", source={"hf": "org/tiny"})], include_builtin=True,
        env={"MODELHOST_ADMIN_KEYS": ADMIN_KEY, "OPENAI_API_KEYS": "sk-browser-user",
             "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
             "MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as found:
        yield found


class Tab:
    """A browser context and its page, with every script error it met."""

    def __init__(self, browser: Browser, url: str, viewport: dict[str, int]) -> None:
        self.url = url
        self.context: BrowserContext = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" and "status of 401" not in m.text else None)
        self.page.set_default_timeout(30_000)

    def sign_in(self, key: str = ADMIN_KEY) -> None:
        self.page.goto(self.url + "/")
        self.page.fill("#key", key)
        self.page.click("button[type=submit]")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def tab(browser: Browser, gateway: Gateway) -> Iterator[Tab]:
    t = Tab(browser, gateway.url, DESKTOP)
    t.sign_in()
    t.page.wait_for_selector("#models tbody tr")
    yield t
    t.close()


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect


def until(page: Page, script: str, timeout: float = 15) -> Any:
    """Poll `script` (a function's text, evaluated in the page) until it returns a true value
    (Playwright's wait_for_function evaluates strings, which the dashboard's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true in {timeout} s: {script}")
        time.sleep(0.1)


def open_model(page: Page, model: str) -> None:
    page.locator(f'#models tr[data-model="{model}"]').click()
    expect()(page.locator("#detail-title")).to_have_text(model)


def test_sign_in(browser: Browser, gateway: Gateway) -> None:
    t = Tab(browser, gateway.url, DESKTOP)
    page = t.page
    page.goto(gateway.url + "/")
    expect()(page.locator("h1")).to_have_text("Sign in")
    shot(page, "sign-in")
    page.fill("#key", "sk-not-a-key")
    page.click("button[type=submit]")
    expect()(page.locator("#login-error")).to_contain_text("not an admin key")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    expect()(page.locator(f'#models tr[data-model="{CHAT}"]')).to_be_visible()
    cookies = {c["name"]: c for c in t.context.cookies()}
    session = cookies["modelhost_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert ADMIN_KEY not in page.content()
    t.close()


def test_load_and_unload_the_chat_model(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/models")
    open_model(page, CHAT)
    state = page.locator("#detail-state-value")
    row_state = page.locator(f'#models tr[data-model="{CHAT}"] .state')
    if state.inner_text() == "ready":
        page.click("#act-unload")
        expect()(state).to_have_text("cached", timeout=LOADS)
    page.click("#act-load")
    expect()(state).to_have_text("starting", timeout=10_000)
    expect()(state).to_have_text("ready", timeout=LOADS)
    expect()(row_state).to_have_text("ready")
    shot(page, "models")
    page.click("#log-box summary")
    expect()(page.locator("#log")).not_to_be_empty(timeout=15_000)
    shot(page, "model-detail")
    page.click("#act-unload")
    expect()(state).to_have_text("cached", timeout=60_000)
    page.click("#log-box summary")


def test_download_with_progress_then_cancel(tab: Tab, hub: FakeHub) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/models")
    open_model(page, "tiny")
    expect()(page.locator("#detail-state-value")).to_have_text("absent")
    hub.throttle(SLOW)
    try:
        page.click("#act-download")
        bar = page.locator("#download-bar")
        expect()(bar).to_be_visible(timeout=15_000)
        first = until(page, "() => document.getElementById('download-bar').value")
        until(page, f"() => document.getElementById('download-bar').value > {first}")
        expect()(page.locator("#download-text")).to_contain_text("/s")
        shot(page, "download")
        page.click("#act-cancel")
        expect()(page.locator("#detail-state-value")).to_have_text("absent", timeout=15_000)
        expect()(bar).to_be_hidden()
    finally:
        hub.throttle(None)
    # At full speed to the end, then out of the cache again.
    page.click("#act-download")
    expect()(page.locator("#detail-state-value")).to_have_text("cached", timeout=30_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#act-delete-cache")
    expect()(page.locator("#detail-state-value")).to_have_text("absent", timeout=15_000)


def test_invalid_spec_shows_errors_by_field(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/models")
    page.click("#add-model")
    form = page.locator("#spec")
    form.locator("[name=id]").fill("broken")
    form.locator("[name=backend]").select_option("remote")
    form.locator("[name=source_kind]").select_option("url")
    form.locator("[name=source_value]").fill("not a url")
    form.locator("[name=max_queue]").fill("-5")
    page.click("#spec-save")
    expect()(form.locator('.field-error[data-field="source.url"]')).to_contain_text("URL")
    expect()(form.locator('.field-error[data-field="max_queue"]')).to_be_visible()
    assert "invalid" in (form.locator("[name=max_queue]").get_attribute("class") or "")
    shot(page, "spec-errors")
    # Nothing was added.
    assert page.locator('#models tr[data-model="broken"]').count() == 0


def test_edit_history_diff_and_rollback(tab: Tab) -> None:
    page = tab.page
    page.once("dialog", lambda dialog: dialog.accept())
    page.goto(tab.url + "/ui/models")
    # (Not tiny: its backend, command, runs a command, which only the models file may set.)
    open_model(page, "whisper-tiny.en")
    page.click("#act-edit")
    page.locator("#spec [name=max_queue]").fill("7")
    page.click("#spec-save")
    expect()(page.locator("#spec-form")).to_be_hidden()
    page.click("#history-box summary")
    rows = page.locator("#history tbody tr")
    expect()(rows).to_have_count(2)
    rows.nth(0).locator("button", has_text="Diff").click()
    expect()(page.locator("#diff .add")).to_contain_text('"max_queue": 7')
    shot(page, "history")
    rows.nth(1).locator("button.rollback").click()
    expect()(rows).to_have_count(3, timeout=30_000)
    expect()(rows.nth(0)).to_contain_text("rollback")


def test_gpus_page(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/gpus")
    until(page, "() => !document.getElementById('no-gpu').hidden || "
                "document.querySelectorAll('.gpu').length > 0")
    if page.locator(".gpu").count() == 0:
        expect()(page.locator("#no-gpu")).to_contain_text("No GPU")
        shot(page, "gpus-none")


def test_gpus_page_draws_each_gpu(tab: Tab) -> None:
    """The page's drawing of GPUs, from an event stream made up here (the machines these
    tests run on have none): two GPUs, their figures, charts and models."""
    page = tab.page
    now = time.time()

    def gpu(index: int, used: float, load: int, models: list[str]) -> dict[str, Any]:
        history = [{"t": now - 2 * (150 - i), "memory_used": int((used - 4 + i / 37) * 1e9),
                    "utilization_gpu": round(load * (0.75 + 0.25 * math.sin(i / 9))),
                    "temperature_c": 48 + round(7 * i / 150)}
                   for i in range(150)]
        return {"index": index, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{index}",
                "memory_total": 85_520_000_000, "memory_used": int(used * 1e9),
                "memory_free": int((85.52 - used) * 1e9), "utilization_gpu": load,
                "utilization_memory": load // 2, "temperature_c": 55, "power_w": 310.5,
                "power_limit_w": 700.0, "processes": [], "taken_at": now, "models": models,
                "history": history}

    gpus = {"available": True, "reason": None, "error": None,
            "gpus": [gpu(0, 62.0, 71, ["llama-3.1-70b"]), gpu(1, 18.5, 23, ["whisper-large-v3",
                                                                          "bge-m3"])]}
    body = "event: snapshot\ndata: " + json.dumps(
        {"models": [], "gpus": gpus, "traffic": [], "interval": 5}) + "\n\n"
    stream = tab.url + "/ui/events"
    page.route(stream, lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    try:
        page.goto(tab.url + "/ui/gpus")
        expect()(page.locator(".gpu")).to_have_count(2)
        expect()(page.locator("#no-gpu")).to_be_hidden()
        expect()(page.locator('.gpu[data-gpu="1"]')).to_contain_text("whisper-large-v3, bge-m3")
        expect()(page.locator('.gpu[data-gpu="0"]')).to_contain_text("62 GB / 86 GB")
        assert page.locator(".gpu canvas").count() >= 8  # four charts a GPU
        shot(page, "gpus")
    finally:
        page.unroute(stream)


def test_playground_chat_is_streamed(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/playground")
    expect()(page.locator(f'#chat-model option[value="{CHAT}"]')).to_have_count(1)
    page.fill("#chat-input", "Say hello in three words.")
    with page.expect_response(lambda r: r.url.endswith("/ui/v1/chat/completions")) as info:
        page.click("#chat-send")
    assert info.value.headers["content-type"].startswith("text/event-stream")
    answer = page.locator(".msg.assistant[data-done]")
    expect()(answer).to_have_count(1, timeout=LOADS)
    assert answer.inner_text().strip()


@pytest.mark.timeout(900)
def test_playground_two_speakers(tab: Tab, tmp_path: Path) -> None:
    from tests.test_diarization import needs_audio_tools, needs_resemblyzer

    for mark in (needs_audio_tools, needs_resemblyzer):
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    page = tab.page
    page.goto(tab.url + "/ui/playground")
    page.set_input_files("#audio-file", str(two_speakers(tmp_path)))
    page.check("#audio-diarize")
    page.click("#audio-send")
    segments = page.locator("#transcript .seg")
    expect()(segments.first).to_be_visible(timeout=2 * LOADS)
    speakers = {segments.nth(i).get_attribute("data-speaker") for i in range(segments.count())}
    assert len(speakers) == 2, speakers
    assert {"spk-0", "spk-1"} <= {cls for i in range(segments.count())
                                  for cls in (segments.nth(i).get_attribute("class") or "")
                                  .split()}
    expect()(page.locator("#audio-status")).to_contain_text("2 speakers")
    expect()(segments.first.locator(".when")).to_contain_text("0:0")
    shot(page, "playground-speakers")


def test_playground_embeddings(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/playground")
    expect()(page.locator('#embed-model option[value="all-minilm-l6-v2"]')).to_have_count(1)
    page.click("#embed-send")
    cells = page.locator("#similarity td")
    expect()(cells).to_have_count(9, timeout=LOADS)
    values = [float(cells.nth(i).inner_text()) for i in range(9)]
    assert values[0] == pytest.approx(1.0, abs=0.01)
    assert values[1] > values[2]  # the cat and the kitten, closer than the cat and revenue
    page.fill("#chat-input", "And in French?")
    page.click("#chat-send")
    expect()(page.locator(".msg.assistant[data-done]")).to_have_count(1, timeout=LOADS)
    shot(page, "playground")


def test_traffic_page(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/traffic")
    expect()(page.locator("#usage tbody")).to_contain_text(CHAT, timeout=15_000)
    # A few calls while the page watches, and one sample of them (every 5 s).
    for _ in range(3):
        page.evaluate("""() => Dash.v1('POST', '/embeddings',
                         {model: 'all-minilm-l6-v2', input: ['a few words']})""")
    time.sleep(6)
    shot(page, "traffic")


def test_token(tab: Tab) -> None:
    page = tab.page
    page.goto(tab.url + "/ui/settings")
    token = "hf_dashboardtesttoken0123456789"
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")
    expect()(page.locator("#token-state")).to_contain_text("A token is set")
    assert token not in page.content()
    shot(page, "settings")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#token-delete")
    expect()(page.locator("#token-state")).to_contain_text("No token")


def test_phone_sized_screen(browser: Browser, gateway: Gateway) -> None:
    t = Tab(browser, gateway.url, PHONE)
    t.sign_in()
    page = t.page
    expect()(page.locator(f'#models tr[data-model="{CHAT}"]')).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"the page is {width} px wide on a phone"
    shot(page, "phone", full=False)
    t.close()


def test_sign_out_then_refused(browser: Browser, gateway: Gateway) -> None:
    t = Tab(browser, gateway.url, DESKTOP)
    t.sign_in()
    page = t.page
    expect()(page.locator("#signout")).to_be_visible()
    page.click("#signout")
    expect()(page.locator("h1")).to_have_text("Sign in")
    page.goto(gateway.url + "/ui/models")
    expect()(page.locator("h1")).to_have_text("Sign in")
    assert page.request.get(gateway.url + "/ui/api/models").status == 401
    t.close()


def two_speakers(tmp: Path) -> Path:
    """The two-voice recording of tests/test_diarization.py (espeak-ng, sox)."""
    from tests.test_diarization import (
        GAPS,
        LEAD,
        LINES,
        TAIL,
        VOICES,
        _silence,
        _turn_audio,
        _write_wav,
    )

    pcm = _silence(LEAD)
    for i, text in enumerate(LINES):
        voice, pitch = VOICES[i % 2]
        pcm += _turn_audio(tmp, i, voice, pitch, text)
        pcm += _silence(GAPS[i] if i < len(GAPS) else TAIL)
    return _write_wav(tmp / "two-speakers.wav", pcm)
