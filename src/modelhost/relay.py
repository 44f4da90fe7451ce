"""The request path's last leg: relay bytes to the worker and back.

The body goes to the worker as the client sent it (re-encoded only when the client used an
alias). A streamed answer is passed through chunk by chunk as it arrives, never buffered or
re-encoded. A client that disconnects closes the upstream connection, which makes the worker
stop generating. Failures become OpenAI-shaped errors: before the stream starts, an error
response (502 when the worker failed); after, a final `data: {"error": ...}` event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

import aiohttp
from starlette.responses import Response, StreamingResponse

from modelhost.admission import Admission
from modelhost.errors import (
    InvalidRequest,
    ModelhostError,
    UpstreamError,
    sse_error_event,
)
from modelhost.registry.runtime import ModelRuntime

log = logging.getLogger(__name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Relay:
    def __init__(self, load_wait_timeout: float) -> None:
        self.load_wait_timeout = load_wait_timeout
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            # No total timeout: a long generation is legitimate. A worker that accepts the
            # connection and then says nothing at all is caught by sock_read.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, runtime: ModelRuntime, admission: Admission, path: str,
                      body: bytes | IO[bytes], headers: dict[str, str]) -> Response:
        """Send `body` (bytes, or a spooled file streamed from disk) to the model's worker at
        `path` (below /v1) and relay the answer."""
        assert self._session is not None, "Relay.open() was not awaited"
        await admission.acquire()
        released = False
        try:
            resp = await self._send(runtime, path, body, headers)
            if resp.status >= 400:
                raise await _upstream_failure(runtime, resp)
            content_type = resp.headers.get("Content-Type", "application/json")
            if content_type.startswith("text/event-stream"):
                released = True  # the stream releases the slot when it ends
                return _RelayStream(runtime, admission, resp, content_type)
            try:
                data = await resp.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamError(f"worker of '{runtime.spec.id}' failed while answering: "
                                    f"{_describe(exc)}") from exc
            finally:
                resp.release()
            _count_usage(runtime, resp)
            return Response(data, status_code=resp.status, media_type=content_type)
        finally:
            if not released:
                runtime.last_used = time.monotonic()
                admission.release()

    async def fetch_json(self, runtime: ModelRuntime, admission: Admission, path: str,
                         form: Callable[[], aiohttp.FormData]) -> Any:
        """Post a form the gateway built to the model's worker and return its JSON answer
        (for requests the gateway composes, such as diarized transcripts)."""
        await admission.acquire()
        try:
            resp = await self._send(runtime, path, form, {})
            if resp.status >= 400:
                raise await _upstream_failure(runtime, resp)
            try:
                data = await resp.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                raise UpstreamError(f"worker of '{runtime.spec.id}' gave no JSON answer: "
                                    f"{_describe(exc)}") from exc
            finally:
                resp.release()
            _count_usage(runtime, resp)
            return data
        finally:
            runtime.last_used = time.monotonic()
            admission.release()

    async def _send(self, runtime: ModelRuntime, path: str,
                    body: bytes | IO[bytes] | Callable[[], aiohttp.FormData],
                    headers: dict[str, str]) -> aiohttp.ClientResponse:
        assert self._session is not None
        for attempt in (1, 2):
            base = await runtime.ensure_ready(self.load_wait_timeout)
            data: Any = body
            if callable(body):
                data = body()  # a form is consumed by sending it: build it for each attempt
            elif not isinstance(body, bytes):
                body.seek(0)
            try:
                return await self._session.post(base + path, data=data, headers=headers)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                # A worker killed between requests refuses the connection (or drops a pooled
                # one). Nothing was generated, so once its restart is under way, retry once.
                if attempt == 1 and await runtime.worker_lost(base):
                    log.warning("model %s: worker gone (%s); retrying after its restart",
                                runtime.spec.id, _describe(exc))
                    continue
                raise UpstreamError(f"worker of '{runtime.spec.id}' unreachable: "
                                    f"{_describe(exc)}") from exc
        raise AssertionError("unreachable")


# Headers by which our worker apps report what a request consumed (summed per model).
USAGE_HEADERS = {"X-Audio-Seconds": "audio_seconds", "X-Input-Tokens": "input_tokens"}


def _count_usage(runtime: ModelRuntime, resp: aiohttp.ClientResponse) -> None:
    for header, key in USAGE_HEADERS.items():
        value = resp.headers.get(header)
        if value is not None:
            try:
                runtime.usage[key] = runtime.usage.get(key, 0.0) + float(value)
            except ValueError:
                continue


class _RelayStream(StreamingResponse):
    """A streamed answer passed through as it arrives.

    Cleanup (closing the upstream response, releasing the admission slot) runs exactly once,
    whether the stream completes, breaks, or the client goes away before it even starts.
    """

    def __init__(self, runtime: ModelRuntime, admission: Admission,
                 resp: aiohttp.ClientResponse, content_type: str) -> None:
        self._runtime = runtime
        self._admission = admission
        self._resp = resp
        self._complete = False
        self._closed = False
        super().__init__(self._chunks(), media_type=content_type, headers=STREAM_HEADERS)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
            self._complete = True
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("model %s: stream broken: %s", self._runtime.spec.id, _describe(exc))
            yield sse_error_event(UpstreamError(
                f"worker of '{self._runtime.spec.id}' failed mid-stream: {_describe(exc)}"))
        finally:
            self._cleanup()

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
        self._runtime.last_used = time.monotonic()
        self._admission.release()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


async def _upstream_failure(runtime: ModelRuntime, resp: aiohttp.ClientResponse
                            ) -> ModelhostError:
    try:
        raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError):
        raw = b""
    finally:
        resp.release()
    message = _error_message(raw) or f"HTTP {resp.status}"
    if 400 <= resp.status < 500 and resp.status not in (401, 403, 404):
        # The worker judged the request itself (context too long, bad parameter): the
        # client's fault, so the client sees the worker's status and message.
        return _ClientError(resp.status, message, raw)
    return UpstreamError(f"worker of '{runtime.spec.id}' answered {resp.status}: {message}")


class _ClientError(InvalidRequest):
    def __init__(self, status: int, message: str, raw: bytes) -> None:
        super().__init__(message, param=_error_param(raw))
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


def _error_param(raw: bytes) -> str | None:
    data = _parse(raw)
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        param = data["error"].get("param")
        return str(param) if param is not None else None
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

