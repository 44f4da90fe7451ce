"""What a client is told when a worker fails it: one OpenAI-shaped error per way a relayed call
can fail, and the worker's own error passed on where it judged the request.

- The worker answered an error status: a 4xx other than 401/403/404 is the client's fault (a
  context too long, a bad parameter), so the client sees the worker's status, message, `param`
  and `code`; anything else is a 502 naming the model.
- The exchange failed once sent (`failed_while_answering`): 504 for a deadline
  (`request_timeout`, `idle_timeout`), 502 naming `max_answer_bytes` for an answer too large,
  a generic 502 otherwise.
- What a client is told names no internal address: the detail (the worker's address, the
  exception) goes to the log.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from modelhost.errors import InvalidRequest, ModelhostError, UpstreamError
from modelhost.registry.model import Model
from modelhost.upstream import Abandoned, AnswerTooLarge, UpstreamResponse, UpstreamTimeout

log = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 1024 * 1024  # an error answer's body is read up to this (for its message)


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


def failed_while_answering(model: Model, exc: BaseException) -> UpstreamError:
    """What the client is told of an exchange that failed once sent: 504 for a timeout, 502
    naming the limit for an answer too large, a generic 502 otherwise (the detail, which may
    name an internal address, is logged)."""
    name = model.spec.id
    if isinstance(exc, UpstreamTimeout):
        return timed_out(model, exc)
    if isinstance(exc, Abandoned):  # nobody will read this answer
        log.info("model %s: the client went away; the worker was told to stop", name)
        return UpstreamError(f"worker of '{name}' failed while answering")
    if isinstance(exc, AnswerTooLarge):
        log.warning("model %s: answer cut off past max_answer_bytes (%d)", name, exc.limit)
        return AnswerTooLargeError(
            f"the answer of '{name}' exceeds the gateway's limit of {exc.limit} bytes for a "
            f"non-streamed answer (max_answer_bytes); ask for a stream, or a smaller answer")
    log.warning("model %s: worker failed while answering: %s", name, describe(exc))
    return UpstreamError(f"worker of '{name}' failed while answering")


def timed_out(model: Model, exc: UpstreamTimeout) -> GatewayTimeout:
    name = model.spec.id
    log.warning("model %s: %s", name, exc)
    if exc.idle:
        return GatewayTimeout(f"worker of '{name}' sent nothing for {exc.seconds:g} s "
                              f"(idle_timeout)")
    return GatewayTimeout(f"worker of '{name}' did not answer within {exc.seconds:g} s "
                          f"(request_timeout)")


async def upstream_failure(model: Model, resp: UpstreamResponse
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


def address(base: str) -> str:
    """A worker's host and port, for the log (never a URL's credentials or path)."""
    parts = urlsplit(base)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname}:{port}" if port else str(parts.hostname)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

