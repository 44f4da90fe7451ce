"""Logging: to stderr and to a rotating file in LOG_DIR (the seed's behaviour)."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str, log_dir: Path | None) -> None:
    numeric = 5 if level == "trace" else getattr(logging, level.upper())
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_dir is not None:
        # Folders created here are the owner's alone (the data folder holds the database).
        for folder in reversed([log_dir, *log_dir.parents]):
            if not folder.exists():
                folder.mkdir(mode=0o700, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            log_dir / "modelhost.log", maxBytes=20 * 1024 * 1024, backupCount=5))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(numeric)
