"""Answers and bodies on the request path, without Starlette objects: a complete answer
(sent with two ASGI messages, or as one buffer by the wire path), the error answer of the one
exception tree (`modelhost.errors`), the last-resort 500, and a request body read with a bound.

The /v1 relayed routes run on these alone (`endpoint.py`); a call's answers are these too, so
that Starlette routes (audio) can return them unchanged: Starlette calls whatever a route
returns as an ASGI app.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from modelhost.errors import ModelhostError, RequestTooLarge, error_body

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its request was read."""


class Answer:
    """A complete (not streamed) answer. Its first header is its content type, the only one
    that may come from elsewhere (a worker's answer); the others are the gateway's own (the
    wire path writes them unchecked: `wire.HotCycle.answer`)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes, status: int = 200,
                 content_type: bytes = b"application/json",
                 headers: Mapping[str, str] | None = None) -> None:
        self.body = body
        self.status = status
        self.headers = [(b"content-type", content_type),
                        (b"content-length", str(len(body)).encode())]
        if headers:
            self.headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                             for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def json_answer(data: Any, status: int = 200,
                headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(json.dumps(data).encode(), status, headers=headers)


def error_answer(exc: ModelhostError, headers: Mapping[str, str] | None = None) -> Answer:
    return json_answer(exc.body(), exc.status, {**exc.headers(), **(headers or {})})


def last_resort() -> Answer:
    """The answer to a request that failed in a way nothing else handled: a 500 in the OpenAI
    shape, the same on every path (the exception is logged by whoever caught it)."""
    return json_answer(error_body("The gateway failed to process the request.",
                                  "server_error"), 500)


def unexpected_answer(scope: Scope) -> Answer:
    """Log the exception being handled and give the last-resort answer."""
    log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
    return last_resort()


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def too_large(limit: int, declared: int | None = None) -> RequestTooLarge:
    """The 413 for a body past `limit` bytes (`declared`: what Content-Length said)."""
    if declared is not None and declared > limit:
        return RequestTooLarge(f"Request body of {declared} bytes exceeds the limit of "
                               f"{limit} bytes.")
    return RequestTooLarge(f"Request body exceeds the limit of {limit} bytes.")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes, whatever Content-Length says."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit, int(declared))
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise too_large(limit)
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
