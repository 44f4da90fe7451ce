"""The relay's HTTP/1.1 client (`modelhost.upstream`) against real servers on loopback: aiohttp
for well-behaved ones, raw asyncio servers for the misbehaving ones."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvloop
from aiohttp import web

from modelhost.serving.wire import CoalescingWriter
from modelhost.upstream import (
    AnswerTooLarge,
    Multipart,
    UpstreamClient,
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)
from modelhost.upstream.client import PROBE_BODY

JSON = {"Content-Type": "application/json"}


def run(coro: Awaitable[Any]) -> Any:
    """Run on uvloop, as the gateway does."""
    async def main() -> Any:
        return await coro
    return uvloop.run(main())


@asynccontextmanager
async def aiohttp_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> AsyncIterator[tuple[str, set[Any]]]:
    """An aiohttp server answering every request with `handler`; yields its base URL and the
    set of client addresses (one per TCP connection) it has seen."""
    peers: set[Any] = set()

    async def recording(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", recording)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1", peers
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_server(on_request: Callable[[asyncio.Transport, int], None]
                     ) -> AsyncIterator[str]:
    """A server that calls `on_request(transport, n)` for the n-th request head it sees on a
    connection (n from 1), and does whatever that says."""
    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""
            self.count = 0

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, _, rest = self.buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if len(rest) < length:
                    return
                self.buffer = rest[length:]
                self.count += 1
                on_request(self.transport, self.count)  # type: ignore[arg-type]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Proto, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


def test_requests_reuse_one_connection() -> None:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"path": request.path, "host": request.host,
                                  "length": len(body), "type": request.content_type})

    async def main() -> None:
        async with aiohttp_server(handler) as (base, peers):
            client = UpstreamClient()
            for _ in range(5):
                resp = await client.request(base, "POST", "/chat/completions", JSON, b'{"a": 1}')
                assert resp.status == 200
                headers = {k.lower(): v for k, v in resp.raw_headers}
                assert headers[b"content-type"] == b"application/json; charset=utf-8"
                data = await resp.read()
                assert b'"path": "/v1/chat/completions"' in data
                assert b'"length": 8' in data
            assert len(peers) == 1
            client.close()

    run(main())


def test_concurrent_requests_get_their_own_answers() -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.01)
        return web.Response(body=await request.read())

    async def main() -> None:
        async with aiohttp_server(handler) as (base, peers):
            client = UpstreamClient()

            async def one(i: int) -> bytes:
                resp = await client.request(base, "POST", "/x", JSON, str(i).encode() * 10)
                return await resp.read()

            answers = await asyncio.gather(*(one(i) for i in range(50)))
            assert answers == [str(i).encode() * 10 for i in range(50)]
            assert len(peers) <= 50
            client.close()

    run(main())


def test_a_pooled_connection_the_worker_dropped_is_retried_once() -> None:
    # The server answers the first request of each connection and drops the connection on
    # the second, without a byte: the client must retry on a new connection.
    def on_request(transport: asyncio.Transport, n: int) -> None:
        if n == 1:
            transport.write(OK)
        else:
            transport.abort()

    async def main() -> None:
        async with raw_server(on_request) as base:
            client = UpstreamClient()
            for _ in range(4):
                resp = await client.request(base, "POST", "/x", JSON, b"{}")
                assert await resp.read() == OK[-11:]
            client.close()

    run(main())


def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    seen: list[int] = []

    def on_request(transport: asyncio.Transport, n: int) -> None:
        seen.append(n)
        transport.abort()

    async def main() -> None:
        async with raw_server(on_request) as base:
            client = UpstreamClient()
            with pytest.raises(UpstreamClosed):
                await client.request(base, "POST", "/x", JSON, b"{}")
            client.close()

    run(main())
    assert seen == [1]


def test_connection_refused_is_an_oserror() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = UpstreamClient()
        with pytest.raises(ConnectionRefusedError):
            await client.request(f"http://127.0.0.1:{port}", "POST", "/x", JSON, b"{}")

    run(main())


class Recorder:
    """An `upstream.Listener` that records what it is told, and when the answer is done."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.over = asyncio.get_running_loop().create_future()

    def head(self, resp: UpstreamResponse) -> None:
        self.events.append(f"head {resp.status}")

    def done(self, resp: UpstreamResponse) -> None:
        self.events.append("done " + resp.take_body().decode())
        resp.release()
        self.over.set_result(None)

    def failed(self, resp: UpstreamResponse, exc: BaseException) -> None:
        self.events.append(f"failed {type(exc).__name__} head={resp.head_received}")
        resp.close()
        self.over.set_result(None)


