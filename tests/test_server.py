"""The server's hot path (`server.py`): routes served from uvicorn's HTTP protocol without the
ASGI stack, next to the ordinary ASGI path, on one real uvicorn server over real sockets.

The app answers "asgi ..." from its ASGI side and "hot ..." from its hot routes, so each test
sees which path served it. HTTP edge cases (keep-alive, pipelining, chunked bodies, 100-continue,
HTTP/1.0, disconnects) are checked on the hot path, which must behave as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from modelhost.serving.protocol import GatewayProtocol
from modelhost.serving.wire import HotCycle
from modelhost.workers.process import free_port
from tests.conftest import wait_for

LIMIT = 64


class Echo:
    """A hot route that answers with the body it got, `413` past its limit.

    A body that starts with `now`, `later`, `go on` or `start fails` is taken by `start`
    (no task): answered at once, from a timer callback, from a task it starts itself, or
    with a 500.
    """

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.calls = 0
        self.started = 0

    def start(self, cycle: HotCycle) -> bool:
        body = bytes(cycle.body)
        out = b"started " + body
        headers = [(b"content-length", str(len(out)).encode())]
        if body.startswith(b"now"):
            cycle.answer(200, headers, out)
        elif body.startswith(b"later"):
            asyncio.get_running_loop().call_later(0.05, cycle.answer, 200, headers, out)
        elif body.startswith(b"go on"):
            async def step(cycle: HotCycle) -> None:
                await asyncio.sleep(0.05)
                cycle.answer(200, headers, out)
            cycle.go_on(step)
        elif body.startswith(b"start fails"):
            raise RuntimeError("start failed")
        else:
            return False
        self.started += 1
        return True

    async def __call__(self, cycle: HotCycle) -> None:
        self.calls += 1
        if cycle.too_large:
            cycle.answer(413, [(b"content-length", b"9")], b"too large")
            return
        body = cycle.take_body()
        if body == b"fail":
            raise RuntimeError("the route failed")
        if body == b"bad header":
            cycle.answer(200, [(b"x-bad", b"line\nbreak"), (b"content-length", b"0")], b"")
        if body == b"slow":
            await asyncio.sleep(0.3)
        out = b"hot " + body
        cycle.answer(200, [(b"content-type", b"text/plain"),
                           (b"content-length", str(len(out)).encode())], out)


class Ticker:
    """A hot route that streams a chunk every 20 ms until the client leaves."""

    limit = LIMIT

    def __init__(self) -> None:
        self.left = threading.Event()

    def start(self, cycle: HotCycle) -> bool:
        return False

    async def __call__(self, cycle: HotCycle) -> None:
        scope, receive, send = cycle.asgi()
        gone = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(500):
            if gone.done():
                assert gone.result()["type"] == "http.disconnect"
                self.left.set()
                return
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                        "more_body": True})
            await asyncio.sleep(0.02 if i >= 3 else 0)
            if i == 2 and scope["path"] == "/hot-stream-3":
                break
        gone.cancel()
        await send({"type": "http.response.body", "body": b""})


class App:
    def __init__(self) -> None:
        self.echo = Echo()
        self.ticker = Ticker()
        self.hot_routes = {b"/hot": self.echo, b"/hot-stream": self.ticker,
                           b"/hot-stream-3": self.ticker}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = f"asgi {scope['method']} {scope['path']} ".encode() + body
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


class Served:
    def __init__(self, app: App | None = None, **config: Any) -> None:
        config.setdefault("access_log", False)
        config.setdefault("log_level", "warning")
        self.app = app or App()
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, http=GatewayProtocol, lifespan="off",
            **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.stop()


def post(path: str, body: bytes, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: x", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One answer (head, headers, body) off the socket; what follows stays in `buf`."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; got {bytes(buf)!r}"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    buf[:] = rest
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            buf += chunk
        body = bytes(buf[:n])
        del buf[:n]
        return status.encode(), headers, body
    return status.encode(), headers, b""


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_hot_route_and_everything_else(served: Served) -> None:
    before = served.app.echo.calls
    assert httpx.post(served.url + "/hot", content=b"hi").text == "hot hi"
    assert served.app.echo.calls == before + 1
    # Other methods, a query string, other paths: the ASGI app.
    assert httpx.get(served.url + "/hot").text == "asgi GET /hot "
    assert httpx.post(served.url + "/hot?x=1", content=b"q").text == "asgi POST /hot q"
    assert httpx.post(served.url + "/other", content=b"o").text == "asgi POST /other o"
    assert served.app.echo.calls == before + 1


def test_keep_alive_and_pipelining_keep_order(served: Served) -> None:
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot", b"one"))
        assert read_answer(sock, buf)[2] == b"hot one"
        # Three pipelined requests in one write, the first slow: answered in order.
        sock.sendall(post("/hot", b"slow") + post("/other", b"two") + post("/hot", b"three"))
        assert [read_answer(sock, buf)[2] for _ in range(3)] == [
            b"hot slow", b"asgi POST /other two", b"hot three"]


def test_chunked_body_and_limits(served: Served) -> None:
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot", b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                          "Transfer-Encoding: chunked"))
        assert read_answer(sock, buf)[2] == b"hot abcde"
        # Over the limit, without Content-Length: refused, and the connection goes on.
        big = b"x" * 50
        sock.sendall(post("/hot", b"32\r\n" + big + b"\r\n32\r\n" + big + b"\r\n0\r\n\r\n",
                          "Transfer-Encoding: chunked"))
        status, _, body = read_answer(sock, buf)
        assert (status, body) == (b"HTTP/1.1 413 Request Entity Too Large", b"too large")
        # Declared over the limit: refused at once, the body dropped as it arrives.
        sock.sendall(post("/hot", b"y" * 100))
        assert read_answer(sock, buf)[2] == b"too large"
        sock.sendall(post("/hot", b"after"))
        assert read_answer(sock, buf)[2] == b"hot after"


def test_expect_100_continue(served: Served) -> None:
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot", b"", "Expect: 100-continue", "Content-Length: 4"))
        assert read_answer(sock, buf)[0] == b"HTTP/1.1 100 Continue"
        sock.sendall(b"body")
        assert read_answer(sock, buf)[2] == b"hot body"
        # Too large: the answer comes at once, without inviting the body.
        sock.sendall(post("/hot", b"", "Expect: 100-continue", "Content-Length: 1000"))
        status, _, body = read_answer(sock, buf)
        assert status.startswith(b"HTTP/1.1 413") and body == b"too large"


def test_connection_close_and_http_10(served: Served) -> None:
    for request in (post("/hot", b"a", version="1.0"), post("/hot", b"a", "Connection: close")):
        with served.connect() as sock:
            buf = bytearray()
            sock.sendall(request)
            _, headers, body = read_answer(sock, buf)
            assert body == b"hot a"
            assert headers["connection"] == "close"
            assert closed(sock)


def test_stream_and_client_disconnect(served: Served) -> None:
    with httpx.stream("POST", served.url + "/hot-stream-3", content=b"") as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        assert resp.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    served.app.ticker.left.clear()
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot-stream", b""))
        read_answer(sock, buf)
        while b"data: 5" not in buf:
            buf += sock.recv(4096)
    assert served.app.ticker.left.wait(5), "the route did not see the client leave"


def test_route_taken_by_start_without_a_task(served: Served) -> None:
    echo = served.app.echo
    calls, started = echo.calls, echo.started
    with served.connect() as sock:
        buf = bytearray()
        for body in (b"now 1", b"later 2", b"go on 3"):
            sock.sendall(post("/hot", body))
            assert read_answer(sock, buf)[2] == b"started " + body
        # Chunked: `start` sees the whole body.
        sock.sendall(post("/hot", b"3\r\nnow\r\n2\r\n 4\r\n0\r\n\r\n",
                          "Transfer-Encoding: chunked"))
        assert read_answer(sock, buf)[2] == b"started now 4"
        # Pipelined behind an answer that comes from a timer: order kept; the requests
        # queued behind it go the awaited way.
        sock.sendall(post("/hot", b"later 5") + post("/other", b"six") + post("/hot", b"now 7"))
        assert [read_answer(sock, buf)[2] for _ in range(3)] == [
            b"started later 5", b"asgi POST /other six", b"hot now 7"]
    assert (echo.calls, echo.started) == (calls + 1, started + 5)
    # A client that leaves before its answer: the answer is dropped, the server goes on.
    with served.connect() as sock:
        sock.sendall(post("/hot", b"later 8"))
    time.sleep(0.1)
    assert httpx.post(served.url + "/hot", content=b"now 9").text == "started now 9"


def test_body_over_the_limit_is_refused_before_it_ends(served: Served) -> None:
    with served.connect() as sock:
        buf = bytearray()
        sock.sendall(post("/hot", b"50\r\n" + b"x" * 80 + b"\r\n",
                          "Transfer-Encoding: chunked"))
        status, _, body = read_answer(sock, buf)
        assert status.startswith(b"HTTP/1.1 413") and body == b"too large"
        sock.sendall(b"5\r\nxxxxx\r\n0\r\n\r\n" + post("/hot", b"now after"))
        assert read_answer(sock, buf)[2] == b"started now after"


def test_failing_route_is_a_500_and_the_server_goes_on(served: Served) -> None:
    for body in (b"fail", b"bad header", b"start fails"):
        resp = httpx.post(served.url + "/hot", content=body)
        assert resp.status_code == 500
        # The last resort is the OpenAI envelope, as on the ASGI path (not uvicorn's text).
        assert resp.headers["content-type"] == "application/json"
        assert resp.json() == {"error": {
            "message": "The gateway failed to process the request.", "type": "server_error",
            "param": None, "code": None}}
    assert httpx.post(served.url + "/hot", content=b"ok").text == "hot ok"


@pytest.mark.parametrize("config", [{"log_level": "trace"}, {"limit_concurrency": 100}],
                         ids=["trace", "limit-concurrency"])
def test_hot_path_is_off_when_it_would_be_seen(config: dict[str, Any]) -> None:
    s = Served(**config)
    try:
        assert httpx.post(s.url + "/hot", content=b"x").text == "asgi POST /hot x"
        assert s.app.echo.calls == 0
    finally:
        s.stop()


def test_hot_path_keeps_the_access_log() -> None:
    """With the access log on, hot routes stay hot: their complete answers' lines are noted
    and written from a timer (serving/access.py), at the answer's time."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    access = logging.getLogger("uvicorn.access")
    s = Served(access_log=True, log_level="info")
    access.addHandler(handler)
    try:
        before = time.time()
        assert httpx.post(s.url + "/hot", content=b"x").text == "hot x"
        assert wait_for(lambda: any("/hot" in r.getMessage() for r in records), timeout=5)
        line = next(r for r in records if "/hot" in r.getMessage())
        assert line.getMessage().endswith('"POST /hot HTTP/1.1" 200')
        assert before <= line.created <= time.time()
    finally:
        access.removeHandler(handler)
        s.stop()


def test_hot_path_behind_trusted_proxies(served: Served) -> None:
    s = Served(proxy_headers=True, forwarded_allow_ips="127.0.0.1")
    try:
        resp = httpx.post(s.url + "/hot", content=b"x", headers={"X-Forwarded-For": "1.2.3.4"})
        assert resp.text == "hot x"
    finally:
        s.stop()
