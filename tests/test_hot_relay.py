"""The relay served from callbacks (`relay.Exchange`): the whole gateway app in-process, driven
through its HTTP protocol (`server.GatewayProtocol`), in front of a scripted worker on loopback.

A request that needs nothing to be waited for (the model ready, a slot free, an idle pooled
connection) must be answered with no task at all; everything else (an error status, a stream, a
broken connection, a full model) must be answered exactly as the awaited path answers it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn
import uvloop
import yaml
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from modelhost.app import build_app
from modelhost.serving.front import Front
from modelhost.serving.protocol import GatewayProtocol
from modelhost.settings import Settings

KEY = "sk-test-hot-relay"


def answer(status: int, body: bytes, content_type: bytes = b"application/json",
           extra: bytes = b"") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 500: b"Internal Server Error"}[status]
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
            % (status, reason, content_type, len(body), extra)) + body


class Worker(asyncio.Protocol):
    """A scripted OpenAI-compatible worker: the request's `"mode"` says how it answers."""

    seen = 0
    lost = 0  # connections the gateway closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def connection_lost(self, exc: Exception | None) -> None:
        Worker.lost += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            Worker.seen += 1
            self.answer(head.split(b" ")[1], json.loads(rest[:length]) if length else {})

    def answer(self, path: bytes, request: dict[str, Any]) -> None:
        mode = request.get("mode", "ok")
        if path == b"/v1/models":
            self.transport.write(answer(200, b'{"object": "list", "data": []}'))
        elif mode == "ok":
            body = json.dumps({"object": "chat.completion", "model": request["model"],
                               "echo": request.get("messages")}).encode()
            self.transport.write(answer(200, body, extra=b"X-Input-Tokens: 7\r\n"))
        elif mode == "split":  # head, then the body in pieces
            body = b'{"object": "chat.completion", "pieces": [1, 2, 3]}'
            self.transport.write(answer(200, body)[:-len(body)])
            loop = asyncio.get_running_loop()
            for i, piece in enumerate((body[:10], body[10:30], body[30:])):
                loop.call_later(0.01 * (i + 1), self.transport.write, piece)
        elif mode == "bad":
            self.transport.write(answer(400, b'{"error": {"message": "context too long", '
                                             b'"param": "messages"}}'))
        elif mode == "broken":
            self.transport.write(answer(500, b'{"error": {"message": "worker broke"}}'))
        elif mode == "stream":
            events = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(3)) + \
                b"data: [DONE]\n\n"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
            self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events))
        elif mode == "drop":  # the connection closes before a byte of the answer
            self.transport.abort()
        elif mode == "drop-once":
            if Worker.seen % 2:
                self.transport.abort()
            else:
                self.answer(path, {**request, "mode": "ok"})
        elif mode == "cut":  # head and half the body, then the connection closes
            self.transport.write(answer(200, b'{"object": "chat.completion"}')[:-10])
            self.transport.abort()
        elif mode == "slow":
            asyncio.get_running_loop().call_later(
                0.2, self.answer, path, {**request, "mode": "ok"})
        elif mode == "big":  # `size` bytes, with their length declared
            self.transport.write(answer(200, big(request["size"])))
        elif mode == "big-chunked":  # `size` bytes in 64 KiB chunks, no length declared
            body = big(request["size"])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                self.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.transport.write(b"0\r\n\r\n")
        elif mode == "never":  # silent: only the gateway can end this exchange
            pass
        elif mode == "big-late":
            asyncio.get_running_loop().call_later(
                0.3, self.answer, path, {**request, "mode": "big"})


def big(size: int) -> bytes:
    """A JSON document of exactly `size` bytes."""
    return b'{"object": "chat.completion", "pad": "' + b"x" * (size - 40) + b'"}'


