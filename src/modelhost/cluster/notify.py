"""LISTEN for the model changes (and unloads) the other gateways commit, on a connection of
its own.

A thread waits on the connection (`Connection.notifies`, woken at least twice a second to
see whether it should stop) and hands each payload to the event loop. When the connection
breaks, it connects again every second; notifications sent meanwhile are lost, so after a
reconnection the callback is called with None: re-read every model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from modelhost.db.workers import CHANNEL, Change, parse_payload

log = logging.getLogger(__name__)

RECONNECT_S = 1.0

# A notification (model, gateway, kind: `db.workers.Change`), or None: re-read everything.
OnNote = Callable[[Change | None], None]
# A spec change another gateway made (model, gateway), or None: re-read every model.
OnChange = Callable[[tuple[str, str] | None], None]


class ChangeListener:
    def __init__(self, conninfo: str, on_change: OnNote,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._conninfo = conninfo
        self._on_change = on_change
        self._loop = loop
        self._stopping = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelhost-listen",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _tell(self, change: Change | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_change, change)
        except RuntimeError:  # the loop is closed: the gateway is stopping
            self._stopping.set()

    def _run(self) -> None:
        import psycopg  # only here: a SQLite gateway needs no psycopg

        first = True
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True,
                                     application_name="modelhost-listen") as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if not first:
                        log.info("listening to model changes again: re-reading every model")
                        self._tell(None)
                    first = False
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=0.5):
                            change = parse_payload(note.payload)
                            if change is not None:
                                self._tell(change)
                    self.listening.clear()  # stopped
            except psycopg.Error as exc:
                self.listening.clear()
                if not self._stopping.is_set():
                    log.error("the connection listening to model changes broke: %s; "
                              "connecting again", exc)
                    self._stopping.wait(RECONNECT_S)
                    first = False
