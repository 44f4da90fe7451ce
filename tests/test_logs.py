"""The gateway's logs (modelhost.logs, docs/operations.md "Logs"): the JSON and text lines,
the request id carried by a context variable into a request's tasks (the ids themselves:
test_request_ids.py), the rotating file and its name, the secrets scrubber on JSON lines, and a real
`modelhost serve` whose log file is JSON lines only."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.logs import (
    FORMAT,
    JsonFormatter,
    LogSetupError,
    RequestIdFilter,
    TextFormatter,
    bind_request_id,
    log_file,
    make_handlers,
    request_id,
    reset_request_id,
    setup_logging,
)
from modelhost.redaction import Scrubber, ScrubFilter
from modelhost.settings import Settings
from tests.conftest import GatewayFactory, fake_model

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Captured:
    """A logger of its own whose lines go, formatted as the gateway's, to a string."""

    def __init__(self, name: str, formatter: logging.Formatter) -> None:
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(formatter)
        self.handler.addFilter(RequestIdFilter())
        self.logger = logging.getLogger(f"test_logs.{name}")
        self.logger.handlers[:] = [self.handler]
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)

    def lines(self) -> list[str]:
        return self.buffer.getvalue().splitlines()

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def as_json(request: pytest.FixtureRequest) -> Captured:
    return Captured(f"{request.node.name}.json", JsonFormatter())


@pytest.fixture
def as_text(request: pytest.FixtureRequest) -> Captured:
    return Captured(f"{request.node.name}.text", TextFormatter())


def settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings.with_overrides(log_dir=tmp_path / "logs", **fields)


@pytest.fixture
def closing() -> Iterator[list[logging.Handler]]:
    """Handlers made by a test, closed at its end."""
    made: list[logging.Handler] = []
    yield made
    for handler in made:
        handler.close()


# JSON lines