def test_start_follows_the_answer_from_callbacks() -> None:
    # What the server does with each request, in order.
    script = ["whole", "whole", "pieces", "cut", "whole", "drop", "whole", "pieces"]

    def on_request(transport: asyncio.Transport, n: int) -> None:
        loop = asyncio.get_running_loop()
        action = script.pop(0)
        if action in ("whole", "pieces"):
            for i, piece in enumerate((OK[:40], OK[40:-5], OK[-5:]) if action == "pieces"
                                      else (OK,)):
                loop.call_later(0.01 * i, transport.write, piece)
        elif action == "cut":  # the head, part of the body, then the connection closes
            transport.write(OK[:-3])
            transport.abort()
        else:  # "drop": closed without a byte of the answer
            transport.abort()

    async def main() -> None:
        async with raw_server(on_request) as base:
            client = UpstreamClient()

            async def pooled() -> None:
                await (await client.request(base, "POST", "/x", JSON, b"{}")).read()

            async def started() -> list[str]:
                recorder = Recorder()
                assert client.start(base, "POST", "/x", JSON, b"{}", recorder) is not None
                await asyncio.wait_for(recorder.over, 5)
                return recorder.events

            # Nothing pooled yet: nothing is sent.
            assert client.start(base, "POST", "/x", JSON, b"{}", Recorder()) is None
            await pooled()
            assert await started() == ["head 200", 'done {"ok":true}']
            assert await started() == ["head 200", 'done {"ok":true}']  # in pieces
            assert await started() == ["head 200", "failed UpstreamClosed head=True"]
            await pooled()
            assert await started() == ["failed UpstreamClosed head=False"]
            # A listener that hands over to an awaiting reader: it gets the whole body.
            await pooled()
            recorder = Recorder()
            recorder.head = lambda resp: setattr(resp, "listener", None)  # type: ignore[method-assign]
            resp = client.start(base, "POST", "/x", JSON, b"{}", recorder)
            assert resp is not None
            await asyncio.sleep(0.05)  # the answer has arrived, in pieces
            assert await resp.read() == OK[-11:] and recorder.events == []
            assert script == []
            client.close()

    run(main())


def test_an_invalid_answer_is_a_protocol_error() -> None:
    def on_request(transport: asyncio.Transport, n: int) -> None:
        transport.write(b"this is not HTTP\r\n\r\n")

    async def main() -> None:
        async with raw_server(on_request) as base:
            client = UpstreamClient()
            with pytest.raises(UpstreamProtocolError):
                await client.request(base, "POST", "/x", JSON, b"{}")
            client.close()

    run(main())


def test_a_silent_worker_times_out() -> None:
    def on_request(transport: asyncio.Transport, n: int) -> None:
        pass  # never answers

    async def main() -> float:
        async with raw_server(on_request) as base:
            client = UpstreamClient(idle_timeout=0.4)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.request(base, "POST", "/x", JSON, b"{}")
            client.close()
            return time.monotonic() - started

    assert 0.3 < run(main()) < 3


def test_a_worker_that_keeps_talking_does_not_time_out() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(8):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.1)
        await resp.write_eof()
        return resp

    async def main() -> list[bytes]:
        async with aiohttp_server(handler) as (base, _):
            client = UpstreamClient(idle_timeout=0.3)
            resp = await client.request(base, "POST", "/x", JSON, b"{}")
            chunks = [c async for c in resp.chunks()]
            client.close()
            return chunks

    chunks = run(main())
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(8))
    assert len(chunks) >= 4  # handed on as they came, not at the end


