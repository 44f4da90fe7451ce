"""A streamed answer passed through as it arrives, with back-pressure; also a large
non-streamed answer whose length the worker declared (never held whole by the gateway)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from modelhost.errors import UpstreamError, sse_error_event
from modelhost.registry.model import Model
from modelhost.serving.failures import describe, timed_out
from modelhost.upstream import UpstreamResponse, UpstreamTimeout

log = logging.getLogger(__name__)

STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


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

    def __init__(self, model: Model, resp: UpstreamResponse, content_type: str,
                 length: int = -1, headers: list[tuple[bytes, bytes]] | None = None,
                 ended: Callable[[float | None, bool], None] | None = None) -> None:
        """`headers`: more headers of the answer; `ended(first, complete)` is told, once,
        when the first chunk was written (a `perf_counter` time, None if none was) and
        whether the answer went out whole."""
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
        if headers:
            self._headers += headers
        self._ended = ended
        self._first: float | None = None
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
                    if self._first is None:
                        self._first = time.perf_counter()
                self._complete = True
            except OSError as exc:
                if self._gone:
                    return
                model = self._model.spec.id
                log.warning("model %s: stream broken: %s", model, describe(exc))
                if self._length >= 0:
                    return  # incomplete: the server closes the connection
                error = timed_out(self._model, exc) if isinstance(exc, UpstreamTimeout) \
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
        if self._ended is not None:
            self._ended(self._first, self._complete)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass

