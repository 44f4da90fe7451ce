"""The audit log of the admin API: every state-changing admin request, recorded.

`AuditLog` is an ASGI middleware around the FastAPI app. For each POST, PUT or DELETE (or
PATCH, which no route takes) under `/api/admin` that reaches the app (that is, that passed
`front.Front.gate`'s key check), it records, once the answer has been sent: when it was asked,
which key asked (`KeyGuard.actor`: the key's id, never the key), the client's address, the
method and path, the action and the model it is about (read from the method and path, as the
admin routes match them), the status and the outcome (`ok`, or the error's code), and a few
safe details. Requests that the key check refuses (401, 403) never get here and are not
recorded: a client without a key could otherwise fill the database (the access log, when on,
has them).

Why a middleware rather than a call in each route: it sees every answer, including the ones
no route wrote (a 413 of `AdminBodyLimit`, a 400 of a bad body, a 404 or 405), and its status
as sent. The entry is queued on the state database's writer (`Persistence.later`), so the
answer never waits on the disk; a failed write is logged and the gateway keeps serving. With
`MODELHOST_AUDIT_RETENTION_DAYS`, older entries are deleted the same way, at most once an hour,
when an entry is recorded (an admin action is rare: no timer for it).

What is never recorded: a request body (the token of `PUT /token`, a spec's secrets). Only
`gpu_device_ids` of a load is read from the body (integers). The query parameters are kept,
a parameter whose name says it is secret masked; an error's message goes through the
gateway's scrubber, which knows every configured secret.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import timedelta
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modelhost.auth import KeyGuard, acting
from modelhost.db.audit import AuditEntry
from modelhost.db.schema import utcnow
from modelhost.gateway import Gateway
from modelhost.redaction import MASK, secret_name

log = logging.getLogger(__name__)

PREFIX: Final = "/api/admin"
MODELS: Final = PREFIX + "/models/"
RECORDED_METHODS: Final = frozenset({"POST", "PUT", "DELETE", "PATCH"})
# How often, at most, entries past MODELHOST_AUDIT_RETENTION_DAYS are deleted.
PRUNE_EVERY_S: Final = 3600.0
# How much of a load's body and of an error answer is read for the details.
PEEK_BYTES: Final = 8192

# (method, suffix after the model id) -> action, in the order the admin routes match.
_MODEL_ACTIONS: Final = {
    "POST": (("/download", "download.start"), ("/load", "model.load"),
             ("/unload", "model.unload"), ("/rollback", "model.rollback")),
    "DELETE": (("/download", "download.cancel"), ("/cache", "cache.delete")),
}
_WHOLE_MODEL: Final = {"PUT": "model.put", "DELETE": "model.delete"}
_OTHER: Final = {("PUT", PREFIX + "/token"): "token.set",
                 ("DELETE", PREFIX + "/token"): "token.delete",
                 ("POST", PREFIX + "/reload"): "models.reload"}


def action_of(method: str, path: str) -> tuple[str, str | None]:
    """The action a state-changing admin request asks for and the model it is about:
    `("model.load", "m")`; `("unknown", None)` for a path no admin route takes."""
    other = _OTHER.get((method, path))
    if other is not None:
        return other, None
    if path.startswith(MODELS) and len(path) > len(MODELS):
        rest = path[len(MODELS):]
        for suffix, action in _MODEL_ACTIONS.get(method, ()):
            if rest.endswith(suffix) and len(rest) > len(suffix):
                return action, rest[:-len(suffix)]
        whole = _WHOLE_MODEL.get(method)
        if whole is not None:
            return whole, rest
    return "unknown", None


def query_detail(raw: bytes) -> dict[str, Any]:
    """A query string as the audit log keeps it: at most 20 parameters, a parameter whose
    name says it is secret (`token`, `api_key`...) masked."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    return {name: MASK if secret_name(name) else value for name, value in pairs[:20]}


class AuditLog:
    """Records the state-changing requests under /api/admin (see the module's docstring)."""

    def __init__(self, app: ASGIApp, gateway: Gateway, guard: KeyGuard) -> None:
        self.app = app
        self.gateway = gateway
        self.guard = guard
        days = gateway.settings.audit_retention_days
        self.retention = timedelta(days=days) if days > 0 else None
        self._pruned = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in RECORDED_METHODS
                or not (scope["path"] == PREFIX or scope["path"].startswith(PREFIX + "/"))):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        action, target = action_of(method, path)
        at, started = utcnow(), time.monotonic()
        keep_body = action == "model.load"
        body = bytearray()
        answer = bytearray()
        status = 0

        async def receive_peeking() -> Message:
            message = await receive()
            if keep_body and message["type"] == "http.request" and len(body) < PEEK_BYTES:
                body.extend(message.get("body", b"")[:PEEK_BYTES - len(body)])
            return message

        async def send_peeking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (message["type"] == "http.response.body" and status >= 400
                  and len(answer) < PEEK_BYTES):
                answer.extend(message.get("body", b"")[:PEEK_BYTES - len(answer)])
            await send(message)

        crashed = False
        acting.set(self.guard.actor(_authorization(scope)))  # this task's: the history's actor
        try:
            await self.app(scope, receive_peeking, send_peeking)
        except Exception:  # answered 500 by the app's last handler, outside this one
            crashed = True
            raise
        finally:
            if status == 0 and crashed:
                status, answer[:] = 500, b'{"error": {"type": "server_error"}}'
            try:
                self._record(scope, action, target, at, started, status, bytes(body),
                             bytes(answer))
            except Exception:  # the audit log never breaks an answer
                log.exception("could not record the audit entry of %s %s", method, path)

    def _record(self, scope: Scope, action: str, target: str | None, at: Any,
                started: float, status: int, body: bytes, answer: bytes) -> None:
        raw = _authorization(scope)
        client = scope.get("client")
        detail: dict[str, Any] = {"duration_ms": round((time.monotonic() - started) * 1000)}
        if scope.get("query_string"):
            detail["query"] = query_detail(scope["query_string"])
        if body:
            try:
                gpus = json.loads(body).get("gpu_device_ids")
            except (ValueError, AttributeError):
                gpus = None
            if isinstance(gpus, list) and all(type(g) is int for g in gpus):
                detail["gpu_device_ids"] = gpus[:64]
        outcome = "ok"
        if status == 0:  # the app ended without answering (the client went away)
            outcome = "no_answer"
        elif status >= 400:
            outcome = f"http_{status}"
            try:
                error = json.loads(answer)["error"]
                outcome = str(error.get("code") or error.get("type") or outcome)
                detail["error"] = self.gateway.scrub(str(error.get("message", "")))
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        entry = AuditEntry(actor=self.guard.actor(raw), method=scope["method"],
                           path=scope["path"], action=action, target=target,
                           client=f"{client[0]}:{client[1]}" if client else None,
                           status=status, outcome=outcome, detail=detail, at=at)
        persistence = self.gateway.persistence
        if persistence.store is None:
            log.warning("audit entry not recorded, the state database is not open: %s", entry)
            return
        persistence.later(lambda store: store.record_audit(entry))
        now = time.monotonic()
        if self.retention is not None and now - self._pruned >= PRUNE_EVERY_S:
            self._pruned = now
            cutoff = utcnow() - self.retention
            persistence.later(lambda store: store.prune_audit(cutoff))


def _authorization(scope: Scope) -> bytes | None:
    """The request's first Authorization header (the one the gate judged)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return bytes(value)
    return None