def test_json_line_fields(as_json: Captured) -> None:
    before = time.time()
    as_json.logger.info("model %s: %s -> %s", "m1", "cached", "starting", extra={"model": "m1"})
    as_json.logger.warning("plain")
    first, second = as_json.json()
    assert set(first) == {"time", "level", "logger", "message", "model"}
    assert first["level"] == "INFO" and first["logger"] == as_json.logger.name
    assert first["message"] == "model m1: cached -> starting" and first["model"] == "m1"
    assert TIME.match(first["time"]), first["time"]
    stamp = datetime.strptime(first["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - 1 < stamp.timestamp() < time.time() + 1  # UTC, not local time
    assert set(second) == {"time", "level", "logger", "message"}  # no id outside a request
    assert second["level"] == "WARNING"


def test_json_line_is_one_line_whatever_the_message(as_json: Captured) -> None:
    forged = 'x"}\n{"level": "INFO", "message": "forged'
    as_json.logger.info("client sent %s", forged)
    as_json.logger.info("bytes %r and text %s", b"\xff\x00", "caf\u00e9 \u2028 \ud800")
    lines = as_json.lines()
    assert len(lines) == 2
    assert json.loads(lines[0])["message"] == f"client sent {forged}"
    assert "caf\u00e9" in json.loads(lines[1])["message"]
    assert all(line.isascii() for line in lines)


def test_json_exception(as_json: Captured) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        as_json.logger.exception("handling failed")
    (line,) = as_json.lines()
    entry = json.loads(line)
    assert entry["message"] == "handling failed" and entry["level"] == "ERROR"
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert entry["exc_info"].endswith("ValueError: boom")


def test_json_stack_info(as_json: Captured) -> None:
    as_json.logger.info("where", stack_info=True)
    assert as_json.json()[0]["stack_info"].startswith("Stack (most recent call last):")


def test_text_line_is_todays_with_the_request_id(as_text: Captured) -> None:
    as_text.logger.info("outside")
    token = bind_request_id("abc-123")
    try:
        as_text.logger.info("inside")
    finally:
        reset_request_id(token)
    outside, inside = as_text.lines()
    assert re.fullmatch(r"\S+ \S+ INFO    test_logs\.\S+: outside", outside), outside
    assert inside.endswith(": inside [req=abc-123]"), inside
    assert "[req=" not in outside
    assert as_text.handler.formatter._fmt == FORMAT  # type: ignore[union-attr]


# The request id

def test_request_id_reaches_lines_logged_in_a_requests_tasks(as_json: Captured) -> None:
    log = as_json.logger

    async def work(step: str) -> None:
        await asyncio.sleep(0)
        log.info("step %s", step)

    async def handle(rid: str) -> None:
        token = bind_request_id(rid)
        try:
            log.info("start")
            # A task started by the request, and another one inside it.
            await asyncio.create_task(work("a"))
            await asyncio.gather(work("b"), asyncio.create_task(work("c")))
        finally:
            reset_request_id(token)

    async def main() -> None:
        await asyncio.gather(handle("req-1"), handle("req-2"), handle("req-3"))
        log.info("after")

    asyncio.run(main())
    entries = as_json.json()
    assert len(entries) == 13
    by_id: dict[str, list[str]] = {}
    for entry in entries[:-1]:
        by_id.setdefault(entry["request_id"], []).append(entry["message"])
    assert {k: sorted(v) for k, v in by_id.items()} == {
        rid: ["start", "step a", "step b", "step c"] for rid in ("req-1", "req-2", "req-3")}
    assert "request_id" not in entries[-1]
    assert request_id.get() is None


def test_request_id_set_in_a_task_stays_in_it(as_json: Captured) -> None:
    """A request's task may set the id without resetting it (its context is its own copy);
    asyncio.to_thread carries it to the thread."""
    log = as_json.logger

    async def handle() -> None:
        request_id.set("in-task")
        await asyncio.to_thread(log.info, "in a thread")

    async def main() -> None:
        await asyncio.create_task(handle())
        log.info("the loop's own context")

    asyncio.run(main())
    in_thread, outside = as_json.json()
    assert in_thread["request_id"] == "in-task"
    assert "request_id" not in outside


def test_request_id_given_as_extra_is_kept(as_json: Captured) -> None:
    token = bind_request_id("bound")
    try:
        as_json.logger.info("explicit", extra={"request_id": "given"})
    finally:
        reset_request_id(token)
    assert as_json.json()[0]["request_id"] == "given"


def test_request_id_bound_as_bytes(as_json: Captured, as_text: Captured) -> None:
    """The serving layer's ids are bytes (modelhost.requestid): bound as they are, written
    as text."""
    token = bind_request_id(b"3f9c01aa52e1-2a")
    try:
        as_json.logger.info("json")
        as_text.logger.info("text")
    finally:
        reset_request_id(token)
    assert as_json.json()[0]["request_id"] == "3f9c01aa52e1-2a"
    assert as_text.lines()[0].endswith("text [req=3f9c01aa52e1-2a]")


# The secrets scrubber (gateway.py puts redaction.ScrubFilter on the root's handlers)

def test_secrets_scrubbed_in_json_lines(as_json: Captured) -> None:
    secret = "sk-very-secret-value-42"
    scrub = Scrubber()
    scrub.set([secret])
    as_json.handler.addFilter(ScrubFilter(scrub))
    as_json.logger.info("worker command: serve --api-key %s", secret)
    try:
        raise RuntimeError(f"upstream refused key {secret} at http://user:pw@host/v1")
    except RuntimeError:
        as_json.logger.exception("probe of http://user:pw@host/v1 failed")
    output = as_json.buffer.getvalue()
    assert secret not in output and "user:pw" not in output
    first, second = as_json.json()
    assert first["message"] == "worker command: serve --api-key ***"
    assert second["message"] == "probe of http://***@host/v1 failed"
    assert "RuntimeError: upstream refused key *** at http://***@host/v1" in second["exc_info"]


# The file: its name, rotation, and setup

def test_log_file_name_honoured(tmp_path: Path, closing: list[logging.Handler]) -> None:
    closing += make_handlers(settings(tmp_path, log_file_name="gateway-prod.log",
                                      log_format="json"))
    record = logging.LogRecord("modelhost.x", logging.INFO, __file__, 1, "hello", None, None)
    for handler in closing[1:]:  # the file only: stderr is pytest's
        handler.handle(record)
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["gateway-prod.log"]
    entry = json.loads((tmp_path / "logs" / "gateway-prod.log").read_text())
    assert entry["message"] == "hello"
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("name", [
    "../escape.log", "/tmp/escape.log", "sub/x.log", "..", ".", "x\0y", "logs/../../x",
])
def test_log_file_name_leaving_the_folder_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(LogSetupError, match="LOG_FILE_NAME must be a file name in LOG_DIR"):
        log_file(tmp_path, name)
    with pytest.raises(LogSetupError):
        setup_logging(settings(tmp_path, log_file_name=name))
    assert not (tmp_path / "logs").exists()  # refused before anything was made


def test_unusable_log_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("a file where the folder should be")
    with pytest.raises(LogSetupError, match="cannot open the log file"):
        make_handlers(settings(tmp_path))


def write_lines(tmp_path: Path, closing: list[logging.Handler], count: int,
                **fields: Any) -> Path:
    closing += make_handlers(settings(tmp_path, log_format="json", **fields))
    file_handler = closing[1]
    for i in range(count):
        file_handler.handle(logging.LogRecord("modelhost.x", logging.INFO, __file__, 1,
                                              "line %05d %s", (i, "x" * 40), None))
    return tmp_path / "logs"


def test_rotation_at_the_size_keeping_the_count(tmp_path: Path,
                                                 closing: list[logging.Handler]) -> None:
    folder = write_lines(tmp_path, closing, 200, log_file_bytes=2000, log_file_backups=3)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["modelhost.log", "modelhost.log.1", "modelhost.log.2", "modelhost.log.3"]
    numbers = []
    for name in ["modelhost.log.3", "modelhost.log.2", "modelhost.log.1", "modelhost.log"]:
        path = folder / name
        assert path.stat().st_size <= 2000
        if name != "modelhost.log":
            assert path.stat().st_size > 2000 - 150  # full: rotated at the size
        numbers += [int(json.loads(line)["message"].split()[1])
                    for line in path.read_text().splitlines()]
    # The newest lines are kept, in order, none lost between the files kept.
    assert numbers == list(range(numbers[0], 200))
    assert numbers[0] > 0


def test_no_backups_starts_the_file_over(tmp_path: Path,
                                         closing: list[logging.Handler]) -> None:
    folder = write_lines(tmp_path, closing, 200, log_file_bytes=1000, log_file_backups=0)
    assert [p.name for p in folder.iterdir()] == ["modelhost.log"]
    text = (folder / "modelhost.log").read_text()
    assert len(text) <= 1000
    assert json.loads(text.splitlines()[-1])["message"].startswith("line 00199")


def test_existing_file_is_appended_and_its_size_counted(
        tmp_path: Path, closing: list[logging.Handler]) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "modelhost.log").write_text("x" * 990 + "\n")
    write_lines(tmp_path, closing, 1, log_file_bytes=1000, log_file_backups=1)
    assert (folder / "modelhost.log.1").read_text() == "x" * 990 + "\n"
    assert json.loads((folder / "modelhost.log").read_text())["message"].startswith("line")


def test_setup_logging_installs_on_the_root(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        setup_logging(settings(tmp_path, log_format="json", log_level="debug"))
        assert root.level == logging.DEBUG
        assert len(root.handlers) == 2
        assert all(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        logging.getLogger("uvicorn.error").info("through uvicorn's logger")
        entry = json.loads((tmp_path / "logs" / "modelhost.log").read_text())
        assert entry["logger"] == "uvicorn.error"
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved, level


# A real gateway

def test_gateway_log_file_is_json_lines(tmp_path: Path,
                                        gateway_factory: GatewayFactory) -> None:
    secret = "worker-secret-7a1b2c3d"
    logs = tmp_path / "gw-logs"
    gw = gateway_factory(
        [fake_model("broken", None, "--exit-at-start", "3", f"--api-key={secret}",
                    max_restarts=1)],
        env={"MODELHOST_LOG_FORMAT": "json", "MODELHOST_LOG_DIR": str(logs),
             "LOG_FILE_NAME": "gateway.jsonl", "MODELHOST_LOG_LEVEL": "debug"})
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/chat/completions", json={
            "model": "no-such\nmodel", "messages": [{"role": "user", "content": "hi"}],
        }).status_code == 404
        failed = client.post("/v1/chat/completions", json={
            "model": "broken", "messages": [{"role": "user", "content": "hi"}]})
        assert failed.status_code >= 500, failed.text
    gw.stop()
    assert [p.name for p in logs.iterdir() if p.is_file()] == ["gateway.jsonl"]
    text = (logs / "gateway.jsonl").read_text()
    entries = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert len(entries) > 3
    assert all(TIME.match(e["time"]) and e["level"] and e["logger"] for e in entries)
    loggers = {e["logger"] for e in entries}
    assert "uvicorn.error" in loggers and any(n.startswith("modelhost.") for n in loggers)
    assert secret not in text and secret not in gw.output()
    starts = [e["message"] for e in entries if e["message"].startswith("starting worker")]
    assert starts and all("--api-key=***" in m for m in starts), starts
    # stderr carries the same JSON lines.
    stderr = [line for line in gw.output().splitlines() if line.startswith("{")]
    assert {json.loads(line)["message"] for line in stderr} >= {e["message"] for e in entries
                                                              if e["level"] != "DEBUG"}


def test_gateway_refuses_a_log_file_name_leaving_the_folder(
        tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    with pytest.raises(RuntimeError, match="LOG_FILE_NAME must be a file name in LOG_DIR"):
        gateway_factory(env={"MODELHOST_LOG_DIR": str(tmp_path / "logs"),
                             "LOG_FILE_NAME": "../escaped.log"})
    assert not (tmp_path / "escaped.log").exists()


def test_gateway_text_log_rotates(tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    logs = tmp_path / "gw-logs"
    gw = gateway_factory(env={"MODELHOST_LOG_DIR": str(logs), "MODELHOST_LOG_LEVEL": "debug",
                              "MODELHOST_LOG_FILE_BYTES": "400",
                              "MODELHOST_LOG_FILE_BACKUPS": "2"})
    gw.stop()
    names = sorted(p.name for p in logs.iterdir() if p.is_file())
    assert names == ["modelhost.log", "modelhost.log.1", "modelhost.log.2"]
    kept = []
    for name in reversed(names):
        assert 0 < (logs / name).stat().st_size <= 400
        kept += (logs / name).read_text().splitlines()
    line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +[\w.]+: .*")
    assert all(line.fullmatch(text) for text in kept), kept
    assert "Finished server process" in kept[-1]
    # The oldest lines went with the oldest file; stderr had them all.
    assert not any("Started server process" in text for text in kept)
    assert "Started server process" in gw.output()


@pytest.mark.parametrize("access_log", ["false", "true"], ids=["no-access-log", "access-log"])
def test_gateway_lines_about_a_request_carry_its_id(
        tmp_path: Path, gateway_factory: GatewayFactory, access_log: str) -> None:
    """With the access log or without (both on the server's fast path: the access lines of
    its complete answers are written from a timer, `serving/access.py`), the lines logged
    while serving a request carry its id (the client's when valid, else the one made and
    returned); the others carry none, and a refused id is never written."""
    logs = tmp_path / "gw-logs"
    gw = gateway_factory([fake_model("m")], env={
        "MODELHOST_LOG_FORMAT": "json", "MODELHOST_LOG_DIR": str(logs),
        "MODELHOST_ACCESS_LOG": access_log})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gw.url, timeout=30) as client:
        ok = client.post("/v1/chat/completions", json=body,
                         headers={"X-Request-ID": "client-req.1"})
        assert ok.headers["x-request-id"] == "client-req.1"
        odd = client.post("/v1/chat/completions", json=body,
                          headers={b"X-Request-ID": "odd id \u00e9t\u00e9".encode("latin-1")})
        made = odd.headers["x-request-id"]
        assert made != "odd id"
        with client.stream("POST", "/v1/chat/completions", headers={"X-Request-ID": "crash:2"},
                           json={**body, "stream": True, "fake": {"crash_after": 1}}) as stream:
            lines = list(stream.iter_lines())  # broken off by the worker: no [DONE]
        assert "data: [DONE]" not in lines
        assert client.post("/v1/chat/completions", json={**body, "model": "nope"},
                           headers={"X-Request-ID": "nf-3"}).status_code == 404
    gw.stop()
    text = (logs / "modelhost.log").read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    broken = [e for e in entries if "stream broken" in e["message"]]
    assert [e.get("request_id") for e in broken] == ["crash:2"], broken
    startup = [e for e in entries if e["logger"] == "uvicorn.error"]
    assert startup and all("request_id" not in e for e in startup)
    exited = [e for e in entries if "worker exited" in e["message"]]
    assert exited and all("request_id" not in e for e in exited)  # the supervisor's own
    assert "odd id" not in text
    if access_log == "true":
        chats = {e.get("request_id"): e["message"].rsplit(" ", 1)[1] for e in entries
                 if e["logger"] == "uvicorn.access" and "/v1/chat/completions" in e["message"]}
        assert chats == {"client-req.1": "200", made: "200", "crash:2": "200", "nf-3": "404"}
