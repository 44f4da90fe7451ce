"""The request path's last leg: relay bytes to the worker and back.

The body goes to the worker as the client sent it (re-encoded only when the client used an
alias). A streamed answer is passed through chunk by chunk as it arrives, never buffered or
re-encoded. A client that disconnects closes the upstream connection, which makes the worker
stop generating. Failures become OpenAI-shaped errors: before the stream starts, an error
response (502 when the worker failed); after, a final `data: {"error": ...}` event.

`forward` awaits each step. `start` is the same relay for the common case without a task: when
nothing has to be waited for, the request is sent at once and the answer followed from the
worker connection's callbacks (`Exchange`), falling back to the awaited steps for anything
else.

Sizes and deadlines (docs/operations.md, "Answers, sizes and deadlines"):

- a non-streamed answer is relayed whole, whatever its size, up to `max_answer_bytes`; past
  it the worker connection is aborted and the client gets a 502 naming the limit. One whose
  declared length is over 256 KiB is passed on as it arrives (`RelayStream`, with back-pressure:
  never held whole); a smaller one, or one of undeclared length, is collected first (a large
  one is then sent in the pieces it came in, never joined). Streams are not capped: they are
  relayed as they arrive, with back-pressure.
- a non-streamed request must be answered within `request_timeout` of being sent (504); a
  worker silent for `idle_timeout` is given up on (504 before a stream starts, an error event
  after). A stream is bounded by the idle timeout alone. The upstream client's single timer
  checks both for every connection: nothing per request.
- the model's admission slot is released however the exchange ends.
- what a client is told names no internal address: the detail (the worker's address, the
  exception) goes to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from starlette.types import Receive, Scope, Send

from modelhost.asgi import Answer, error_answer
from modelhost.errors import (
    InvalidRequest,
    ModelhostError,
    UpstreamError,
    sse_error_event,
)
from modelhost.registry.model import Model
from modelhost.upstream import (
    Abandoned,
    AnswerTooLarge,
    Body,
    Multipart,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

# A non-streamed answer whose declared length is past this is relayed as it arrives
# (`RelayStream`); one of undeclared length is collected (up to the cap), then sent in one
# write if it is no larger, or else in the pieces it arrived in (never joined).
RELAY_AS_IT_COMES = 256 * 1024
ERROR_BODY_LIMIT = 1024 * 1024  # an error answer's body is read up to this (for its message)
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class Relay:
    def __init__(self, load_wait_timeout: float, max_answer_bytes: int = 64 * 1024 * 1024,
                 request_timeout: float = 900.0, idle_timeout: float = 600.0) -> None:
        self.load_wait_timeout = load_wait_timeout
        self.max_answer_bytes = max_answer_bytes
        # The deadlines are the client's: its one sweeper checks every exchange.
        self.client = UpstreamClient(idle_timeout=idle_timeout, request_timeout=request_timeout)

    async def close(self) -> None:
        self.client.close()

    async def forward(self, model: Model, path: str,
                      body: Body, headers: dict[str, str],
                      gone: Callable[[], bool] | None = None) -> Answer | RelayStream:
        """Send `body` (bytes, or a spooled file streamed from disk) to the model's worker at
        `path` (below /v1) and relay the answer: an ASGI app to call with the client's
        connection. `gone` says whether the client has left (the hot path knows): then a
        request that waited for its slot or its model is not sent, and one awaiting its
        answer is given up within a second (the worker's connection aborted, so it stops),
        freeing the slot either way."""
        await model.admission.acquire()
        try:
            if gone is not None and gone():
                raise ClientLeft(model)
            resp = await self._send(model, path, body, headers, gone)
        except BaseException:
            model.release()
            raise
        return await self.finish(model, resp)

    async def finish(self, model: Model, resp: UpstreamResponse,
                     content_type: str | None = None, length: int = -1
                     ) -> Answer | RelayStream:
        """Relay an answer whose head is in (`content_type` and its declared `length`, -1 for
        none, when its usage was counted already); the admission slot is released when it
        ends."""
        released = False
        try:
            if resp.status >= 400:
                raise await _upstream_failure(model, resp)
            if content_type is None:
                content_type, length = _content_type_and_usage(model, resp)
            if content_type.startswith("text/event-stream"):
                released = True  # the stream releases the slot when it ends
                resp.abandoned = None  # RelayStream watches the client itself
                return RelayStream(model, resp, content_type)
            if length > self.max_answer_bytes:
                resp.close()
                raise _failed_while_answering(model, AnswerTooLarge(self.max_answer_bytes))
            if length <= RELAY_AS_IT_COMES:
                try:
                    length = await resp.complete(self.max_answer_bytes)
                except OSError as exc:
                    resp.close()
                    raise _failed_while_answering(model, exc) from exc
            if length > RELAY_AS_IT_COMES:
                # Passed on as it arrives; or, collected, sent in the pieces it came in.
                released = True
                resp.abandoned = None
                return RelayStream(model, resp, content_type, length)
            data = resp.take_body()
            resp.release()
            return Answer(data, resp.status, content_type.encode("latin-1"))
        finally:
            if not released:
                model.release()

    def start(self, model: Model, path: str, body: bytes,
              headers: Mapping[str, str], reply: Reply) -> bool:
        """`forward` without a task, for when nothing has to be waited for: the model is
        ready, a slot is free and an idle connection to its worker is pooled. The request is
        sent now and a complete answer goes to `reply.send` from the connection's callbacks
        (`Exchange`). False, with nothing sent, when something is missing: then the caller
        goes the async way (`forward`)."""
        base = model.ready_upstream()
        if base is None or not model.admission.try_acquire():
            return False
        exchange = Exchange(self, model, reply)
        resp = self.client.start(base, "POST", path, headers, body, exchange,
                                 self.max_answer_bytes)
        if resp is None:
            model.admission.release()
            return False
        resp.abandoned = reply.gone  # a client that leaves frees the slot within a second
        return True

    async def fetch_json(self, model: Model, path: str,
                         form: Multipart) -> Any:
        """Post a form the gateway built to the model's worker and return its JSON answer
        (for requests the gateway composes, such as diarized transcripts)."""
        await model.admission.acquire()
        try:
            resp = await self._send(model, path, form, {"Content-Type": form.content_type})
            if resp.status >= 400:
                raise await _upstream_failure(model, resp)
            try:
                data = json.loads(await resp.read(self.max_answer_bytes))
            except OSError as exc:
                raise _failed_while_answering(model, exc) from exc
            except ValueError as exc:
                raise UpstreamError(f"worker of '{model.spec.id}' gave no JSON answer: "
                                    f"{_describe(exc)}") from exc
            _content_type_and_usage(model, resp)
            return data
        finally:
            model.release()

    async def _send(self, model: Model, path: str, body: Body,
                    headers: Mapping[str, str], gone: Callable[[], bool] | None = None
                    ) -> UpstreamResponse:
        for attempt in (1, 2):
            base = await model.ensure_ready(self.load_wait_timeout)
            if gone is not None and gone():  # left while its model was loading
                raise ClientLeft(model)
            try:
                return await self.client.request(base, "POST", path, headers, body,
                                                 connect_to=model.connect_to,
                                                 abandoned=gone)
            except UpstreamTimeout as exc:
                raise _timed_out(model, exc) from exc
            except Abandoned as exc:
                raise ClientLeft(model) from exc
            except OSError as exc:
                # A worker killed between requests refuses the connection (or drops a pooled
                # one). Nothing was generated, so once its restart is under way, retry once.
                if attempt == 1 and await model.worker_lost(base):
                    log.warning("model %s: worker gone (%s); retrying after its restart",
                                model.spec.id, _describe(exc))
                    continue
                # The detail (an address, a system error) is the operator's, not the client's.
                log.warning("model %s: worker at %s unreachable: %s", model.spec.id,
                            _address(base), _describe(exc))
                raise UpstreamError(f"worker of '{model.spec.id}' unreachable") from exc
        raise AssertionError("unreachable")


class Reply(Protocol):
    """Where an `Exchange` delivers its answer: the client's connection."""

    def send(self, answer: Answer) -> None:
        """Send a complete answer now."""

    def gone(self) -> bool:
        """Whether the client has disconnected (asked about once a second while the answer
        is awaited)."""

    def resume(self, step: Callable[[], Awaitable[Answer | RelayStream]] | None) -> None:
        """Go on in a task: await `step` and send what it gives (its errors answered as the
        async path answers them); with None, serve the whole request again the async way."""


class Exchange:
    """One answer relayed from the worker connection's callbacks (`upstream.Listener`), for a
    request `Relay.start` sent. The common case, a complete JSON answer, costs no task, no
    future and no await: when its last byte is in, it is sent to the client. Anything else
    goes on the async path through `reply.resume`, with what was received so far:

    - an error status, or a stream, as soon as the head is in (`Relay.finish` /
      `RelayStream`);
    - a failure before the head (the pooled connection had been closed, or the worker died):
      the whole request again, which retries and waits for a restart as `forward` does;
    - a timeout (504), an answer past `max_answer_bytes` or a failure after the head (502):
      answered as `forward` answers them.

    A head that declares a length over 256 KiB goes on the async path too (`RelayStream`
    passes it on as it arrives). Otherwise the body is collected whole (up to
    `max_answer_bytes`): reading from the worker never pauses on this path, since nothing but
    the end would resume it; a collected body over 256 KiB is sent from a task, in the pieces
    it came in.
    """

    __slots__ = ("content_type", "model", "relay", "reply")

    def __init__(self, relay: Relay, model: Model,
                 reply: Reply) -> None:
        self.relay = relay
        self.model = model
        self.reply = reply
        self.content_type = ""

    def head(self, resp: UpstreamResponse) -> None:
        if resp.status >= 400:
            self._resume(resp, None, -1)
            return
        self.content_type, length = _content_type_and_usage(self.model, resp)
        if length > RELAY_AS_IT_COMES or self.content_type.startswith("text/event-stream"):
            self._resume(resp, self.content_type, length)

    def done(self, resp: UpstreamResponse) -> None:
        if resp.buffered > RELAY_AS_IT_COMES:  # of undeclared length, and large: no join
            self._resume(resp, self.content_type, resp.buffered)
            return
        resp.listener = None
        data = resp.take_body()
        resp.release()
        self.model.release()
        self.reply.send(Answer(data, resp.status, self.content_type.encode("latin-1")))

    def failed(self, resp: UpstreamResponse, exc: BaseException) -> None:
        resp.listener = None
        resp.close()
        self.model.release()
        if not resp.head_received and not isinstance(exc, UpstreamTimeout | Abandoned):
            self.reply.resume(None)
        else:
            self.reply.send(error_answer(_failed_while_answering(self.model, exc)))

    def _resume(self, resp: UpstreamResponse, content_type: str | None, length: int) -> None:
        resp.listener = None
        resp.abandoned = None  # from here on, the awaited path sees a client that leaves
        relay, model = self.relay, self.model
        self.reply.resume(lambda: relay.finish(model, resp, content_type, length))


class ClientLeft(UpstreamError):
    """The client left before its answer: nothing is sent to it (its connection is gone)."""

    def __init__(self, model: Model) -> None:
        super().__init__(f"the client of a request to '{model.spec.id}' left")


class GatewayTimeout(UpstreamError):
    """The worker did not answer in time (`request_timeout`, `idle_timeout`)."""

    status = 504
    code = "worker_timeout"


class AnswerTooLargeError(UpstreamError):
    """The worker's answer went past `max_answer_bytes`."""

    code = "answer_too_large"


def _failed_while_answering(model: Model, exc: BaseException) -> UpstreamError:
    """What the client is told of an exchange that failed once sent: 504 for a timeout, 502
    naming the limit for an answer too large, a generic 502 otherwise (the detail, which may
    name an internal address, is logged)."""
    name = model.spec.id
    if isinstance(exc, UpstreamTimeout):
        return _timed_out(model, exc)
    if isinstance(exc, Abandoned):  # nobody will read this answer
        log.info("model %s: the client went away; the worker was told to stop", name)
        return UpstreamError(f"worker of '{name}' failed while answering")
    if isinstance(exc, AnswerTooLarge):
        log.warning("model %s: answer cut off past max_answer_bytes (%d)", name, exc.limit)
        return AnswerTooLargeError(
            f"the answer of '{name}' exceeds the gateway's limit of {exc.limit} bytes for a "
            f"non-streamed answer (max_answer_bytes); ask for a stream, or a smaller answer")
    log.warning("model %s: worker failed while answering: %s", name, _describe(exc))
    return UpstreamError(f"worker of '{name}' failed while answering")


def _timed_out(model: Model, exc: UpstreamTimeout) -> GatewayTimeout:
    name = model.spec.id
    log.warning("model %s: %s", name, exc)
    if exc.idle:
        return GatewayTimeout(f"worker of '{name}' sent nothing for {exc.seconds:g} s "
                              f"(idle_timeout)")
    return GatewayTimeout(f"worker of '{name}' did not answer within {exc.seconds:g} s "
                          f"(request_timeout)")


# Headers by which our worker apps report what a request consumed (summed per model).
USAGE_HEADERS = {b"x-audio-seconds": "audio_seconds", b"x-input-tokens": "input_tokens"}


def _content_type_and_usage(model: Model, resp: UpstreamResponse) -> tuple[str, int]:
    """The answer's content type and declared length (-1: none); what the request consumed
    is added to the model's usage. (One pass over the headers: this runs for every
    request.)"""
    content_type = "application/json"
    length = -1
    for name, value in resp.raw_headers:
        name = name.lower()
        if name == b"content-type":
            content_type = value.decode("latin-1")
        elif name == b"content-length":
            length = int(value) if value.isdigit() else -1
        elif name in USAGE_HEADERS:
            key = USAGE_HEADERS[name]
            try:
                model.count(key, float(value))
            except ValueError:
                continue
    return content_type, length


class RelayStream:
    """A streamed answer passed through as it arrives (an ASGI app); also a large
    non-streamed answer whose `length` the worker declared, which is relayed the same way
    (with that Content-Length), so that the gateway never holds it whole.

    A client that goes away is noticed by a task waiting on `receive()`; it aborts the
    connection to the worker, which stops generating. Cleanup (closing or releasing the
    upstream answer, releasing the admission slot) runs exactly once, however the stream ends.
    A stream that breaks ends with an error event; a non-streamed answer that breaks (the
    worker failed, or the request deadline passed) is left incomplete, and the connection
    to the client closed.
    """

    def __init__(self, model: Model, resp: UpstreamResponse,
                 content_type: str, length: int = -1) -> None:
        self._model = model
        self._resp = resp
        self._length = length
        if length < 0:
            resp.deadline = math.inf  # a stream is bounded by the idle timeout alone
            self._headers = [(b"content-type", content_type.encode("latin-1")),
                             *STREAM_HEADERS]
        else:
            self._headers = [(b"content-type", content_type.encode("latin-1")),
                             (b"content-length", b"%d" % length)]
        self._complete = False
        self._closed = False
        self._gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(self._client_left)
        try:
            await send({"type": "http.response.start", "status": self._resp.status,
                        "headers": self._headers})
            try:
                async for chunk in self._resp.chunks():
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                self._complete = True
            except OSError as exc:
                if self._gone:
                    return
                model = self._model.spec.id
                log.warning("model %s: stream broken: %s", model, _describe(exc))
                if self._length >= 0:
                    return  # incomplete: the server closes the connection
                error = _timed_out(self._model, exc) if isinstance(exc, UpstreamTimeout) \
                    else UpstreamError(f"worker of '{model}' failed mid-stream")
                await send({"type": "http.response.body", "more_body": True,
                            "body": sse_error_event(error)})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.remove_done_callback(self._client_left)
            watcher.cancel()
            self._cleanup()

    def _client_left(self, watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            self._gone = True
            self._resp.close()

    def _cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        # After a client disconnect, closing (not releasing) the connection tells the worker
        # to stop generating.
        if self._complete:
            self._resp.release()
        else:
            self._resp.close()
        self._model.release()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _upstream_failure(model: Model, resp: UpstreamResponse
                            ) -> ModelhostError:
    try:
        raw = await resp.read(ERROR_BODY_LIMIT)
    except OSError:
        raw = b""
    message = _error_message(raw) or f"HTTP {resp.status}"
    if 400 <= resp.status < 500 and resp.status not in (401, 403, 404):
        # The worker judged the request itself (context too long, bad parameter): the
        # client's fault, so the client sees the worker's status and message.
        return _ClientError(resp.status, message, raw)
    return UpstreamError(f"worker of '{model.spec.id}' answered {resp.status}: {message}")


class _ClientError(InvalidRequest):
    def __init__(self, status: int, message: str, raw: bytes) -> None:
        super().__init__(message, param=_error_field(raw, "param"),
                         code=_error_field(raw, "code"))
        self.status = status


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(raw: bytes) -> str:
    data = _parse(raw)
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            if msg:
                return str(msg)
        if isinstance(err, str):
            return err
        if "detail" in data:
            return json.dumps(data["detail"])[:2000]
    return raw.decode(errors="replace").strip()[:2000]


def _error_field(raw: bytes, name: str) -> str | None:
    """The worker's `error.param` or `error.code`, passed on to the client."""
    data = _parse(raw)
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        value = data["error"].get(name)
        return str(value)[:200] if value is not None else None
    return None


def _address(base: str) -> str:
    """A worker's host and port, for the log (never a URL's credentials or path)."""
    parts = urlsplit(base)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname}:{port}" if port else str(parts.hostname)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