def test_a_large_answer_read_slowly_pauses_the_worker_and_arrives_whole() -> None:
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    async def main() -> bytes:
        async with aiohttp_server(handler) as (base, _):
            client = UpstreamClient()
            resp = await client.request(base, "POST", "/x", JSON, b"{}")
            got = bytearray()
            paused = False
            async for chunk in resp.chunks():
                got += chunk
                conn = resp._conn
                paused = paused or (conn is not None and conn.reading_paused)
                await asyncio.sleep(0.001)
            assert paused, "reading never paused though the consumer was slow"
            client.close()
            return bytes(got)

    assert hashlib.sha256(run(main())).digest() == hashlib.sha256(payload).digest()


def test_close_aborts_the_connection_and_the_worker_sees_it() -> None:
    gone = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(200):
                await resp.write(b"data: x\n\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise
        return resp

    async def main() -> None:
        async with aiohttp_server(handler) as (base, _):
            client = UpstreamClient()
            resp = await client.request(base, "POST", "/x", JSON, b"{}")
            async for _ in resp.chunks():
                break
            resp.close()
            await asyncio.wait_for(gone.wait(), 5)
            client.close()

    run(main())


def test_files_and_multipart_forms_are_streamed_intact(tmp_path: Path) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(bytes(range(256)) * 4096 + b"tail")

    async def handler(request: web.Request) -> web.Response:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            upload = form["file"]
            assert isinstance(upload, web.FileField)
            return web.json_response({
                "fields": [(k, v) for k, v in form.items() if isinstance(v, str)],
                "filename": upload.filename,
                "sha": hashlib.sha256(upload.file.read()).hexdigest()})
        return web.json_response({"sha": hashlib.sha256(await request.read()).hexdigest()})

    async def main() -> tuple[Any, Any]:
        async with aiohttp_server(handler) as (base, _):
            client = UpstreamClient()
            form = Multipart(file_path=audio, filename='a "quoted" name.wav')
            form.add("model", "whisper-1")
            form.add("timestamp_granularities[]", "word")
            resp = await client.request(base, "POST", "/audio", {
                "Content-Type": form.content_type}, form)
            first = await resp.read()
            with tempfile.TemporaryFile() as spooled:
                spooled.write(audio.read_bytes())
                resp = await client.request(base, "POST", "/raw", {
                    "Content-Type": "application/octet-stream"}, spooled)
                second = await resp.read()
            client.close()
            return first, second

    first, second = (json.loads(x) for x in run(main()))
    sha = hashlib.sha256(audio.read_bytes()).hexdigest()
    assert first["sha"] == sha and second["sha"] == sha
    assert first["fields"] == [["model", "whisper-1"], ["timestamp_granularities[]", "word"]]
    assert first["filename"] == "a %22quoted%22 name.wav"


def test_header_values_with_line_breaks_are_refused() -> None:
    async def main() -> None:
        client = UpstreamClient()
        with pytest.raises(ValueError, match="line break"):
            await client.request("http://127.0.0.1:9", "POST", "/x",
                                 {"Authorization": "Bearer x\r\nEvil: 1"}, b"")

    run(main())


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_coalescing_writer_sends_head_and_body_in_one_write() -> None:
    async def main() -> list[bytes]:
        transport = _Recorder()
        writer = CoalescingWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        writer.write(b"HEAD")
        writer.write(b"BODY")
        assert transport.writes == [b"HEADBODY"]
        writer.write(b"event 1")  # alone in its iteration: goes out at the end of it
        await asyncio.sleep(0)
        assert transport.writes[-1] == b"event 1"
        writer.write(b"last")
        writer.close()  # a close flushes first
        assert transport.writes[-1] == b"last" and transport.closed
        assert writer.get_extra_info("peername") == "info:peername"
        return transport.writes

    assert run(main()) == [b"HEADBODY", b"event 1", b"last"]


# --- answers read whole: any size, a cap, a deadline ------------------------------------------


def test_an_answer_read_whole_is_never_paused_whatever_its_size() -> None:
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB, far past the high-water mark

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=payload)

    async def main() -> list[bytes]:
        async with aiohttp_server(handler) as (base, peers):
            client = UpstreamClient()
            bodies = []
            for _ in range(3):  # and the connection, back in the pool, is still good
                resp = await client.request(base, "POST", "/x", JSON, b"{}")
                await asyncio.sleep(0.2)  # the answer arrives (and pauses) before read()
                bodies.append(await asyncio.wait_for(resp.read(), 10))
            assert len(peers) == 1
            client.close()
            return bodies

    assert all(body == payload for body in run(main()))


