"""API keys and their two roles (docs/security.md).

Inference keys (`OPENAI_API_KEYS`) call `/v1`; admin keys (`MODELHOST_ADMIN_KEYS`) call the
admin API (`/api/admin`, `/metrics`) and `/v1` too. With no key configured at all the server is a
single-user development server and every route is open (the Host and Origin checks of
`front.Front.gate` still apply). With inference keys but no admin key, nobody may call the
admin API.

Keys are kept only as BLAKE2s-256 digests and compared with `secrets.compare_digest`, against
every configured key of both roles, so neither a key's content, its length nor its role leaks
through timing. (BLAKE2s rather than SHA-256: `hashlib.sha256` goes through OpenSSL 3's provider
lookup on every call, about 9 µs per request on a cold cache against 5.5 µs;
docs/benchmarks.md.)
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from contextvars import ContextVar

from modelhost.errors import Forbidden, ModelhostError, Unauthorized
from modelhost.serving.answers import Answer, error_answer

# Who the admin request being served acts for (its key's id, `KeyGuard.actor`), set by the
# audit middleware for the request's task: what the gateway writes in a model's history.
acting: ContextVar[str] = ContextVar("acting", default="admin-api")

# What a request's Authorization header proves (`KeyGuard.role`): bit flags, a key listed in
# both settings has both.
MISSING = 0  # no header, or not `Bearer <token>`
WRONG = -1  # a bearer token that is no configured key
INFERENCE = 1
ADMIN = 2

ANONYMOUS = "anonymous"  # the audit log's actor when no key is configured (or sent)

ADMIN_PREFIXES = ("/api/admin", "/metrics")
INFERENCE_PREFIXES = ("/v1",)

NO_ADMIN_KEY = ("The admin API is disabled: API keys are configured but no admin key. "
                "Set MODELHOST_ADMIN_KEYS and send 'Authorization: Bearer <admin key>'.")
NOT_ADMIN = ("This API key may not call the admin API: it needs an admin key "
             "(MODELHOST_ADMIN_KEYS).")


def digest(key: bytes) -> bytes:
    return hashlib.blake2s(key).digest()


def key_id(key: str | bytes) -> str:
    """A key's public name in the audit log and usage (docs/security.md): `key-` and the
    first 12 hex digits of the SHA-256 of its bytes (a str: UTF-8, as configured). The same
    key always has the same id."""
    raw = key.encode() if isinstance(key, str) else key
    return "key-" + hashlib.sha256(raw).hexdigest()[:12]


def route_role(path: str) -> int:
    """The role a path needs: ADMIN, INFERENCE, or MISSING (none: health, docs, 404s).
    Prefixes are matched as strings, so `/v1x` or `/api/adminx` need the key too."""
    if path.startswith(INFERENCE_PREFIXES):
        return INFERENCE
    if path.startswith(ADMIN_PREFIXES):
        return ADMIN
    return MISSING


class KeyGuard:
    """Checks a request's bearer key against the configured keys of both roles."""

    def __init__(self, keys: Iterable[str], admin_keys: Iterable[str] = ()) -> None:
        inference = [k.encode() for k in keys]
        admin = [k.encode() for k in admin_keys]
        # No key at all: a development server, open (on loopback: see `cli.serve`).
        self.open = not inference and not admin
        self.admin_configured = bool(admin)
        self.digests = [(digest(k), INFERENCE) for k in inference]
        self.digests += [(digest(k), ADMIN) for k in admin]
        # Digests of the exact header most clients send, to skip parsing it.
        self.exact = [(digest(b"Bearer " + k), INFERENCE) for k in inference]
        self.exact += [(digest(b"Bearer " + k), ADMIN) for k in admin]

    def role(self, raw: bytes | None) -> int:
        """What an Authorization header value proves: MISSING, WRONG, or the roles of its
        key (INFERENCE | ADMIN bits). Every configured key is compared, whatever matches."""
        raw = raw or b""
        presented = digest(raw)
        found = 0
        for known, role in self.exact:
            found |= role * secrets.compare_digest(presented, known)
        if found:
            return found
        scheme, _, token = raw.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return MISSING
        presented = digest(token.encode("latin-1"))
        for known, role in self.digests:
            found |= role * secrets.compare_digest(presented, known)
        return found or WRONG

    def judge(self, raw: bytes | None, needed: int) -> ModelhostError | None:
        """The refusal of a request that needs role `needed` (INFERENCE or ADMIN; MISSING:
        none) and sent Authorization value `raw`, or None."""
        if self.open or needed == MISSING:
            return None
        if needed == ADMIN and not self.admin_configured:
            return Forbidden(NO_ADMIN_KEY, code="admin_disabled")
        role = self.role(raw)
        if role == MISSING:
            return Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        if role == WRONG:
            return Unauthorized("Incorrect API key provided.")
        if needed == ADMIN and not role & ADMIN:
            return Forbidden(NOT_ADMIN, code="admin_key_required")
        return None

    def check(self, headers: Iterable[tuple[bytes, bytes]], needed: int = INFERENCE
              ) -> ModelhostError | None:
        """None when the request's headers (lower-case names) carry a key of the role
        `needed`; the first Authorization header is the one that counts."""
        if self.open:
            return None
        raw = None
        for name, value in headers:
            if name == b"authorization":
                raw = bytes(value)
                break
        return self.judge(raw, needed)

    def actor(self, raw: bytes | None) -> str:
        """Who sent Authorization value `raw`, as the audit log names them: the id of the
        bearer key (`key_id`), or `anonymous` (no key configured, or none sent)."""
        scheme, _, token = (raw or b"").decode("latin-1").partition(" ")
        token = token.strip()
        if self.open or scheme.lower() != "bearer" or not token:
            return ANONYMOUS
        return key_id(token.encode("latin-1"))  # the header's own bytes

    def refusal(self, error: ModelhostError) -> Answer:
        if isinstance(error, Unauthorized):
            return error_answer(error, {"WWW-Authenticate": "Bearer"})
        return error_answer(error)
