"""The API key guard: pure ASGI middleware in front of the guarded routes.

Keys are kept only as SHA-256 digests and compared with `secrets.compare_digest`, against
every configured key, so neither a key's content nor its length leaks through timing.
"""

from __future__ import annotations

import hashlib
import json
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from modelhost.errors import Unauthorized


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], prefixes: tuple[str, ...] = ("/v1",)
                 ) -> None:
        self.app = app
        self.digests = [digest(k) for k in keys]
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.digests and scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            error = self._check(scope)
            if error is not None:
                body = json.dumps(error.body()).encode()
                await send({"type": "http.response.start", "status": error.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> Unauthorized | None:
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        presented = digest(token.strip())
        ok = False
        for known in self.digests:
            ok |= secrets.compare_digest(presented, known)
        return None if ok else Unauthorized("Incorrect API key provided.")