class _Collect:
    """A `Listener` that hands the whole body to a future."""

    def __init__(self) -> None:
        self.body: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def head(self, resp: UpstreamResponse) -> None:
        pass

    def done(self, resp: UpstreamResponse) -> None:
        self.body.set_result(resp.take_body())
        resp.release()

    def failed(self, resp: UpstreamResponse, exc: BaseException) -> None:
        resp.close()
        self.body.set_exception(exc)


def test_a_listener_gets_a_large_answer_whole_and_a_cap_cuts_it_off() -> None:
    payload = b"x" * (3 * 1024 * 1024 + 17)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(payload), 64 * 1024):  # chunked: no length declared
            await resp.write(payload[i:i + 64 * 1024])
        await resp.write_eof()
        return resp

    async def main() -> tuple[bytes, BaseException | None, int]:
        async with aiohttp_server(handler) as (base, peers):
            client = UpstreamClient()
            await (await client.request(base, "POST", "/x", JSON, b"{}")).read()  # pooled
            whole = _Collect()
            assert client.start(base, "POST", "/x", JSON, b"{}", whole) is not None
            body = await asyncio.wait_for(whole.body, 10)
            capped = _Collect()
            assert client.start(base, "POST", "/x", JSON, b"{}", capped, limit=1024 * 1024)
            error = None
            try:
                await asyncio.wait_for(capped.body, 10)
            except AnswerTooLarge as exc:
                error = exc
            client.close()
            return body, error, len(peers)

    body, error, _ = run(main())
    assert body == payload
    assert isinstance(error, AnswerTooLarge) and error.limit == 1024 * 1024


def test_read_with_a_cap_fails_past_it_and_aborts_the_connection() -> None:
    gone = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for _ in range(1000):  # 64 MiB, slowly enough to be cut off well before the end
                await resp.write(b"y" * 64 * 1024)
                await asyncio.sleep(0.002)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise
        return resp

    async def main() -> None:
        async with aiohttp_server(handler) as (base, _):
            client = UpstreamClient()
            resp = await client.request(base, "POST", "/x", JSON, b"{}")
            with pytest.raises(AnswerTooLarge, match="exceeds 1048576 bytes"):
                await resp.read(1024 * 1024)
            await asyncio.wait_for(gone.wait(), 5)  # the worker saw the connection go
            client.close()

    run(main())


def test_a_worker_that_keeps_talking_past_the_request_deadline_times_out() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(40):
            await resp.write(b"z" * 1024)
            await asyncio.sleep(0.1)  # never silent for the idle timeout
        await resp.write_eof()
        return resp

    async def main() -> tuple[UpstreamTimeout, float, bytes]:
        async with aiohttp_server(handler) as (base, _):
            client = UpstreamClient(idle_timeout=1.0, request_timeout=0.8)
            started = time.monotonic()
            resp = await client.request(base, "POST", "/x", JSON, b"{}")
            with pytest.raises(UpstreamTimeout) as info:
                await resp.read()
            took = time.monotonic() - started
            # A stream's reader lifts the deadline: only silence would end it.
            resp = await client.request(base, "POST", "/x", JSON, b"{}")
            resp.deadline = math.inf
            streamed = b"".join([chunk async for chunk in resp.chunks()])
            client.close()
            return info.value, took, streamed

    error, took, streamed = run(main())
    assert not error.idle and error.seconds == 0.8
    assert 0.6 < took < 3
    assert streamed == b"z" * 40 * 1024


