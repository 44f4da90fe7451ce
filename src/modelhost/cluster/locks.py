"""PostgreSQL session-level advisory locks, held on a connection of their own.

A session-level lock lasts until it is unlocked or its session ends: when a gateway dies
(even `kill -9`: the kernel closes its socket), PostgreSQL ends the session and releases every
lock it held, and another gateway's `pg_try_advisory_lock` succeeds. The locks are held on a
dedicated connection, not one of the store's pool, whose connections come and go.

Locks are re-entrant in PostgreSQL (a session that takes a lock twice must unlock it twice):
here each key is taken once and counted (`take`/`give`), so that two holders in one gateway
(a rollout's two versions of a model) share it. When the connection breaks, every lock is
lost at once: `epoch` moves on, and holders from the earlier epoch must stop what the lock
guarded (their `give` is then a no-op).

Calls are synchronous and short; the gateway makes them in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when first used: a SQLite gateway needs no psycopg
    import psycopg

log = logging.getLogger(__name__)


def _database_errors() -> type[Exception]:
    import psycopg

    return psycopg.Error


def lock_key(kind: str, name: str) -> int:
    """The 64-bit key of a lock (`kind`: `model` or `download`), the same in every gateway."""
    digest = hashlib.blake2b(f"modelhost:{kind}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class AdvisoryLocks:
    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.Connection[Any] | None = None
        self._mutex = threading.Lock()
        self._counts: dict[int, int] = {}
        self.epoch = 0

    def _connection(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._conninfo, autocommit=True,
                                         application_name="modelhost-locks")
        return self._conn

    def _broken(self, exc: BaseException) -> None:
        """The session is gone, and every lock with it."""
        if self._counts:
            log.error("the advisory-lock connection broke (%s): %d lock(s) lost", exc,
                      len(self._counts))
        self._counts.clear()
        self.epoch += 1
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL process of the lock session (None before the first lock)."""
        conn = self._conn
        return conn.info.backend_pid if conn is not None and not conn.closed else None

    def take(self, key: int) -> int | None:
        """Take the lock without waiting: the epoch it was taken in, or None when another
        session holds it (or the database cannot be reached)."""
        with self._mutex:
            if key in self._counts:
                self._counts[key] += 1
                return self.epoch
            try:
                row = self._connection().execute("SELECT pg_try_advisory_lock(%s)",
                                                 (key,)).fetchone()
            except _database_errors() as exc:
                self._broken(exc)
                return None
            if row is None or not row[0]:
                return None
            self._counts[key] = 1
            return self.epoch

    def give(self, key: int, epoch: int) -> None:
        """Give back a lock taken in `epoch` (nothing when that epoch is over)."""
        with self._mutex:
            if epoch != self.epoch or key not in self._counts:
                return
            self._counts[key] -= 1
            if self._counts[key] > 0:
                return
            del self._counts[key]
            try:
                self._connection().execute("SELECT pg_advisory_unlock(%s)", (key,))
            except _database_errors() as exc:
                self._broken(exc)

    def free(self, key: int) -> bool:
        """Whether no session holds the lock now (taken and given back at once; False
        when this gateway holds it, or the database cannot be reached)."""
        with self._mutex:
            if key in self._counts:
                return False
            try:
                conn = self._connection()
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                if row is None or not row[0]:
                    return False
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                return True
            except _database_errors() as exc:
                self._broken(exc)
                return False

    def check(self) -> int:
        """Ask the session whether it is alive (a broken one loses every lock); returns the
        epoch."""
        with self._mutex:
            if self._conn is not None:
                try:
                    self._conn.execute("SELECT 1")
                except _database_errors() as exc:
                    self._broken(exc)
            return self.epoch

    def close(self) -> None:
        with self._mutex:
            self._counts.clear()
            self.epoch += 1
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()  # the session ends: PostgreSQL releases every lock
                self._conn = None
