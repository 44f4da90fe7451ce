"""The gateway's logs: where they go, how a line looks, and which request a line is about.

`setup_logging(settings)` sends every logger (uvicorn's included: the CLI starts uvicorn with
`log_config=None`, so its loggers propagate here) to stderr and to the rotating file
`LOG_DIR/LOG_FILE_NAME`, both in one format (docs/operations.md, "Logs"):

* `text`: `2026-12-06 02:05:35,123 INFO    modelhost.gateway: message [req=<id>]`, the seed's
  line, with the request id when the line is about a request;
* `json`: one object a line, `{"time", "level", "logger", "message"}` plus `request_id`,
  `model` (a record's `extra={"model": ...}`) and `exc_info` (the traceback) when there is
  one. JSON escapes line breaks, so a message holding client text cannot forge a line.

The request id lives in the context variable `request_id`: the serving layer binds it for
the request it handles (`bind_request_id`, `reset_request_id`), and asyncio copies it into
every task started from there, so `RequestIdFilter` (on both handlers) finds it for every
line logged on the request's behalf, from any module, without passing it around. Filters on
handlers rather than a log-record factory: the work is done for the lines written, not for
every record created and dropped by its level. Where to bind it: in the task that serves the
request (a task's context is its own copy, so `request_id.set(rid)` at its start needs no
reset), or in a context given to `loop.create_task(..., context=ctx)`; never in a protocol
callback outside a task (`data_received`), which runs in the loop's own context and would
label the requests that follow. `asyncio.to_thread` carries the id into its thread;
`loop.run_in_executor` does not.

The id itself (the client's `X-Request-ID` when sane, else one made) comes from
`modelhost.requestid`, as bytes: it may be bound as bytes, so that no request pays for a
decode; the filter decodes it for the lines actually written.

`RotatingFile` replaces the standard library's rotating handler on two points: the library
formats every record twice and stats the path for each line (19 us a JSON line against 7.5
here, measured), and with no backups it never rotates (the file grows without end, reopened
for every line past the size); here a record is formatted once, the size is the open file's
position, and with `LOG_FILE_BACKUPS=0` a full file starts over.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import stat
import time
from contextvars import ContextVar, Token
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelhost.settings import Settings

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

request_id: ContextVar[str | bytes | None] = ContextVar("request_id", default=None)
"""The id of the request the running code works for (None outside a request)."""


class LogSetupError(Exception):
    """The log file cannot be used: a LOG_FILE_NAME that is not a bare file name, or a file
    or folder that cannot be opened or created. The CLI shows it and does not start."""


def bind_request_id(value: str | bytes | None) -> Token[str | bytes | None]:
    """Make `value` the current request id (for this task and the tasks it starts); give
    the token to `reset_request_id` when the request is done."""
    return request_id.set(value)


def reset_request_id(token: Token[str | bytes | None]) -> None:
    request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on each record as `record.request_id`, a str (None
    outside a request); a record given one through `extra` keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None)
        if rid is None:
            rid = request_id.get()
        # Ids are checked ASCII (modelhost.requestid); "replace" keeps a stray one harmless.
        record.request_id = rid.decode("ascii", "replace") if isinstance(rid, bytes) else rid
        return True


class TextFormatter(logging.Formatter):
    """The seed's line (`FORMAT`, local time), then ` [req=<id>]` for a request's line."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [req={rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC, milliseconds), level, logger, message,
    and request_id, model, exc_info, stack_info when the record has them."""

    _second: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.gmtime(second)))
        entry: dict[str, Any] = {
            "time": f"{cached[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        model = getattr(record, "model", None)
        if model is not None:
            entry["model"] = model
        # exc_text may already be set (and scrubbed) by a filter such as redaction.ScrubFilter.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class RotatingFile(logging.handlers.RotatingFileHandler):
    """A file moved to `<name>.1` (`.1` to `.2`, ...; the oldest past `backups` deleted) when
    the next line would take it past `max_bytes`; with no backups it starts over."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.regular = True
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self) -> Any:
        stream = super()._open()
        # A pipe or a device (a name linked to /dev/stderr) has no size and is never rotated.
        self.regular = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:  # closed by a failed rollover: try again
                self.stream = self._open()
            if self.regular:
                size = self.stream.tell()
                # Characters, not bytes, where a line is not ASCII: close enough for a limit.
                if size and size + len(line) > self.maxBytes:
                    self.doRollover()
            self.stream.write(line)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115


def log_file(log_dir: Path, name: str) -> Path:
    """`log_dir / name`, where `name` (LOG_FILE_NAME) must be a bare file name: a name that
    would leave the folder, or name a folder, is refused."""
    if name in ("", ".", "..") or "/" in name or "\0" in name or (
            os.altsep is not None and os.altsep in name):
        raise LogSetupError(f"LOG_FILE_NAME must be a file name in LOG_DIR ({log_dir}), "
                            f"without a folder: {name!r}")
    return log_dir / name


def make_handlers(settings: Settings) -> list[logging.Handler]:
    """stderr and the rotating log file, with the format and the request-id filter of
    `settings`; the log folder is created (owner only) if missing."""
    log_dir = settings.logs_path
    path = log_file(log_dir, settings.log_file_name)
    try:
        # Folders created here are the owner's alone (the data folder holds the database).
        for folder in reversed([log_dir, *log_dir.parents]):
            if not folder.exists():
                folder.mkdir(mode=0o700, exist_ok=True)
        file_handler = RotatingFile(path, settings.log_file_bytes, settings.log_file_backups)
    except OSError as exc:
        raise LogSetupError(f"cannot open the log file {path}: "
                            f"{exc.strerror or exc}") from None
    handlers: list[logging.Handler] = [logging.StreamHandler(), file_handler]
    formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    ids = RequestIdFilter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(ids)
    return handlers


def setup_logging(settings: Settings) -> None:
    """Send every logger to stderr and to `LOG_DIR/LOG_FILE_NAME` at `settings.log_level`
    (`trace` is 5, uvicorn's), in place of the root's handlers (a log file of an earlier
    call is closed). Raises LogSetupError, before changing anything, when the file cannot
    be used."""
    level = settings.log_level
    numeric = 5 if level == "trace" else getattr(logging, level.upper())
    handlers = make_handlers(settings)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, RotatingFile):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(numeric)
    # uvicorn's loggers write through the root's handlers, whatever configured them before
    # (uvicorn's own dictConfig, run by an embedding program or an earlier server in the
    # same process, gives them handlers of their own and stops their propagation).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.disabled = False
        logger.setLevel(logging.NOTSET)
