"""An OpenAI-compatible upstream that answers as large, as slowly or as badly as a test asks:
a real process on loopback, usable as a `remote` model's server or as a `command` worker.

    python tests/big_upstream.py --port PORT [--events FILE]

A POST (any path) carries a `big` object that steers its answer:
    size (int, 64)            the body's length in bytes: `payload(size)`, byte for byte
    chunked (bool)            sent with Transfer-Encoding: chunked, not Content-Length
    delay (float)             seconds before the answer's head
    gap (float)               seconds between 64 KiB pieces of the body (a slow talker)
    stall_after (int)         send this many body bytes, then nothing (a silent worker)
    crash_after (int)         send this many body bytes, then the process exits (os._exit)
    drop_after (int)          send this many body bytes, then close the connection
    status (int)              answer with this status and an OpenAI error body
    events (int)              a stream: this many SSE events of `size` bytes each, `gap`
                              seconds apart (also when the request says "stream": true)
GET /v1/models answers a model list (so a `remote` model comes up). With --events, lines
"request", "completed" and "aborted" (the client went away before the end) are appended to
FILE, so that a test can see that the gateway stopped reading.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

PIECE = 64 * 1024
events_file: str | None = None


def payload(size: int) -> bytes:
    """The body of a `size`-byte answer: a chat completion padded to exactly `size` bytes (a
    JSON number of `size` digits below 200 bytes)."""
    if size < 200:
        return b"7" * size
    head = b'{"id":"chatcmpl-big","object":"chat.completion","model":"big","choices":[' \
           b'{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"'
    tail = b'"}}]}'
    filler = size - len(head) - len(tail)
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyz" * 8
    body = (pattern * (filler // len(pattern) + 1))[:filler]
    return head + body + tail


def many_choices(n: int, size: int) -> bytes:
    """An `n > 1`-style answer: `n` choices of `size` bytes of content each."""
    text = ("lorem ipsum " * (size // 12 + 1))[:size]
    return json.dumps({
        "id": "chatcmpl-n", "object": "chat.completion", "model": "big",
        "choices": [{"index": i, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": f"{i}:{text}"}}
                    for i in range(n)],
        "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}).encode()


def record(event: str) -> None:
    if events_file:
        with open(events_file, "a") as f:
            f.write(event + "\n")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].split()[:2]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            if method == b"GET":
                await answer(writer, 200, json.dumps({"object": "list", "data": [
                    {"id": "big", "object": "model", "created": 1, "owned_by": "t"}]}).encode())
                continue
            record("request")
            request: dict[str, Any] = json.loads(body) if body else {}
            outcome = await respond(writer, request, path)
            if outcome == "stall":  # silent until the client goes away
                await reader.read()
                record("aborted")
            if outcome != "keep":
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def answer(writer: asyncio.StreamWriter, status: int, body: bytes,
                 content_type: bytes = b"application/json") -> None:
    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                 % (status, content_type, len(body)) + body)
    await writer.drain()


async def respond(writer: asyncio.StreamWriter, request: dict[str, Any], path: bytes) -> str:
    """Answer one request: "keep" (the connection goes on), "close" or "stall"."""
    big: dict[str, Any] = request.get("big") or {}
    await asyncio.sleep(float(big.get("delay", 0)))
    if "status" in big:
        await answer(writer, int(big["status"]), json.dumps({"error": {
            "message": f"big error {big['status']}", "type": "server_error", "param": None,
            "code": None}}).encode())
        record("completed")
        return "keep"
    gap = float(big.get("gap", 0))
    if "events" in big or request.get("stream"):
        return await stream(writer, int(big.get("events", 3)), int(big.get("size", 64)), gap)
    if "n" in big:
        body = many_choices(int(big["n"]), int(big.get("size", 1024)))
    elif path.endswith(b"/embeddings"):
        body = json.dumps({"object": "list", "data": [{"object": "embedding", "index": 0,
                                                       "embedding": [0.5] * 8}]}).encode()
    else:
        body = payload(int(big.get("size", 64)))
    chunked = bool(big.get("chunked"))
    cut = min((int(big[k]) for k in ("stall_after", "crash_after", "drop_after") if k in big),
              default=len(body))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + (
        b"Transfer-Encoding: chunked\r\n\r\n" if chunked
        else b"Content-Length: %d\r\n\r\n" % len(body)))
    sent = 0
    while sent < cut:
        piece = body[sent:min(cut, sent + (PIECE if gap or chunked else cut))]
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        sent += len(piece)
        try:
            await writer.drain()
        except ConnectionError:
            record("aborted")
            return "close"
        if gap:
            await asyncio.sleep(gap)
    if "crash_after" in big:
        os._exit(17)
    if "drop_after" in big:
        writer.transport.abort()
        return "close"
    if "stall_after" in big:
        return "stall"
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    record("completed")
    return "keep"


async def stream(writer: asyncio.StreamWriter, count: int, size: int, gap: float) -> str:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    event = b"data: " + b"x" * max(0, size - 8) + b"\n\n"
    try:
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(gap)
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        record("aborted")
        return "close"
    record("completed")
    return "keep"


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, limit=1 << 20)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--events")
    args = parser.parse_args()
    global events_file
    events_file = args.events
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
