"""A fake OpenAI-compatible upstream for the benchmarks: a real process, fast enough never to be
the bottleneck (raw asyncio protocol, httptools parser, uvloop, pre-encoded answers).

    python -m bench.upstream --port PORT [--ttft S] [--tokens N] [--gap S] [--size BYTES]

The flags set the defaults. The `model` name of a request may override them, so that every
gateway in front (which rewrites or forwards the model name, never unknown fields) can steer
it: the name is split on `-` and each part `ttft<ms>`, `gap<ms>`, `n<tokens>`, `size<bytes>`
sets that value, e.g. `st-ttft50-gap10-n64`. Other parts are ignored.

    POST /v1/chat/completions   `stream: true` answers with server-sent events, one event per
                                token (each in its own HTTP chunk, each written separately);
                                otherwise one JSON answer whose content has `size` bytes
    GET  /v1/models, /health    readiness probes
    GET  /stats                 requests served and open streams
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import signal
import time
from dataclasses import dataclass, replace
from typing import Any, cast

import httptools

from .aio import run

PART = re.compile(r"^(ttft|gap|n|size)(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Profile:
    ttft: float = 0.0  # seconds before the first token (or before the whole answer)
    tokens: int = 16  # tokens (stream events) in a streamed answer
    gap: float = 0.0  # seconds between two streamed tokens
    size: int = 512  # bytes of content in a non-streamed answer


def parse_profile(model: str, default: Profile) -> Profile:
    fields: dict[str, Any] = {}
    for part in model.split("-"):
        match = PART.match(part)
        if match is None:
            continue
        key, value = match.group(1), float(match.group(2))
        if key == "ttft":
            fields["ttft"] = value / 1000
        elif key == "gap":
            fields["gap"] = value / 1000
        elif key == "n":
            fields["tokens"] = int(value)
        else:
            fields["size"] = int(value)
    return replace(default, **fields)


class Answers:
    """Pre-encoded answers, per model name: the hot path only looks them up."""

    def __init__(self, default: Profile) -> None:
        self.default = default
        self._plain: dict[str, bytes] = {}
        self._profiles: dict[str, Profile] = {}
        self._stream: dict[str, tuple[Profile, list[bytes]]] = {}

    def profile(self, model: str) -> Profile:
        profile = self._profiles.get(model)
        if profile is None:
            profile = self._profiles[model] = parse_profile(model, self.default)
        return profile

    def plain(self, model: str) -> bytes:
        answer = self._plain.get(model)
        if answer is None:
            profile = self.profile(model)
            words = ("lorem ipsum dolor sit amet " * (profile.size // 27 + 1))[:profile.size]
            body = json.dumps({
                "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": words}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": max(1, profile.size // 4),
                          "total_tokens": 12 + max(1, profile.size // 4)},
            }, separators=(",", ":")).encode()
            answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                      b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self._plain[model] = answer
        return answer

    def stream(self, model: str) -> tuple[Profile, list[bytes]]:
        found = self._stream.get(model)
        if found is None:
            profile = self.profile(model)
            events = [_event(model, i, f"tok{i} ", None) for i in range(profile.tokens)]
            events.append(_event(model, profile.tokens, None, "stop"))
            events.append(b"data: [DONE]\n\n")
            found = (profile, [_chunk(e) for e in events])
            self._stream[model] = found
        return found


def _event(model: str, i: int, content: str | None, finish: str | None) -> bytes:
    delta: dict[str, Any] = {"content": content} if content is not None else {}
    if i == 0:
        delta["role"] = "assistant"
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
               b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
MODELS = json.dumps({"object": "list", "data": [
    {"id": "bench", "object": "model", "created": 1700000000, "owned_by": "bench"}]}).encode()


def _json_response(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class Stats:
    requests = 0
    streams_open = 0
    streams_done = 0
    streams_cancelled = 0


class Upstream(asyncio.Protocol):
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.busy: asyncio.Task[None] | None = None
        self.pending: list[tuple[bytes, bytes, bytes]] = []

    # -- transport -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_json_response(b'{"error":"bad request"}', "400 Bad Request"))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None and not self.busy.done():
            self.busy.cancel()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        request = (method, self.url, b"".join(self.body))
        if self.busy is not None and not self.busy.done():
            self.pending.append(request)  # a pipelined request waits for the stream before it
        else:
            self.handle(*request)

    # -- answers -------------------------------------------------------------------------

    def handle(self, method: bytes, url: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        path = url.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            Stats.requests += 1
            try:
                payload = json.loads(body)
                model = str(payload.get("model", "bench"))
                stream = bool(payload.get("stream"))
            except (ValueError, AttributeError):
                transport.write(_json_response(b'{"error":{"message":"bad json"}}',
                                               "400 Bad Request"))
                return
            if stream:
                self.busy = asyncio.get_running_loop().create_task(self.stream(model))
                return
            profile = self.answers.profile(model)
            if profile.ttft > 0:
                self.busy = asyncio.get_running_loop().create_task(
                    self.delayed(profile.ttft, self.answers.plain(model)))
                return
            transport.write(self.answers.plain(model))
        elif method == b"GET" and path in (b"/v1/models", b"/models", b"/health"):
            transport.write(_json_response(MODELS))
        elif method == b"GET" and path == b"/stats":
            transport.write(_json_response(json.dumps({
                "requests": Stats.requests, "streams_open": Stats.streams_open,
                "streams_done": Stats.streams_done,
                "streams_cancelled": Stats.streams_cancelled, "pid": os.getpid()}).encode()))
        else:
            transport.write(_json_response(b'{"error":{"message":"not found"}}',
                                           "404 Not Found"))

    async def delayed(self, delay: float, answer: bytes) -> None:
        await asyncio.sleep(delay)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)
        self._next()

    async def stream(self, model: str) -> None:
        profile, chunks = self.answers.stream(model)
        transport = self.transport
        assert transport is not None
        Stats.streams_open += 1
        try:
            transport.write(STREAM_HEAD)
            if profile.ttft > 0:
                await asyncio.sleep(profile.ttft)
            for i, chunk in enumerate(chunks):
                if transport.is_closing():
                    Stats.streams_cancelled += 1
                    return
                transport.write(chunk)
                if i < profile.tokens - 1:  # the finish event and [DONE] follow the last token
                    # Always yield, so that each event leaves in its own write.
                    await asyncio.sleep(profile.gap)
            transport.write(b"0\r\n\r\n")
            Stats.streams_done += 1
        except asyncio.CancelledError:
            Stats.streams_cancelled += 1
            raise
        finally:
            Stats.streams_open -= 1
        self._next()

    def _next(self) -> None:
        self.busy = None
        if self.pending:
            self.handle(*self.pending.pop(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to first token")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in a streamed answer")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--size", type=int, default=512,
                        help="content bytes of a non-streamed answer")
    args = parser.parse_args()
    # Any loopback address: the `ray` part's worker listens on its node's, 127.0.0.3.
    if args.host != "localhost" and not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the benchmark upstream only listens on loopback")
    default = Profile(ttft=args.ttft, tokens=args.tokens, gap=args.gap, size=args.size)
    run(serve(args.host, args.port, Answers(default)))


async def serve(host: str, port: int, answers: Answers) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Upstream(answers), host, port, backlog=4096,
                                      reuse_address=True)
    print(f"bench upstream listening on {host}:{port} (pid {os.getpid()}, "
          f"started {time.strftime('%H:%M:%S')})", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    main()
