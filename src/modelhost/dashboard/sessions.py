"""Dashboard sessions: server-side, in the state database, behind an HttpOnly,
SameSite=Strict cookie.

A session is made when an admin key signs in (docs/dashboard.md). Its id is 256 random bits
(`secrets.token_urlsafe(32)`), the only thing the browser holds. The `dashboard_sessions`
table keeps, per session, the SHA-256 of that id (so the table alone opens no session), the
id of the admin key it was opened with (`auth.key_id`: never the key), its CSRF token, and
when it was opened and last seen. The gateway maps the key's id back to its own configured
admin key to make the dashboard's calls to the admin API (`bridge.Bridge`), so a key removed
from the configuration ends its sessions, and the page never sees a key. Each session's CSRF
token is sent back by every state-changing request (a form field or `X-CSRF-Token`) and
compared in constant time.

Every gateway sharing the database knows every session: one opened on a gateway works on
the others behind a load balancer, and a restart signs nobody out. Sessions expire
`IDLE_SECONDS` after their last use and `MAX_SECONDS` after sign-in, whichever comes first;
at most `MAX_SESSIONS` exist (a sign-in past it ends the least recently used one), and
each sign-in deletes the expired rows.

The database calls run in a thread (`Persistence.at_once`), never on the event loop. A
session read is kept `CACHE_SECONDS` (a second) in memory, so a page's burst of calls reads
the table once; a sign-out deletes the row, and so ends the session on every gateway within
that second (at once on the gateway that took it). The last use is written at most every
`TOUCH_SECONDS`, in the background.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from modelhost.auth import key_id
from modelhost.db.sessions import SessionRow

if TYPE_CHECKING:
    from modelhost.persistence import Persistence

log = logging.getLogger(__name__)

COOKIE = "modelhost_session"
IDLE_SECONDS = 8 * 3600.0
MAX_SECONDS = 24 * 3600.0
MAX_SESSIONS = 1000  # past it, the least recently used is dropped: sign-ins cannot fill a disk
CACHE_SECONDS = 1.0
TOUCH_SECONDS = 60.0


@dataclass
class Session:
    key: str | None  # the admin key it was opened with (None: no keys configured)
    actor: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.time)

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and secrets.compare_digest(
            presented.encode(), self.csrf.encode())


def digest(sid: str) -> str:
    """The stored name of a session id: its SHA-256, in hex."""
    return hashlib.sha256(sid.encode("utf-8", "replace")).hexdigest()


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class Sessions:
    """The sessions of the dashboard, kept by `persistence()` (looked up when first used,
    so that a dashboard can be built before its gateway's database is open)."""

    def __init__(self, persistence: Callable[[], Persistence | None],
                 admin_keys: Iterable[str], idle: float = IDLE_SECONDS,
                 longest: float = MAX_SECONDS, cap: int = MAX_SESSIONS) -> None:
        self.persistence = persistence
        self.idle = idle
        self.longest = longest
        self.cap = cap
        self._keys = {key_id(key): key for key in admin_keys}
        # id digest -> (when read, the session or None: a known absence).
        self._cache: dict[str, tuple[float, Session | None]] = {}

    def _store(self) -> Persistence | None:
        persistence = self.persistence()
        return persistence if persistence is not None and persistence.store is not None \
            else None

    async def open(self, key: str | None, actor: str) -> tuple[str, Session]:
        """A new session for `key`, stored before this returns (the next request may reach
        another gateway). Raises what the database raised."""
        persistence = self._store()
        if persistence is None:
            raise RuntimeError("the state database is not open")
        sid = secrets.token_urlsafe(32)
        session = Session(key, actor)
        now = session.created
        row = SessionRow(digest(sid), key_id(key) if key is not None else None, actor,
                         session.csrf, _at(now), _at(now))
        seen_before, created_before = _at(now - self.idle), _at(now - self.longest)
        await persistence.at_once(lambda store: store.open_dashboard_session(
            row, self.cap, seen_before, created_before))
        self._remember(row.id_hash, session)
        return sid, session

    async def get(self, sid: str | None) -> Session | None:
        """The live session of a cookie's id, or None (unknown, expired, signed out, its key
        no longer configured, or the database unreachable)."""
        if not sid:
            return None
        id_hash = digest(sid)
        now = time.time()
        cached = self._cache.get(id_hash)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            session = cached[1]
        else:
            session = await self._read(id_hash)
            self._remember(id_hash, session)
        if session is None:
            return None
        if now - session.seen > self.idle or now - session.created > self.longest:
            await self._end(id_hash, quietly=True)
            return None
        if now - session.seen > TOUCH_SECONDS:
            session.seen = now
            persistence = self._store()
            if persistence is not None:
                persistence.later(lambda store: store.touch_dashboard_session(
                    id_hash, _at(now)))
        return session

    async def _read(self, id_hash: str) -> Session | None:
        persistence = self._store()
        if persistence is None:
            return None
        try:
            row: SessionRow | None = await persistence.at_once(
                lambda store: store.dashboard_session(id_hash))
        except Exception as exc:  # the database is away: no session meanwhile
            log.warning("cannot read a dashboard session: %s", exc)
            return None
        if row is None:
            return None
        key = None
        if row.key_id is not None:
            key = self._keys.get(row.key_id)
            if key is None:  # its key is no longer an admin key here
                log.info("dashboard session of %s ended: its key is not configured",
                         row.key_id)
                await self._end(id_hash, quietly=True)
                return None
        return Session(key, row.actor, row.csrf, row.created_at.timestamp(),
                       row.seen_at.timestamp())

    async def close(self, sid: str | None) -> None:
        """Sign out: the session ends on every gateway (on the others within
        `CACHE_SECONDS`)."""
        if sid:
            await self._end(digest(sid))

    async def _end(self, id_hash: str, quietly: bool = False) -> None:
        """Delete a session's row (`quietly`: a failure is logged, the row left to the
        next sweep; else raised)."""
        self._cache[id_hash] = (time.monotonic(), None)
        persistence = self._store()
        if persistence is None:
            return
        try:
            await persistence.at_once(lambda store: store.close_dashboard_session(id_hash))
        except Exception as exc:
            if not quietly:
                raise
            log.warning("cannot delete an ended dashboard session: %s", exc)

    def _remember(self, id_hash: str, session: Session | None) -> None:
        if len(self._cache) >= self.cap:
            now = time.monotonic()
            for stale in [h for h, (t, _) in self._cache.items() if now - t >= CACHE_SECONDS]:
                del self._cache[stale]
            if len(self._cache) >= self.cap:
                self._cache.clear()
        self._cache[id_hash] = (time.monotonic(), session)