class Client:
    """The client's side of one connection, as the gateway's protocol sees it."""

    def __init__(self, protocol: GatewayProtocol) -> None:
        self.protocol = protocol
        self.data = bytearray()
        self.closed = False
        self.changed = asyncio.Event()
        protocol.connection_made(cast(asyncio.Transport, self))  # this object is its transport

    # the transport the protocol writes to
    def write(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    # the client
    def send(self, payload: dict[str, Any], key: str = KEY, raw: bytes | None = None,
             path: bytes = b"/v1/chat/completions") -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.protocol.data_received(
            b"POST %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path, key.encode(), len(body), body))

    async def answer(self) -> tuple[int, dict[bytes, bytes], bytes]:
        while True:
            head, sep, rest = bytes(self.data).partition(b"\r\n\r\n")
            if sep:
                lines = head.split(b"\r\n")
                headers = {k.lower(): v.strip() for k, _, v in
                           (line.partition(b":") for line in lines[1:])}
                if b"content-length" in headers:
                    n = int(headers[b"content-length"])
                    if len(rest) >= n:
                        del self.data[:len(head) + 4 + n]
                        return int(lines[0].split()[1]), headers, rest[:n]
                elif rest.endswith(b"0\r\n\r\n"):
                    self.data.clear()
                    return int(lines[0].split()[1]), headers, rest
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


Test = Callable[[Front, Client, ServerState], Awaitable[None]]


@asynccontextmanager
async def gateway(tmp: Path, env: pytest.MonkeyPatch, **model: Any
                  ) -> AsyncIterator[tuple[Front, Client, ServerState]]:
    loop = asyncio.get_running_loop()
    worker = await loop.create_server(Worker, "127.0.0.1", 0)
    port = worker.sockets[0].getsockname()[1]
    config_file = tmp / "models.yaml"
    config_file.write_text(yaml.safe_dump({"include_builtin": False, "models": [
        {"id": "m", "backend": "remote", "aliases": ["m-alias"],
         "source": {"url": f"http://127.0.0.1:{port}/v1"}, **model}]}))
    for name in os.environ:
        if name.startswith(("MODELHOST_", "OPENAI_API_KEYS", "LAZY_LOAD")):
            env.delenv(name)
    env.setenv("MODELHOST_CONFIG", str(config_file))
    env.setenv("MODELHOST_DATA_DIR", str(tmp / "data"))
    env.setenv("OPENAI_API_KEYS", KEY)
    app = build_app(Settings())
    config = uvicorn.Config(app, access_log=False, lifespan="on", log_level="warning")
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    state = ServerState()
    protocol = GatewayProtocol(config, state, {}, loop)
    client = Client(protocol)
    try:
        yield app, client, state
    finally:
        protocol.connection_lost(None)
        await lifespan.shutdown()
        worker.close()


Serve = Callable[..., None]


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Serve:
    """Run `test(app, client, state)` against a gateway whose model `m` has the given fields."""
    def run(test: Test, **model: Any) -> None:
        async def main() -> None:
            async with gateway(tmp_path, monkeypatch, **model) as (app, client, state):
                # The first request opens the connection to the worker, awaited.
                client.send(chat())
                assert (await client.answer())[0] == 200
                await test(app, client, state)
        uvloop.run(main())
    return run


def chat(mode: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "mode": mode,
            **fields}


def test_a_ready_model_is_answered_without_a_task(serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        registry = app.hot_routes[b"/v1/chat/completions"].endpoint.registry
        runtime = registry.models["m"]
        tokens = runtime.usage.get("input_tokens", 0)
        for mode in ("ok", "split"):
            client.send(chat(mode))
            assert not state.tasks, "a task was started"
            status, headers, body = await client.answer()
            assert status == 200 and headers[b"content-type"] == b"application/json"
            assert json.loads(body)["object"] == "chat.completion"
        # An alias is rewritten for the worker, on this path too.
        client.send(chat(model="m-alias"))
        assert not state.tasks
        assert json.loads((await client.answer())[2])["model"] == "m"
        assert state.total_requests == 4
        # What the worker reported it consumed is counted, as on the awaited path.
        assert runtime.usage["input_tokens"] == tokens + 14
        assert registry.models["m"].admission.active == 0

    serve(test)


def test_invalid_requests_and_keys_are_answered_without_a_task(serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        client.send({}, raw=b"{not json")
        assert not state.tasks
        status, _, body = await client.answer()
        assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
        client.send(chat(), key="sk-wrong")
        assert not state.tasks
        status, _, body = await client.answer()
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert client.closed  # refused on its head: the server closes the connection
        client = Client(GatewayProtocol(client.protocol.config, state, {},
                                        asyncio.get_running_loop()))
        client.send(chat(model="nope"))
        status, _, body = await client.answer()
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        client.protocol.connection_lost(None)

    serve(test)


def test_error_statuses_and_streams_go_on_as_awaited(serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        client.send(chat("bad"))
        status, _, body = await client.answer()
        assert status == 400
        assert json.loads(body)["error"] == {
            "message": "context too long", "type": "invalid_request_error",
            "param": "messages", "code": None}
        client.send(chat("broken"))
        status, _, body = await client.answer()
        assert status == 502 and "worker broke" in json.loads(body)["error"]["message"]
        client.send(chat("stream", stream=True))
        status, headers, body = await client.answer()
        assert status == 200 and headers[b"content-type"] == b"text/event-stream"
        assert body.count(b"data: ") == 4 and b"data: [DONE]" in body
        # The connection went back to the pool each time: the next is served from callbacks.
        client.send(chat())
        assert not state.tasks
        assert (await client.answer())[0] == 200

    serve(test)


def test_broken_connections_are_retried_or_answered_502(serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        # The pooled connection closes before a byte of the answer: the request is served
        # again the awaited way (which retries on a new connection).
        Worker.seen = 0
        client.send(chat("drop-once"))
        assert (await client.answer())[0] == 200
        # Closed after the head: nothing can be retried.
        client.send(chat("cut"))
        status, _, body = await client.answer()
        assert status == 502
        assert "failed while answering" in json.loads(body)["error"]["message"]
        # Closed every time: the awaited path's own error.
        client.send(chat("drop"))
        status, _, body = await client.answer()
        assert status == 502 and "unreachable" in json.loads(body)["error"]["message"]
        client.send(chat())
        assert (await client.answer())[0] == 200

    serve(test)


def test_a_busy_model_queues_requests_in_order(serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        # One request at the worker at a time: the second waits for the first's slot.
        other = Client(GatewayProtocol(client.protocol.config, state, {},
                                       asyncio.get_running_loop()))
        client.send(chat("slow"))
        assert not state.tasks
        other.send(chat())
        assert len(state.tasks) == 1  # waiting for a slot
        first, second = await asyncio.gather(client.answer(), other.answer())
        assert first[0] == second[0] == 200
        other.protocol.connection_lost(None)

    serve(test, max_concurrency=1, max_queue=4)


def test_large_answers_arrive_whole_and_free_the_slot(serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        registry = app.hot_routes[b"/v1/chat/completions"].endpoint.registry
        admission = registry.models["m"].admission
        # Up to 256 KiB, collected and answered from callbacks: no task.
        client.send(chat("big", size=200 * 1024))
        assert not state.tasks
        status, headers, body = await client.answer()
        assert status == 200 and body == big(200 * 1024)
        # Larger: passed on as it arrives (length declared), or collected and sent in pieces.
        for mode in ("big", "big-chunked", "big", "big-chunked"):
            client.send(chat(mode, size=3 * 1024 * 1024 + 5))
            status, headers, body = await client.answer()
            assert status == 200 and body == big(3 * 1024 * 1024 + 5), mode
            assert headers[b"content-length"] == str(3 * 1024 * 1024 + 5).encode()
            assert admission.active == 0
        # A client that leaves before a large answer's head: the slot is freed all the same.
        client.send(chat("big-late", size=3 * 1024 * 1024))
        await asyncio.sleep(0.05)
        client.protocol.connection_lost(None)
        for _ in range(100):
            if admission.active == 0:
                break
            await asyncio.sleep(0.02)
        assert admission.active == 0

    serve(test, max_concurrency=1)


def test_a_client_that_leaves_a_request_followed_from_callbacks_stops_the_worker(
        serve: Serve) -> None:
    async def test(app: Front, client: Client, state: ServerState) -> None:
        admission = app.hot_routes[b"/v1/chat/completions"].endpoint.registry.models["m"].admission
        lost = Worker.lost
        client.send(chat("never"))
        assert not state.tasks and admission.active == 1
        client.protocol.connection_lost(None)
        for _ in range(150):  # the sweeper looks about once a second
            if admission.active == 0 and Worker.lost > lost:
                break
            await asyncio.sleep(0.02)
        assert admission.active == 0 and Worker.lost > lost
        assert not state.tasks  # not served again the awaited way

    serve(test, max_concurrency=1)
