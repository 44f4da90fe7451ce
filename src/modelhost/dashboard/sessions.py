"""Dashboard sessions: server-side, in memory, behind an HttpOnly, SameSite=Strict cookie.

A session is made when an admin key signs in (docs/dashboard.md). Its id is 256 random bits
(`secrets.token_urlsafe(32)`), the only thing the browser holds; the key it was opened with
stays here, so that the dashboard's calls to the admin API carry it without the page ever
seeing it. Each session has its own CSRF token, sent back by every state-changing request
(a form field or the `X-CSRF-Token` header) and compared in constant time.

Sessions expire after `IDLE_SECONDS` without use and `MAX_SECONDS` after sign-in, whichever
comes first; a restart of the gateway ends them all (they are not stored).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

COOKIE = "modelhost_session"
IDLE_SECONDS = 8 * 3600.0
MAX_SECONDS = 24 * 3600.0
MAX_SESSIONS = 1000  # past it, the oldest is dropped: sign-ins cannot exhaust memory


@dataclass
class Session:
    key: str | None  # the admin key it was opened with (None: no keys configured)
    actor: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and secrets.compare_digest(
            presented.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, idle: float = IDLE_SECONDS, longest: float = MAX_SECONDS) -> None:
        self.idle = idle
        self.longest = longest
        self._by_id: dict[str, Session] = {}

    def open(self, key: str | None, actor: str) -> tuple[str, Session]:
        self._sweep()
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        sid = secrets.token_urlsafe(32)
        session = self._by_id[sid] = Session(key, actor)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self.idle or now - session.created > self.longest:
            del self._by_id[sid]
            return None
        session.seen = now
        return session

    def close(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._by_id.items()
                    if now - v.seen > self.idle or now - v.created > self.longest]:
            del self._by_id[sid]

    def __len__(self) -> int:
        return len(self._by_id)
