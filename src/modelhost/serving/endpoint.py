"""A relayed JSON route (chat, completions, embeddings): the request checked, its model
resolved, and one `call.Call` to answer it.

`RelayEndpoint` is what both ways of serving drive (docs/architecture.md):

- the ASGI path calls it as an ASGI app (`__call__`): the body is read with a bound, then
  `answer()` gives an ASGI app (a complete answer or a stream) that is called with the
  client's connection;
- the wire path (`wire.HotRelay`) has the body already: it tries `start()` (a call followed
  from callbacks, no task) and otherwise awaits `answer()` too.

Usage (`modelhost.usage`): the call is counted under the key id of the client's
Authorization header; an embeddings request's inputs are counted from the parsed payload; a
streamed chat or completions request whose client did not ask for the final usage chunk
(`stream_options.include_usage`) is sent to the worker asking for it (the member spliced into
the body, no re-encoding), and that chunk is read and dropped from the client's stream.

Every error is answered here, in the OpenAI shape (`settle`): the gateway's own
(`ModelhostError`), a model's lifecycle (`LifecycleError`, mapped by the API layer), and the
last resort for anything unexpected (a 500, logged), the same on both paths.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from modelhost.api import requests as req
from modelhost.api.lifecycle import http_error
from modelhost.config import ModelSpec, Task, UrlSource
from modelhost.errors import InvalidRequest, ModelhostError, Overloaded
from modelhost.logs import request_id as bound_request_id
from modelhost.registry.errors import (
    Downloading,
    LifecycleError,
    ModelFailed,
    NotDownloaded,
    NotReadyYet,
    UnloadedWhileLoading,
)
from modelhost.registry.registry import Registry
from modelhost.requestid import from_headers
from modelhost.serving.answers import (
    Answer,
    ClientGone,
    error_answer,
    read_body,
    unexpected_answer,
)
from modelhost.serving.call import DROP_USAGE, KEEP_USAGE, Call, Gone, Relay, Reply
from modelhost.serving.stream import RelayStream

Check = Callable[[dict[str, Any]], None]


class RelayEndpoint:
    """One relayed JSON route: POST `route` (under /v1) relayed to `path` on the worker of a
    model whose task is one of `tasks`, after `check` (api/requests.py) accepted the body."""

    def __init__(self, registry: Registry, relay: Relay, max_request_bytes: int, path: str,
                 check: Check, tasks: set[Task]) -> None:
        self.registry = registry
        self.relay = relay
        self.max_request_bytes = max_request_bytes
        self.path = path
        self.check = check
        self.tasks = tasks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = from_headers(scope["headers"])
        bound_request_id.set(request_id)  # the request's task: its lines
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value  # the first, as the gate judged it
                break
        try:
            body = await read_body(scope, receive, self.max_request_bytes)
        except ModelhostError as exc:
            answer: Answer | RelayStream = error_answer(exc, _id_header(request_id))
        except ClientGone:
            return
        else:
            answer = await self.answer(body, scope, None, request_id, authorization)
        await answer(scope, receive, send)

    async def answer(self, body: bytes, scope: Scope, gone: Gone | None = None,
                     request_id: bytes = b"", authorization: bytes | None = None
                     ) -> Answer | RelayStream:
        """The answer to a request whose body is `body`, errors included (`gone`: whether
        the client has left, see `Call.answer`)."""
        try:
            call = self.call(body, request_id, authorization)
        except ModelhostError as exc:
            return error_answer(exc, _id_header(request_id))
        except Exception:
            return unexpected_answer(scope)
        return await self.settle(lambda: call.answer(gone), scope, call)

    def start(self, body: bytes, reply: Reply, request_id: bytes = b"",
              authorization: bytes | None = None) -> bool:
        """Serve the request from callbacks if nothing has to be waited for (`Call.start`);
        False, with nothing sent, when it must be awaited (`answer`). An invalid request is
        answered here."""
        try:
            call = self.call(body, request_id, authorization)
        except ModelhostError as exc:
            reply.send(error_answer(exc, _id_header(request_id)))
            return True
        except Exception:
            return False  # `answer` meets it again, and logs it
        return call.start(reply)

    @staticmethod
    async def settle(step: Callable[[], Awaitable[Answer | RelayStream]], scope: Scope,
                     call: Call) -> Answer | RelayStream:
        """What `step` answers, or the error answer for what it raised (counted as the
        call's end)."""
        try:
            return await step()
        except ModelhostError as exc:
            error = exc
            if isinstance(exc, Overloaded):
                call.rejected("queue_full")
        except LifecycleError as exc:
            error = http_error(exc)
            call.rejected(REJECTIONS.get(type(exc), "not_ready"))
        except Exception:
            answer = unexpected_answer(scope)
            call.counted(500)
            return answer
        call.counted(error.status)
        return error_answer(error, call.id_header())

    def call(self, body: bytes, request_id: bytes = b"", authorization: bytes | None = None
             ) -> Call:
        """Check the request and resolve its model: the call that relays it (its usage
        counted under `authorization`'s key id)."""
        payload = req.parse_json(body)
        name = req.require_model(payload)
        spec = self.registry.resolve(name)
        if spec.task not in self.tasks:
            raise InvalidRequest(
                f"model '{spec.id}' is a {spec.task.value} model and does not serve "
                f"{self.path}", param="model", code="model_not_supported")
        self.check(payload)
        scan = 0
        if payload.get("stream") is True:
            scan, body = _stream_usage(payload, body)
        body, headers = _for_worker(spec, name, payload, body)
        call = self.relay.call(self.registry.models[spec.id], self.path, body, headers,
                               request_id, authorization)
        call.scan = scan
        if self.path == "/embeddings":
            given = payload.get("input")
            call.inputs = len(given) if isinstance(given, list) and given and not \
                isinstance(given[0], int) else 1
        return call


# Why a lifecycle error refused a request (`modelhost_rejections_total`'s reason).
REJECTIONS: dict[type[LifecycleError], str] = {
    ModelFailed: "failed", NotDownloaded: "not_downloaded", Downloading: "downloading",
    NotReadyYet: "not_ready", UnloadedWhileLoading: "not_ready"}


def _id_header(request_id: bytes) -> dict[str, str] | None:
    return {"x-request-id": request_id.decode("latin-1")} if request_id else None


def _stream_usage(payload: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    """How a stream's usage is read (`Call.scan`), and the body asking the worker for it
    when the client did not (`payload` changed too, for a body re-encoded later)."""
    if "stream_options" not in payload:
        payload["stream_options"] = {"include_usage": True}
        body = body.lstrip()  # a JSON object (parse_json): the member goes in first
        if body.startswith(b"{"):  # (not after a byte order mark, which json.loads takes)
            return DROP_USAGE, b'{"stream_options":{"include_usage":true},' + body[1:]
        return DROP_USAGE, json.dumps(payload).encode()
    options = payload["stream_options"]
    if options is None:  # an explicit null: asked for nothing, given usage re-encoded
        payload["stream_options"] = {"include_usage": True}
        return DROP_USAGE, json.dumps(payload).encode()
    if not isinstance(options, dict):
        return KEEP_USAGE, body  # the worker refuses it
    if options.get("include_usage") is True:
        return KEEP_USAGE, body
    payload["stream_options"] = {**options, "include_usage": True}
    return DROP_USAGE, json.dumps(payload).encode()


def _for_worker(spec: ModelSpec, name: str, payload: dict[str, Any], body: bytes
                ) -> tuple[bytes, dict[str, str]]:
    """The body and headers the worker gets: the worker knows the model by its id (or its
    remote name), not an alias; a remote server gets its key."""
    source = spec.source if isinstance(spec.source, UrlSource) else None
    upstream_name = source.model if source is not None and source.model else spec.id
    if name != upstream_name:
        payload["model"] = upstream_name
        body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if source is not None and source.api_key:
        headers["Authorization"] = f"Bearer {source.api_key}"
    return body, headers