def test_connect_to_pins_the_address_and_keeps_the_name() -> None:
    """A remote added through the admin API is reached at the address checked when it was
    loaded (`connect_to`), not at whatever its name resolves to later (DNS rebinding): the
    name, which resolves to nothing here, stays in the Host header."""
    hosts: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hosts.append(request.headers["Host"])
        return web.json_response({"ok": True})

    async def main() -> None:
        async with aiohttp_server(handler) as (base, _):
            port = base.split(":")[2].split("/")[0]
            named = f"http://remote.invalid:{port}/v1"
            client = UpstreamClient()
            try:
                with pytest.raises(socket.gaierror):  # the name alone does not resolve
                    await client.request(named, "GET", "/models", {})
                # Tried in order: nothing listens on 127.0.0.2.
                resp = await client.request(named, "GET", "/models", {},
                                            connect_to=("127.0.0.2", "127.0.0.1"))
                assert resp.status == 200 and json.loads(await resp.read()) == {"ok": True}
                # Another checked address (where nothing listens): the pooled connection to
                # the old one is not reused.
                with pytest.raises(ConnectionRefusedError):
                    await client.request(named, "GET", "/models", {}, connect_to=("127.0.0.2",))
            finally:
                client.close()

    run(main())
    assert len(hosts) == 1 and hosts[0].startswith("remote.invalid:")



def test_each_origin_gets_its_own_host_and_prefix() -> None:
    # The same request to two origins: each hears its own Host and path prefix (the request
    # head is cached per origin, not per method, path and headers alone).
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "host": request.host})

    async def main() -> None:
        async with aiohttp_server(handler) as (first, _), \
                aiohttp_server(handler) as (second, _):
            second = second.removesuffix("/v1") + "/other"
            client = UpstreamClient()
            for base in (first, second, first, second):
                resp = await client.request(base, "GET", "/models", JSON)
                answer = json.loads(await resp.read())
                parts = urlsplit(base)
                assert answer == {"host": parts.netloc, "path": parts.path + "/models"}
            client.close()

    run(main())


def test_get_status_is_a_probe() -> None:
    # The status, whatever it is; a redirect not followed; the connection reused; a body
    # past what a probe reads does not hide the status.
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path == "/v1/moved":
            raise web.HTTPFound("/v1/health")
        if request.path == "/v1/big":
            return web.Response(body=b"x" * (PROBE_BODY + 1))
        if request.path == "/v1/starting":
            return web.Response(status=503, text="loading")
        return web.json_response({"data": []})

    async def main() -> None:
        async with aiohttp_server(handler) as (base, peers):
            client = UpstreamClient()
            assert await client.get_status(base, "/health") == 200
            assert await client.get_status(base, "/starting") == 503
            assert await client.get_status(base, "/moved") == 302
            assert len(peers) == 1  # each answer read: the connection went back to the pool
            assert await client.get_status(base, "/big", {"Authorization": "Bearer k"}) == 200
            assert seen == ["/v1/health", "/v1/starting", "/v1/moved", "/v1/big"]
            client.close()

    run(main())


def test_get_status_times_out_in_all() -> None:
    # A server that takes the request and never answers: TimeoutError (an OSError) once the
    # probe's whole timeout has passed, and no connection left open.
    async def main() -> None:
        async with raw_server(lambda transport, n: None) as base:
            client = UpstreamClient()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.get_status(base, "/health", timeout=0.3)
            assert 0.25 < time.monotonic() - started < 2
            assert all(conn.closed for pool in client._pools.values() for conn in pool.all)
            client.close()

    run(main())


def test_get_status_speaks_tls_to_an_https_base(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A remote server may be https: the name is checked against its certificate (here a
    # self-signed one the test trusts), also when the address is given (`connect_to`).
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True,
                   capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"host": request.host, "secure": request.secure})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/models", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        client = UpstreamClient()
        try:
            base = f"https://localhost:{port}/v1"
            assert await client.get_status(base, "/models", connect_to=("127.0.0.1",)) == 200
            resp = await client.request(base, "GET", "/models", {}, connect_to=("127.0.0.1",))
            assert json.loads(await resp.read()) == {"host": f"localhost:{port}",
                                                     "secure": True}
            with pytest.raises(ssl.SSLError):  # the name is checked: not 127.0.0.1's
                await client.get_status(f"https://127.0.0.1:{port}", "/v1/models")
        finally:
            client.close()
            await runner.cleanup()

    run(main())
