"""One relayed call: from a checked request to a finished answer.

A `Call` carries one request to a model's worker and its answer back, through every step of
the request path (docs/architecture.md):

    admission   a slot of the model (`Model.admission`: bounded queue, 429 past it)
    ready       the worker's address, loading the model first if needed (`Model.ensure_ready`)
    send        the body as the client sent it (re-encoded only when the client used an alias)
    answer      a complete body, or a stream passed through as it arrives (`RelayStream`)
    settle      the slot released and the model's use stamped (`Model.release`), however the
                call ends; what the worker reports it consumed counted (`Model.count`)

Both ways of serving a request drive the same `Call`: the ASGI path (`endpoint.RelayEndpoint`
called by `front.Front`) and the wire path (`wire.HotRelay`, straight from the HTTP server)
await `answer()`, and hand what it gives to their own way of writing bytes. The wire path may
first try `start(reply)`: when nothing has to be waited for (the model is ready, a slot is free
and a connection to its worker is pooled), the request is sent at once and the answer followed
from the worker connection's callbacks (the `Call` is the connection's `upstream.Listener`),
with no task, no future and no await; anything else (an error status, a stream, a large
answer, a failure) goes on through `reply.resume` to the same awaited steps.

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
- a client that leaves is seen: a request that waited for its slot or its model is not sent,
  and one awaiting its answer is given up within a second (the worker's connection aborted, so
  it stops generating), freeing the slot either way.
- what a client is told names no internal address (`failures.py`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from modelhost.errors import UpstreamError
from modelhost.metrics.requests import RequestMetrics
from modelhost.registry.model import Model
from modelhost.registry.replicas import Replica
from modelhost.requestid import for_worker
from modelhost.serving.answers import Answer, error_answer
from modelhost.serving.failures import (
    ClientLeft,
    address,
    describe,
    failed_while_answering,
    timed_out,
    upstream_failure,
)
from modelhost.serving.stream import RelayStream, UsageScan, answer_tokens
from modelhost.upstream import (
    Abandoned,
    AnswerTooLarge,
    Body,
    Multipart,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
)
from modelhost.usage import Ledger

log = logging.getLogger(__name__)

# A non-streamed answer whose declared length is past this is relayed as it arrives
# (`RelayStream`); one of undeclared length is collected (up to the cap), then sent in one
# write if it is no larger, or else in the pieces it arrived in (never joined).
RELAY_AS_IT_COMES = 256 * 1024

Gone = Callable[[], bool]


class Relay:
    """What every call shares: the client to the workers (one pool, one sweeper for every
    deadline), the answer cap and how long a request waits for its model to load."""

    def __init__(self, load_wait_timeout: float, max_answer_bytes: int = 64 * 1024 * 1024,
                 request_timeout: float = 900.0, idle_timeout: float = 600.0,
                 client: UpstreamClient | None = None,
                 metrics: RequestMetrics | None = None, usage: Ledger | None = None) -> None:
        self.load_wait_timeout = load_wait_timeout
        self.max_answer_bytes = max_answer_bytes
        self.metrics = metrics
        self.usage = usage
        # The deadlines are the client's: its one sweeper checks every exchange.
        self.client = client if client is not None else UpstreamClient(
            idle_timeout=idle_timeout, request_timeout=request_timeout)

    async def close(self) -> None:
        self.client.close()

    def call(self, model: Model, path: str, body: Body, headers: Mapping[str, str],
             request_id: bytes = b"", authorization: bytes | None = None) -> Call:
        """A call of `path` (below /v1) on the model's worker, to be answered
        (`authorization`: the client's header, whose key id its usage is counted under)."""
        call = Call(self, model, path, body, headers, request_id)
        if self.usage is not None:
            call.key = self.usage.who(authorization)
        return call

    async def fetch_json(self, model: Model, path: str, form: Multipart,
                         authorization: bytes | None = None) -> Any:
        """Post a form the gateway built to the model's worker and return its JSON answer
        (for requests the gateway composes, such as diarized transcripts). Its usage is
        counted under `authorization`'s key id, as the model's request; it is not a request
        of the metrics' (a part of the client's, which is not relayed as one)."""
        call = Call(self, model, path, form, {"Content-Type": form.content_type})
        call.tally = None
        call.key = self.usage.who(authorization) if self.usage is not None else None
        await model.admission.acquire()
        try:
            resp = await call.send()
            if resp.status >= 400:
                raise await upstream_failure(model, resp)
            try:
                data = json.loads(await resp.read(self.max_answer_bytes))
            except OSError as exc:
                raise failed_while_answering(model, exc) from exc
            except ValueError as exc:
                raise UpstreamError(f"worker of '{model.spec.id}' gave no JSON answer: "
                                    f"{describe(exc)}") from exc
            content_type_and_usage(model, resp, call)
            call._use(call.prompt, 0)
            return data
        finally:
            call._let_go()
            model.release()


class Reply(Protocol):
    """How the wire path answers a call followed from callbacks (`Call.start`): the client's
    connection."""

    def send(self, answer: Answer) -> None:
        """Send a complete answer now."""

    def gone(self) -> bool:
        """Whether the client has disconnected (asked about once a second while the answer
        is awaited)."""

    def resume(self, call: Call, step: Callable[[], Awaitable[Answer | RelayStream]]) -> None:
        """Go on in a task: await `step` and send what it gives (its errors answered as the
        awaited path answers them, counted as `call`'s end)."""


class Call:
    """One request relayed to a model's worker (module docstring)."""

    __slots__ = ("audio", "body", "content_type", "extra", "headers", "inputs", "key",
                 "model", "path", "picked", "prompt", "relay", "replica", "reply",
                 "request_id", "scan", "t0", "t_ready", "t_sent", "tally")

    def __init__(self, relay: Relay, model: Model, path: str, body: Body,
                 headers: Mapping[str, str], request_id: bytes = b"") -> None:
        self.relay = relay
        self.model = model
        self.path = path
        self.body = body
        self.headers = headers
        self.content_type = ""
        self.reply: Reply | None = None
        # The request's id (X-Request-ID): passed to the worker, returned to the client.
        self.request_id = request_id
        self.extra = b"x-request-id: " + for_worker(request_id) + b"\r\n" \
            if request_id else b""
        # Times (`perf_counter`): the call made (the body in), the model admitted and ready,
        # the request sent to the worker; and where the call's end is counted.
        self.t0 = self.t_ready = self.t_sent = time.perf_counter()
        metrics = relay.metrics
        self.tally = metrics.tally(model.spec.id, path) if metrics is not None else None
        # Usage (`modelhost.usage`): the key id it is counted under (None: not counted); the
        # inputs of an embeddings request, what the worker's headers reported, and whether
        # a stream's usage is read (and its usage-only chunk dropped: the client did not ask).
        self.key: str | None = None
        self.inputs = self.prompt = 0
        self.audio = 0.0
        self.scan = 0  # 0: no stream usage; KEEP_USAGE or DROP_USAGE
        # A model of several replicas: the one this call is at (None: replica 0), counted in
        # its in-flight number until the call lets go of it (`picked` while it is).
        self.picked = False
        self.replica: Replica | None = None

    def _pick(self, base: str) -> None:
        replicas = self.model.replicas
        if replicas is not None:
            self._let_go()
            self.replica, self.picked = replicas.took(base), True

    def _let_go(self) -> None:
        if self.picked:
            self.picked = False
            replicas = self.model.replicas
            if replicas is not None:
                replicas.done(self.replica)

    # -- what the answer says of the call, and what it is counted as -------------------

    def headers_out(self, worker_done: float) -> list[tuple[bytes, bytes]]:
        """The answer's own headers: the request id, and Server-Timing (what the gateway
        and the worker took, in ms; `worker_done`: when the worker's answer was in)."""
        now = time.perf_counter()
        timing = b"gateway;dur=%.3f, worker;dur=%.3f" % (
            (self.t_sent - self.t0 + now - worker_done) * 1000,
            (worker_done - self.t_sent) * 1000)
        headers = [(b"server-timing", timing)]
        if self.request_id:
            headers.append((b"x-request-id", self.request_id))
        return headers

    def counted(self, status: int, worker_done: float | None = None, body: bytes = b"",
                completion: int = 0) -> None:
        """The call ended with `status`, its answer written now (`worker_done`: when the
        worker's answer was in; None when the gateway answered without it). A call that
        succeeded is added to its key's usage: the tokens of its answer's `usage` (a JSON
        `body`'s, read without parsing the body; or a stream's, `completion` given). The
        model's version is told the status (a rollout's watch reads its share of 5xx)."""
        self.model.answered(status)
        if status < 400:
            prompt = self.prompt
            if body:
                prompt, completion = answer_tokens(body, prompt)
            self._use(prompt, completion)
        tally = self.tally
        if tally is not None:
            now = time.perf_counter()
            own = self.t_sent - self.t_ready + (now - worker_done if worker_done else 0.0)
            RequestMetrics.record(tally, status, now - self.t0, own)

    def rejected(self, reason: str) -> None:
        """The call was refused for its model's sake (queue full, model not ready...)."""
        metrics = self.relay.metrics
        if metrics is not None and self.tally is not None:
            metrics.rejected(self.model.spec.id, reason)

    def _streamed(self, first: float | None, complete: bool,
                  scan: UsageScan | None = None) -> None:
        """`RelayStream`'s end: counted, with its first chunk's time (and the usage its
        `scan` found: a broken stream used what it generated, and is counted as far as
        known)."""
        self._let_go()
        tally = self.tally
        if tally is not None and first is not None:
            RequestMetrics.first_token(tally, first - self.t0)
        completion = 0
        if scan is not None:
            self.prompt = scan.prompt or self.prompt
            completion = scan.completion or scan.pieces
        if not complete:
            self._use(self.prompt, completion)
        self.counted(200 if complete else 502, completion=completion)

    def _use(self, prompt: int, completion: int) -> None:
        usage = self.relay.usage
        if self.key is not None and usage is not None:
            usage.add(self.key, self.model.spec.id, prompt, completion, self.audio,
                      self.inputs)

    # -- awaited: every step in turn -----------------------------------------------------

    async def answer(self, gone: Gone | None = None) -> Answer | RelayStream:
        """Admission, a ready worker, send, and the answer: an ASGI app to call with the
        client's connection. `gone` says whether the client has left (the wire path knows):
        then a request that waited for its slot or its model is not sent, and one awaiting
        its answer is given up within a second."""
        model = self.model
        await model.admission.acquire()
        try:
            if gone is not None and gone():
                raise ClientLeft(model)
            resp = await self.send(gone)
        except BaseException:
            self._let_go()
            model.release()
            raise
        return await self.finish(resp)

    async def finish(self, resp: UpstreamResponse, content_type: str | None = None,
                     length: int = -1) -> Answer | RelayStream:
        """Relay an answer whose head is in (`content_type` and its declared `length`, -1 for
        none, when its usage was counted already); the slot is released when it ends."""
        model, relay = self.model, self.relay
        released = False
        try:
            if resp.status >= 400:
                raise await upstream_failure(model, resp)
            if content_type is None:
                content_type, length = content_type_and_usage(model, resp, self)
            if content_type.startswith("text/event-stream"):
                released = True  # the stream releases the slot when it ends
                resp.abandoned = None  # RelayStream watches the client itself
                return RelayStream(model, resp, content_type,
                                   headers=self.headers_out(time.perf_counter()),
                                   ended=self._streamed,
                                   scan=UsageScan(self.scan == DROP_USAGE)
                                   if self.scan else None)
            if length > relay.max_answer_bytes:
                resp.close()
                raise failed_while_answering(model, AnswerTooLarge(relay.max_answer_bytes))
            if length <= RELAY_AS_IT_COMES:
                try:
                    length = await resp.complete(relay.max_answer_bytes)
                except OSError as exc:
                    resp.close()
                    raise failed_while_answering(model, exc) from exc
            if length > RELAY_AS_IT_COMES:
                # Passed on as it arrives; or, collected, sent in the pieces it came in.
                released = True
                resp.abandoned = None
                return RelayStream(model, resp, content_type, length,
                                   headers=self.headers_out(time.perf_counter()),
                                   ended=self._streamed,
                                   scan=UsageScan(False, whole=True) if self.key else None)
            done = time.perf_counter()
            data = resp.take_body()
            resp.release()
            answer = Answer(data, resp.status, content_type.encode("latin-1"))
            answer.headers += self.headers_out(done)
            self.counted(resp.status, done, data)
            return answer
        finally:
            if not released:
                self._let_go()
                model.release()

    async def send(self, gone: Gone | None = None) -> UpstreamResponse:
        """Send the request to the model's worker (loading the model first if needed) and
        return the answer's head; a worker that died between requests is waited for once."""
        model, relay = self.model, self.relay
        for attempt in (1, 2):
            base = await model.ensure_ready(relay.load_wait_timeout)
            if gone is not None and gone():  # left while its model was loading
                raise ClientLeft(model)
            self.t_ready = self.t_sent = time.perf_counter()
            self._pick(base)
            try:
                return await relay.client.request(base, "POST", self.path, self.headers,
                                                  self.body, connect_to=model.connect_to,
                                                  abandoned=gone, extra=self.extra)
            except UpstreamTimeout as exc:
                raise timed_out(model, exc) from exc
            except Abandoned as exc:
                raise ClientLeft(model) from exc
            except OSError as exc:
                # A worker killed between requests refuses the connection (or drops a pooled
                # one). Nothing was generated, so once its restart is under way, retry once.
                if attempt == 1 and await model.worker_lost(base):
                    log.warning("model %s: worker gone (%s); retrying after its restart",
                                model.spec.id, describe(exc))
                    continue
                # The detail (an address, a system error) is the operator's, not the client's.
                log.warning("model %s: worker at %s unreachable: %s", model.spec.id,
                            address(base), describe(exc))
                raise UpstreamError(f"worker of '{model.spec.id}' unreachable") from exc
        raise AssertionError("unreachable")

    # -- without a task: followed from the worker connection's callbacks ---------------

    def start(self, reply: Reply) -> bool:
        """Send the request now if nothing has to be waited for (the model is ready, a slot is
        free, a connection to its worker is pooled) and answer from the connection's
        callbacks: a complete answer goes to `reply.send`. False, with nothing sent, when
        something is missing: then the caller awaits `answer()`.

        The common case, a complete JSON answer, costs no task, no future and no await.
        Anything else goes on through `reply.resume`, with what was received so far: an error
        status or a stream as soon as the head is in (`finish`); a head declaring more than
        256 KiB (passed on as it arrives); a failure before the head (the pooled connection
        had been closed, or the worker died): the whole call again, awaited, which retries
        and waits for a restart; a timeout, an answer past `max_answer_bytes` or a failure
        after the head: answered as the awaited path answers them. A body of undeclared
        length is collected whole (reading from the worker never pauses on this path, since
        nothing but the end would resume it); over 256 KiB it is sent from a task, in the
        pieces it came in."""
        model, relay = self.model, self.relay
        base = model.ready_upstream()
        if base is None or not model.admission.try_acquire():
            return False
        assert isinstance(self.body, bytes)
        self.reply = reply
        self.t_ready = self.t_sent = time.perf_counter()
        resp = relay.client.start(base, "POST", self.path, self.headers, self.body, self,
                                  relay.max_answer_bytes, self.extra)
        if resp is None:
            model.admission.release()
            return False
        if model.replicas is not None:
            self._pick(base)
        resp.abandoned = reply.gone  # a client that leaves frees the slot within a second
        return True

    def head(self, resp: UpstreamResponse) -> None:
        if resp.status >= 400:
            self._resume(resp, None, -1)
            return
        self.content_type, length = content_type_and_usage(self.model, resp, self)
        if length > RELAY_AS_IT_COMES or self.content_type.startswith("text/event-stream"):
            self._resume(resp, self.content_type, length)

    def done(self, resp: UpstreamResponse) -> None:
        if resp.buffered > RELAY_AS_IT_COMES:  # of undeclared length, and large: no join
            self._resume(resp, self.content_type, resp.buffered)
            return
        done = time.perf_counter()
        resp.listener = None
        data = resp.take_body()
        resp.release()
        if self.picked:  # a model of several replicas
            self._let_go()
        self.model.release()
        assert self.reply is not None
        answer = Answer(data, resp.status, self.content_type.encode("latin-1"))
        answer.headers += self.headers_out(done)
        self.reply.send(answer)
        self.counted(resp.status, done, data)

    def failed(self, resp: UpstreamResponse, exc: BaseException) -> None:
        resp.listener = None
        resp.close()
        self._let_go()
        self.model.release()
        reply = self.reply
        assert reply is not None
        if not resp.head_received and not isinstance(exc, UpstreamTimeout | Abandoned):
            reply.resume(self, lambda: self.answer(reply.gone))
        else:
            error = failed_while_answering(self.model, exc)
            reply.send(error_answer(error, self.id_header()))
            self.counted(error.status)

    def id_header(self) -> dict[str, str]:
        """The request id as a header of an error answer."""
        return {"x-request-id": self.request_id.decode("latin-1")} if self.request_id else {}

    def _resume(self, resp: UpstreamResponse, content_type: str | None, length: int) -> None:
        resp.listener = None
        resp.abandoned = None  # from here on, the awaited path sees a client that leaves
        assert self.reply is not None
        self.reply.resume(self, lambda: self.finish(resp, content_type, length))


# Headers by which our worker apps report what a request consumed (summed per model).
USAGE_HEADERS = {b"x-audio-seconds": "audio_seconds", b"x-input-tokens": "input_tokens"}


def content_type_and_usage(model: Model, resp: UpstreamResponse,
                           call: Call | None = None) -> tuple[str, int]:
    """The answer's content type and declared length (-1: none); what the request consumed
    is added to the model's usage (and to the `call`'s, for its key's). (One pass over the
    headers: this runs for every request.)"""
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
                amount = float(value)
            except ValueError:
                continue
            if not math.isfinite(amount) or amount < 0:  # a remote server's nonsense
                continue
            model.count(key, amount)
            if call is not None:
                if key == "audio_seconds":
                    call.audio = amount
                else:
                    call.prompt = int(amount)
    return content_type, length


# `Call.scan`: a stream's usage chunk read and passed on (the client asked for it), or read
# and dropped (the gateway asked for it: `endpoint.RelayEndpoint.call`).
KEEP_USAGE = 1
DROP_USAGE = 2
