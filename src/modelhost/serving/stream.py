"""A streamed answer passed through as it arrives, with back-pressure; also a large
non-streamed answer whose length the worker declared (never held whole by the gateway).

A chat or completions stream's usage is read on the way (`UsageScan`): the final chunk that
carries `usage` (OpenAI's `stream_options.include_usage`), passed on when the client asked
for it, dropped when the gateway asked for it on the client's behalf. Events are passed on
whole: what follows the last event boundary of a chunk (a part of an event, which no SSE
client would act on before its end) is held until the rest of it comes, so that an event
split across chunks is still found; nothing more than that part is ever held, and never more
than `UsageScan.MAX_HELD` bytes of it: a stream with no event boundary (a broken or hostile
server) is passed on as it comes rather than piled up in the gateway's memory.
"""

from __future__ import annotations

import asyncio
import json
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
# The last event of a chat or completions stream.
DONE = b"data: [DONE]"


class UsageScan:
    """Reads the usage of a chat or completions stream from its events (module docstring);
    with `drop`, the usage-only event (`"choices": []`) is taken out of what the client
    gets. With `whole`, the answer is one large JSON body relayed as it arrives: its last
    `TAIL` bytes are kept, where its `usage` member is (`answer_tokens`), and nothing is
    held back."""

    __slots__ = ("_held", "completion", "drop", "pieces", "prompt", "whole")

    TAIL = 2048
    MAX_HELD = 256 * 1024  # an event longer than this is passed on unread

    def __init__(self, drop: bool, whole: bool = False) -> None:
        self.drop = drop
        self.whole = whole
        self.prompt = self.completion = 0
        # Events that carried generated text: what a stream whose worker reports no usage
        # (llama-cpp-python's server ignores `stream_options`) is counted as, an estimate
        # (one token an event as such a server streams; its prompt tokens stay unknown).
        self.pieces = 0
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` (and what was held) the client gets now."""
        if self.whole:
            tail = self.TAIL
            self._held = chunk[-tail:] if len(chunk) >= tail else (self._held + chunk)[-tail:]
            return chunk
        if self._held:
            chunk = self._held + chunk
            self._held = b""
        if not chunk.endswith(b"\n\n"):
            lf, crlf = chunk.rfind(b"\n\n"), chunk.rfind(b"\r\n\r\n")
            end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
            if end < len(chunk) and len(chunk) - end <= self.MAX_HELD:
                chunk, self._held = chunk[:end], chunk[end:]
        if not self.completion:
            self.pieces += _pieces(chunk)
        if b'"usage"' not in chunk:
            return chunk
        out = []
        for event in chunk.split(b"\n\n"):
            if b'"usage"' in event and self._read(event):
                continue
            out.append(event)
        return b"\n\n".join(out)

    def rest(self) -> bytes:
        """What is held at the stream's end (an event without its boundary)."""
        held, self._held = self._held, b""
        if self.whole:
            self.prompt, self.completion = answer_tokens(held)
            return b""
        if held and b'"usage"' in held and self._read(held):
            return b""
        return held

    def _read(self, event: bytes) -> bool:
        """Read an event's usage; whether it is to be dropped."""
        data = event.strip()
        if not data.startswith(b"data:"):
            return False
        try:
            body = json.loads(data[5:])
        except ValueError:
            return False
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return False
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and prompt >= 0:
            self.prompt = prompt
        if type(completion) is int and completion >= 0:
            self.completion = completion
        return self.drop and body.get("choices") == []


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
                 ended: Callable[[float | None, bool, UsageScan | None], None] | None = None,
                 scan: UsageScan | None = None) -> None:
        """`headers`: more headers of the answer; `ended(first, complete, scan)` is told,
        once, when the first chunk was written (a `perf_counter` time, None if none was),
        whether the answer went out whole, and the `scan` that read the stream's usage."""
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
        self._scan = scan
        self._first: float | None = None
        self._complete = False
        self._last = b""  # the last chunk sent to the client
        self._closed = False
        self._gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(self._client_left)
        try:
            await send({"type": "http.response.start", "status": self._resp.status,
                        "headers": self._headers})
            try:
                scan = self._scan
                async for chunk in self._resp.chunks():
                    if scan is not None:
                        chunk = scan.feed(chunk)
                        if not chunk:
                            continue
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                    self._last = chunk
                    if self._first is None:
                        self._first = time.perf_counter()
                if scan is not None and (rest := scan.rest()):
                    await send({"type": "http.response.body", "body": rest,
                                "more_body": True})
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
            # A client that leaves once it has the last event (`data: [DONE]`; OpenAI's
            # client closes the stream there) got the whole answer: not a failure.
            whole = self._complete or (self._gone and self._last.rstrip().endswith(DONE))
            self._ended(self._first, whole, self._scan)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _pieces(chunk: bytes) -> int:
    """How many events of a chat or completions stream's `chunk` carry generated text (a
    non-empty `content` or `text` string; compact JSON or Python's `json.dumps` spacing)."""
    count = chunk.count
    return (count(b'"content":"') + count(b'"content": "') + count(b'"text":"')
            + count(b'"text": "') - count(b'"content":""') - count(b'"content": ""')
            - count(b'"text":""') - count(b'"text": ""'))


def answer_tokens(body: bytes, prompt: int = 0) -> tuple[int, int]:
    """The prompt and completion tokens of a JSON answer's `usage` object (`prompt` and 0
    when it has none), found from the end of the body and decoded alone: the body is never
    parsed (an embeddings answer may be megabytes of vectors). A string value holds no
    unescaped `"`, so a `"usage"` followed by `:` and `{` is the member. (About a
    microsecond: JSON's C decoder on the object beats any pattern on the bytes.)"""
    at = len(body)
    for _ in range(4):
        at = body.rfind(b'"usage"', 0, at)
        if at < 0:
            break
        start = body.find(b"{", at + 7, at + 40)
        if start < 0 or body[at + 7:start].strip() != b":":
            continue
        try:
            usage, _ = _DECODER.raw_decode(body[start:start + 4096].decode("utf-8", "replace"))
        except ValueError:
            break
        given, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(given) is int and given >= 0:
            prompt = given
        return prompt, completion if type(completion) is int and completion >= 0 else 0
    return prompt, 0


_DECODER = json.JSONDecoder()
