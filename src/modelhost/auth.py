"""The API key guard: pure ASGI middleware in front of the guarded routes.

Keys are kept only as BLAKE2s-256 digests and compared with `secrets.compare_digest`, against
every configured key, so neither a key's content nor its length leaks through timing. (BLAKE2s
rather than SHA-256: `hashlib.sha256` goes through OpenSSL 3's provider lookup on every call,
about 9 µs per request on a cold cache against 5.5 µs; docs/benchmarks.md.)
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.asgi import Answer, error_answer
from modelhost.errors import Unauthorized


def digest(key: bytes) -> bytes:
    return hashlib.blake2s(key).digest()


class KeyGuard:
    """Checks a request's bearer key against the configured keys (none configured: open)."""

    def __init__(self, keys: list[str]) -> None:
        self.digests = [digest(k.encode()) for k in keys]
        # Digests of the exact header most clients send, to skip parsing it.
        self.exact = [digest(b"Bearer " + k.encode()) for k in keys]

    def check(self, headers: Iterable[tuple[bytes, bytes]]) -> Unauthorized | None:
        """None when the request's headers (lower-case names) carry a known key."""
        if not self.digests:
            return None
        raw = b""
        for name, value in headers:
            if name == b"authorization":
                raw = bytes(value)
                break
        presented = digest(raw)
        ok = False
        for known in self.exact:
            ok |= secrets.compare_digest(presented, known)
        if ok:
            return None
        scheme, _, token = raw.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = digest(token.strip().encode("latin-1"))
        ok = False
        for known in self.digests:
            ok |= secrets.compare_digest(presented, known)
        return None if ok else Unauthorized("Incorrect API key provided.")

    def refusal(self, error: Unauthorized) -> Answer:
        return error_answer(error, {"WWW-Authenticate": "Bearer"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, guard: KeyGuard, prefixes: tuple[str, ...] = ("/v1",)
                 ) -> None:
        self.app = app
        self.guard = guard
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            error = self.guard.check(scope["headers"])
            if error is not None:
                await self.guard.refusal(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
