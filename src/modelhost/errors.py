"""One exception tree, one error envelope.

Every error a client sees has the OpenAI shape::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

    ModelhostError                  500 server_error
    ├── InvalidRequest              400 invalid_request_error (malformed JSON, bad fields)
    ├── Unauthorized                401 authentication_error
    ├── Forbidden                   403 permission_error (wrong role, foreign Origin)
    ├── NotFound                    404 invalid_request_error
    │   └── ModelNotFound           404 code=model_not_found
    ├── RequestTooLarge             413 invalid_request_error
    ├── MisdirectedRequest          421 invalid_request_error (Host not allowed)
    ├── Overloaded                  429 rate_limit_error, Retry-After
    ├── UpstreamError               502 upstream_error: the worker failed, not the gateway
    ├── ModelNotReady               503 service_unavailable, Retry-After
    └── ServiceUnavailable          503 service_unavailable, Retry-After (the gateway stops)

A pydantic validation error (a request body, a model spec, a models file, a stored spec) is
told in one way, `validation_message` (or `validation_problems` for a layout of one's own):
each error as `field.path: message`, without the input values (a spec's secrets, a key).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from typing import Any


class ModelhostError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(ModelhostError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ModelhostError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ModelhostError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ModelhostError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTooLarge(ModelhostError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class MisdirectedRequest(ModelhostError):
    status = 421
    type = "invalid_request_error"
    code = "host_not_allowed"


class Overloaded(ModelhostError):
    status = 429
    type = "rate_limit_error"
    code = "model_overloaded"


class UpstreamError(ModelhostError):
    status = 502
    type = "upstream_error"
    code = "worker_error"


class ModelNotReady(ModelhostError):
    status = 503
    type = "service_unavailable"
    code = "model_not_ready"


class ServiceUnavailable(ModelhostError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse_error_event(error: ModelhostError) -> bytes:
    """The last event of a stream that failed after it started (status is already sent)."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


Location = tuple[str | int, ...]


def validation_problems(errors: Iterable[Mapping[str, Any]], drop: Collection[str] = ()
                        ) -> list[tuple[Location, str]]:
    """Each error of a pydantic validation (`exc.errors()`) as (location, message): the
    location less its parts in `drop` (the tags pydantic adds inside a union, FastAPI's
    "body"), the message less pydantic's "Value error, " prefix. Never the input value."""
    return [(tuple(part for part in error.get("loc", ()) if part not in drop),
             str(error.get("msg", "")).removeprefix("Value error, ")) for error in errors]


def dotted(location: Location) -> str:
    """A location as a field path: `source.hf`, `messages.0.content`."""
    return ".".join(str(part) for part in location)


def validation_message(errors: Iterable[Mapping[str, Any]], drop: Collection[str] = (),
                       whole: str = "") -> tuple[str, str | None]:
    """The errors of a pydantic validation as one message, `path: message; path: message`
    (`whole` stands for the path of an error about the whole input), and the first error's
    path (None when it is the whole input): an `InvalidRequest`'s message and `param`."""
    problems = validation_problems(errors, drop)
    message = "; ".join(f"{dotted(location) or whole}: {text}" for location, text in problems)
    first = dotted(problems[0][0]) if problems else ""
    return message, first or None
