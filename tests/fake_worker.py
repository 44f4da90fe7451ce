"""A small OpenAI-compatible worker for relay and fault tests: a real process on loopback.

    python tests/fake_worker.py --port PORT [--startup-delay S] [--exit-at-start CODE]
                                [--events FILE]

Each request may carry a `fake` object to steer it:
    tokens (int, 3)            chunks/words in the answer
    first_token_delay (float)  seconds before the first chunk
    gap (float)                seconds between chunks
    crash_after (int)          the process exits (os._exit) after sending this many chunks
    status (int)               answer with this HTTP status and an OpenAI error body
    end_delay (float)          seconds between a stream's `data: [DONE]` and its end
GET /stats reports requests, completed and cancelled streams (a client that went away);
with --events, the same happenings are appended to FILE as lines ("started PID", "request",
"completed", "cancelled"), so a test can watch a worker it cannot address.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from typing import Any

from aiohttp import web

stats = {"requests": 0, "completed": 0, "cancelled": 0}
events_file: str | None = None


def record(event: str) -> None:
    if event in stats:
        stats[event] += 1
    if events_file:
        with open(events_file, "a") as f:
            f.write(event + "\n")


def _chunk(model: str, i: int, content: str | None, finish: str | None) -> bytes:
    delta: dict[str, Any] = {"content": content} if content is not None else {}
    if i == 0:
        delta["role"] = "assistant"
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    record("requests")
    record(f"request-id {request.headers.get('X-Request-ID', '-')}")
    payload = await request.json()
    record(f"stream_options {json.dumps(payload.get('stream_options'))}")
    fake = payload.get("fake") or {}
    model = payload.get("model", "fake")
    if "status" in fake:
        return web.json_response({"error": {"message": f"fake error {fake['status']}",
                                            "type": "invalid_request_error", "param": None,
                                            "code": None}}, status=int(fake["status"]))
    tokens = int(fake.get("tokens", 3))
    words = [f"word{i}" for i in range(tokens)]
    await asyncio.sleep(float(fake.get("first_token_delay", 0)))
    if not payload.get("stream"):
        record("completed")
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": " ".join(words)}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                      "total_tokens": tokens + 1}})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i, word in enumerate(words):
            if "crash_after" in fake and i >= int(fake["crash_after"]):
                os._exit(17)
            await resp.write(_chunk(model, i, word + " ", None))
            await asyncio.sleep(float(fake.get("gap", 0)))
        await resp.write(_chunk(model, tokens, None, "stop"))
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            # OpenAI's final usage chunk: no choices; split in two writes, as a worker may.
            usage = json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                "created": 1, "model": model, "choices": [], "usage": {
                                    "prompt_tokens": 1, "completion_tokens": tokens,
                                    "total_tokens": tokens + 1}}).encode()
            await resp.write(b"data: " + usage[:20])
            await resp.write(usage[20:] + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        # A worker that ends its answer a while after its last event (as a loaded one may).
        await asyncio.sleep(float(fake.get("end_delay", 0)))
    except (ConnectionResetError, asyncio.CancelledError):
        record("cancelled")
        raise
    record("completed")
    return resp


async def completions(request: web.Request) -> web.Response:
    record("requests")
    payload = await request.json()
    record("completed")
    return web.json_response({
        "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
        "model": payload.get("model", "fake"),
        "choices": [{"index": 0, "text": " fake", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


async def embeddings(request: web.Request) -> web.Response:
    """One vector per input (`dimensions` numbers, 2 by default); usage: 2 tokens per input
    (and X-Input-Tokens, as our embeddings worker sends, unless `fake.no_header`)."""
    record("requests")
    payload = await request.json()
    given = payload.get("input")
    inputs = given if isinstance(given, list) and given and not isinstance(given[0], int) \
        else [given]
    record("completed")
    return web.json_response(
        {"object": "list", "model": payload.get("model", "fake"),
         "data": [{"object": "embedding", "index": i,
                   "embedding": [0.5] * int(payload.get("dimensions", 2))}
                  for i in range(len(inputs))],
         "usage": {"prompt_tokens": 2 * len(inputs), "total_tokens": 2 * len(inputs)}},
        headers={} if (payload.get("fake") or {}).get("no_header")
        else {"X-Input-Tokens": str(2 * len(inputs))})


async def audio(request: web.Request) -> web.Response:
    """Echo what arrived, so a test can check the gateway relayed the upload byte for byte."""
    record("requests")
    raw = await request.read()
    record("completed")
    return web.json_response(
        {"text": "fake transcript", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
         "content_type": request.headers.get("Content-Type", "")},
        headers={"X-Audio-Seconds": "1.5"})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": "fake", "object": "model", "created": 1, "owned_by": "fake"}]})


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response({**stats, "pid": os.getpid()})


def _require_key(key: str) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": {"message": "bad key", "type": "auth",
                                                "param": None, "code": None}}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    return check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--startup-delay", type=float, default=0)
    parser.add_argument("--exit-at-start", type=int)
    parser.add_argument("--events")
    parser.add_argument("--api-key", help="require this bearer key on every request")
    args = parser.parse_args()
    global events_file
    events_file = args.events
    record(f"started {os.getpid()}")
    print(f"fake worker starting on {args.host}:{args.port}", flush=True)
    if args.exit_at_start is not None:
        print("fake worker: exiting at start as asked", flush=True)
        sys.exit(args.exit_at_start)
    time.sleep(args.startup_delay)
    middlewares = [_require_key(args.api_key)] if args.api_key else []
    app = web.Application(middlewares=middlewares)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/audio/transcriptions", audio)
    app.router.add_post("/v1/audio/translations", audio)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", get_stats)
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
