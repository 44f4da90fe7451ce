"""The dashboard's way into the admin API and /v1: the same routes, called in process.

The page never holds an API key. Its calls go to `/ui/api/...` and `/ui/v1/...` with the
session cookie; `Bridge` checks the session (and, for a state-changing method, its CSRF
token), then hands the request, unbuffered, to the gateway's own app under `/api/admin/...`
or `/v1/...` with the session's admin key in `Authorization`. Everything the API does for a
client (validation, errors in the OpenAI envelope, the audit log under the key's id, the
relay's streaming and limits, usage counted under that key) is therefore what the dashboard
gets, with no second implementation. The browser's own cookie, Origin and CSRF headers stay
behind: the API sees a plain client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.dashboard.sessions import Session
from modelhost.errors import Forbidden, ModelhostError, Unauthorized
from modelhost.serving.answers import error_answer

SAFE = frozenset(("GET", "HEAD", "OPTIONS"))
# Request headers that belong to the browser's session with the dashboard, not to the API.
DROPPED = frozenset((b"cookie", b"authorization", b"origin", b"referer", b"x-csrf-token",
                     b"sec-fetch-site", b"sec-fetch-mode", b"sec-fetch-dest"))
# The scope's keys an inner request keeps (the server's, not the outer route's).
KEPT = ("type", "asgi", "http_version", "method", "scheme", "query_string", "client",
        "server", "state", "extensions")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def session_required() -> ModelhostError:
    return Unauthorized("Sign in to the dashboard first (its session has ended or is "
                        "missing).", code="session_required")


def csrf_failed() -> ModelhostError:
    return Forbidden("The dashboard's CSRF token is missing or wrong: reload the page.",
                     code="csrf_failed")


class Bridge:
    """An ASGI endpoint serving `outer` + rest as `inner` + rest on `target()`."""

    def __init__(self, outer: str, inner: str,
                 session: Callable[[Scope], Awaitable[Session | None]],
                 target: Callable[[], ASGIApp]) -> None:
        self.outer = outer
        self.inner = inner
        self.session = session
        self.target = target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = await self.session(scope)
        error: ModelhostError | None = None
        if session is None:
            error = session_required()
        elif scope["method"] not in SAFE and not session.csrf_ok(
                header(scope, b"x-csrf-token")):
            error = csrf_failed()
        if error is not None:
            await error_answer(error)(scope, receive, send)
            return
        assert session is not None
        path = self.inner + scope["path"][len(self.outer):]
        headers = [(k, v) for k, v in scope["headers"] if k not in DROPPED]
        if session.key is not None:
            headers.append((b"authorization", b"Bearer " + session.key.encode("latin-1")))
        inner: Scope = {k: scope[k] for k in KEPT if k in scope}
        inner.update(path=path, raw_path=path.encode("utf-8"), root_path="", headers=headers)
        await self.target()(inner, receive, send)
