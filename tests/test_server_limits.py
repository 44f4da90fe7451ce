"""The HTTP server's own protections (`server.py`): the app's gate judged before any body, the
receive deadlines, the cap on a request's head, the write deadline, the connection cap.

The first tests run one real uvicorn server with `GatewayProtocol` over real sockets in front
of a small app (the one of test_server.py, with a gate and settings); the last ones drive a real
`modelhost serve` as an attacker and a faulty client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from modelhost.errors import error_body
from modelhost.serving.answers import Answer, json_answer
from modelhost.serving.limits import MAX_HEAD_BYTES
from modelhost.serving.wire import HotCycle
from modelhost.settings import Settings
from tests.conftest import GatewayFactory, fake_model, wait_for
from tests.test_server import LIMIT, App, Served, closed, post, read_answer

MiB = 1024 * 1024


class Flood:
    """A hot route that streams 64 KiB chunks as fast as the client takes them, until it
    leaves."""

    limit = LIMIT

    def __init__(self) -> None:
        self.left = threading.Event()

    def start(self, cycle: HotCycle) -> bool:
        return False

    async def __call__(self, cycle: HotCycle) -> None:
        _, receive, send = cycle.asgi()
        gone = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        chunk = b"x" * 65536
        while not gone.done():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0)
        self.left.set()


class Big:
    """A hot route whose complete answer is 32 MiB, written at once."""

    limit = LIMIT
    size = 32 * MiB

    def start(self, cycle: HotCycle) -> bool:
        cycle.answer(200, [(b"content-length", str(self.size).encode())], b"b" * self.size)
        return True

    async def __call__(self, cycle: HotCycle) -> None:
        raise AssertionError("taken by start")


class Gated(App):
    """test_server's app, with settings (the limits) and a gate that refuses a request with
    `X-Refuse: 1` or a path under /refused."""

    def __init__(self, **limits: Any) -> None:
        super().__init__()
        self.settings = Settings.with_overrides(**limits)
        self.flood = Flood()
        self.hot_routes.update({b"/flood": self.flood, b"/big": Big()})
        self.gated: list[tuple[bytes, str]] = []

    def gate(self, method: bytes, path: str, headers: list[tuple[bytes, bytes]]
             ) -> Answer | None:
        self.gated.append((method, path))
        if path == "/gate-fails":
            raise RuntimeError("the gate failed")
        if path.startswith("/refused") or (b"x-refuse", b"1") in headers:
            return json_answer(error_body("Refused by the gate.", "authentication_error",
                                          None, "invalid_api_key"), 401)
        return None


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served(Gated(header_timeout=1, body_timeout=1, write_timeout=1))
    yield s
    s.stop()


def app_of(served: Served) -> Gated:
    assert isinstance(served.app, Gated)
    return served.app


def head(path: str, *headers: str, method: str = "POST", host: str = "x") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything until the server closes (or `timeout`)."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def recv_until_reset(sock: socket.socket) -> None:
    sock.settimeout(5)
    while sock.recv(65536):
        pass


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ------------------------------------------------------------------------------ the gate

@pytest.mark.parametrize("path", ["/hot", "/other"])
def test_a_refusal_comes_at_once_without_reading_the_body(served: Served, path: str) -> None:
    echo = app_of(served).echo
    calls = echo.calls
    with served.connect() as sock:
        # 8 MiB declared, the client waiting for 100 Continue: refused on the head alone.
        sock.sendall(head(path, "X-Refuse: 1", f"Content-Length: {8 * MiB}",
                          "Expect: 100-continue"))
        data = recv_all(sock, timeout=5)
    assert b"100 Continue" not in data
    assert data.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nconnection: close\r\n" in data
    assert error_of(data.partition(b"\r\n\r\n")[2])["code"] == "invalid_api_key"
    assert echo.calls == calls


def test_the_gate_sees_every_request_with_its_decoded_path(served: Served) -> None:
    app = app_of(served)
    app.gated.clear()
    assert httpx.post(served.url + "/hot", content=b"a").text == "hot a"
    assert httpx.get(served.url + "/other%20path?q=1").text == "asgi GET /other path "
    resp = httpx.delete(served.url + "/refused/x%2Fy")
    assert resp.status_code == 401 and resp.headers["connection"] == "close"
    assert app.gated == [(b"POST", "/hot"), (b"GET", "/other path"), (b"DELETE", "/refused/x/y")]


@pytest.mark.parametrize("config", [{"log_level": "trace"}, {"access_log": True},
                                    {"proxy_headers": True, "forwarded_allow_ips": "*"}],
                         ids=["trace", "access-log", "proxy-headers"])
def test_the_gate_is_asked_behind_uvicorns_wrappers(config: dict[str, Any]) -> None:
    # The hot path is off with the first two, never the gate.
    s = Served(Gated(), **config)
    try:
        resp = httpx.post(s.url + "/hot", content=b"x", headers={"X-Refuse": "1"})
        assert resp.status_code == 401
        assert app_of(s).gated == [(b"POST", "/hot")]
    finally:
        s.stop()


def test_a_gate_that_fails_is_a_500(served: Served) -> None:
    resp = httpx.post(served.url + "/gate-fails", content=b"x")
    assert resp.status_code == 500 and resp.headers["connection"] == "close"
    assert error_of(resp.content)["type"] == "server_error"
    assert httpx.post(served.url + "/hot", content=b"after").text == "hot after"


@pytest.mark.parametrize("path", ["/hot", "/other"])
def test_a_client_still_sending_its_body_gets_the_refusal(served: Served, path: str) -> None:
    # The body is dropped as it arrives (not kept, not parsed) until the client is done, so
    # that closing does not reset a connection the client is still writing to.
    resp = httpx.post(served.url + path, content=b"x" * (4 * MiB), headers={"X-Refuse": "1"})
    assert resp.status_code == 401
    assert error_of(resp.content)["type"] == "authentication_error"


def test_a_pipelined_refusal_waits_for_the_answer_before_it(served: Served) -> None:
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot", b"slow") + post("/hot", b"no", "X-Refuse: 1")
                     + post("/hot", b"never"))
        assert read_answer(sock, buf)[2] == b"hot slow"
        status, headers, _ = read_answer(sock, buf)
        assert status.startswith(b"HTTP/1.1 401") and headers["connection"] == "close"
        assert closed(sock) and not buf


# ------------------------------------------------------------------------ receive deadlines

def test_headers_must_arrive_within_the_header_timeout(served: Served) -> None:
    # Nothing at all, a partial head, a head dribbled a byte at a time (the deadline counts
    # from the first byte, not the last).
    for sent in (b"", b"POST /hot HTTP/1.1\r\nHost: x\r\n", None):
        with served.connect() as sock:
            start = time.monotonic()
            if sent is None:
                sock.settimeout(0.2)
                data = b""
                for byte in b"POST /hot HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                    sock.sendall(bytes([byte]))
                    try:
                        data = sock.recv(65536)
                        break
                    except TimeoutError:
                        continue
                data += recv_all(sock)
            else:
                sock.sendall(sent)
                data = recv_all(sock)
            elapsed = time.monotonic() - start
        assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
        assert b"connection: close" in data
        assert error_of(data.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"
        assert 1 <= elapsed < 10


def test_an_idle_keep_alive_connection_is_not_a_late_head(served: Served) -> None:
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot", b"one"))
        assert read_answer(sock, buf)[2] == b"hot one"
        time.sleep(2)  # past header_timeout, within uvicorn's keep-alive (5 s)
        sock.sendall(post("/hot", b"two"))
        assert read_answer(sock, buf)[2] == b"hot two"


@pytest.mark.parametrize("path", ["/hot", "/other"])
def test_a_body_that_stops_arriving_is_a_408(served: Served, path: str) -> None:
    with served.connect() as sock:
        sock.sendall(head(path, "Content-Length: 50") + b"x" * 10)
        data = recv_all(sock)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    assert error_of(data.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"


@pytest.mark.parametrize("path", ["/hot", "/other"])
def test_a_slow_steady_body_is_not_cut(served: Served, path: str) -> None:
    # Six pieces 0.4 s apart: 2 s in all, never 1 s without a byte.
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(head(path, "Content-Length: 60"))
        for _ in range(6):
            time.sleep(0.4)
            sock.sendall(b"y" * 10)
        body = read_answer(sock, buf)[2]
    assert body.endswith(b"y" * 60) and body.startswith((b"hot ", b"asgi POST /other "))


def test_a_head_past_the_cap_is_a_431(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /other HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        data = b""
        sock.settimeout(0.05)
        for _ in range(4 * MAX_HEAD_BYTES // 8192):
            try:
                sock.sendall(b"a" * 8192)
                data = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        data += recv_all(sock)
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert error_of(data.partition(b"\r\n\r\n")[2])["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------- write deadline

def test_a_client_that_stops_reading_a_stream_is_cut_off(served: Served) -> None:
    flood = app_of(served).flood
    flood.left.clear()
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(post("/flood", b""))
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        # ... and reads nothing more: the route sees the client leave.
        assert flood.left.wait(15), "the stream was not ended"


def test_a_large_answer_that_is_never_read_is_dropped(served: Served) -> None:
    connections = served.server.server_state.connections
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(post("/big", b""))
        assert wait_for(lambda: len(connections) == 1, 5)
        # The 32 MiB sit in the transport's buffer until the write deadline drops them, and
        # what the kernel held for the client with them (a reset, not a close).
        assert wait_for(lambda: not connections, 15), "the connection was kept"
        with pytest.raises(ConnectionResetError):
            recv_until_reset(sock)


def test_a_slow_reader_that_keeps_reading_gets_everything(served: Served) -> None:
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(post("/big", b""))
        received = 0
        start = time.monotonic()
        while chunk := sock.recv(65536):
            received += len(chunk)
            time.sleep(0.002)  # 64 KiB per few ms: many write_timeouts in all
            if received >= Big.size:
                break
        assert received >= Big.size
        assert time.monotonic() - start > 1  # it did take longer than the write deadline


# ---------------------------------------------------------------------------- connection cap

def test_connections_past_the_cap_get_a_503() -> None:
    s = Served(Gated(max_connections=3))
    try:
        held = [s.connect() for _ in range(3)]
        assert wait_for(lambda: len(s.server.server_state.connections) == 3, 5)
        with s.connect() as sock:
            sock.sendall(post("/hot", b"a"))  # dropped, not answered
            data = recv_all(sock, timeout=5)
        status, _, _ = data.partition(b"\r\n")
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert b"retry-after: 1\r\n" in data and b"connection: close\r\n" in data
        assert error_of(data.partition(b"\r\n\r\n")[2])["code"] == "too_many_connections"
        held.pop().close()
        assert wait_for(lambda: len(s.server.server_state.connections) == 2, 5)
        assert httpx.post(s.url + "/hot", content=b"b").text == "hot b"
        for sock in held:
            sock.close()
    finally:
        s.stop()


# ------------------------------------------------------------- a real gateway, as attacked

def test_hundreds_of_stalled_connections(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([], env={"MODELHOST_MAX_CONNECTIONS": "64",
                                  "MODELHOST_HEADER_TIMEOUT": "3"})
    proc = psutil.Process(gw.proc.pid)
    rss_before = proc.memory_info().rss
    stalled: list[socket.socket] = []
    try:
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            stalled.append(sock)
            # A head that never ends: 32 KiB of it (past the cap, refused: maybe not sent).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                             b"X-Pad: " + b"a" * 32768)
        rss_flood = proc.memory_info().rss
        # The gateway still answers at once: 503 while the stalled ones fill the cap.
        start = time.monotonic()
        health = httpx.get(gw.url + "/health", timeout=5)
        assert health.status_code in (200, 503) and time.monotonic() - start < 5
        if health.status_code == 503:
            assert health.json()["error"]["code"] == "too_many_connections"
        # Every stalled connection is closed: 408 past the header timeout, 503 past the cap.
        answers = [recv_all(sock, timeout=20) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    statuses = [a.partition(b"\r\n")[0] for a in answers]
    timed_out = statuses.count(b"HTTP/1.1 408 Request Timeout")
    refused = statuses.count(b"HTTP/1.1 503 Service Unavailable")
    assert timed_out + refused == len(stalled), set(statuses)
    assert 0 < timed_out <= 64 and refused >= len(stalled) - 64
    assert rss_flood - rss_before < 64 * MiB, (rss_before, rss_flood)
    assert wait_for(lambda: httpx.get(gw.url + "/health", timeout=5).status_code == 200, 10)


def test_an_unauthenticated_8_mib_body_is_refused_before_it_is_sent(
        gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("m")], env={"OPENAI_API_KEYS": "sk-right"})
    for headers in ((), ("Authorization: Bearer sk-wrong",), ("Expect: 100-continue",)):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(head("/v1/chat/completions", "Content-Type: application/json",
                              f"Content-Length: {8 * MiB}", *headers, host="localhost"))
            data = recv_all(sock, timeout=5)  # ... and the server closes
            assert time.monotonic() - start < 5
        assert data.startswith(b"HTTP/1.1 401 "), data[:300]
        assert b"100 Continue" not in data and b"connection: close" in data
        assert error_of(data.partition(b"\r\n\r\n")[2])["type"] == "authentication_error"


def test_a_client_that_stops_reading_frees_the_model(gateway_factory: GatewayFactory,
                                                      tmp_path: Path) -> None:
    events = tmp_path / "events"
    gw = gateway_factory([fake_model("m", events, max_concurrency=1)],
                         env={"MODELHOST_WRITE_TIMEOUT": "2"})
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user",
                       "content": "hi"}], "fake": {"tokens": 300_000, "gap": 0}}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", gw.port))
        sock.sendall(head("/v1/chat/completions", "Content-Type: application/json",
                          f"Content-Length: {len(body)}", host="localhost") + body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        # The client reads no more. The model has one slot, which the stream holds until the
        # write deadline ends it.
        resp = httpx.post(gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "next"}]})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "word0 word1 word2"
    # The stream was cut, not finished: the worker completed only the second request.
    assert events.read_text().split().count("completed") == 1
