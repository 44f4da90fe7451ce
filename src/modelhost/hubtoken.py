"""The Hugging Face token: where it is kept, which one wins, and how it is shown.

A token set through the admin API or `modelhost token set` is kept in
``MODEL_CACHE_DIR/.hf_token``, a file of mode 0600 (owner read/write only) that is never
world-readable, not even for an instant: it is written to a temporary file created with mode
0600 in the same folder, then renamed over the old one.

Precedence (``resolve_token``): the environment wins. ``HUGGINGFACE_TOKEN`` (or ``HF_TOKEN``,
or their ``MODELHOST_`` forms, all read into ``Settings.huggingface_token``) is used when set;
the file only when it is not. That is the usual rule of twelve-factor deployments (the
operator's environment overrides state kept by the application), and it means a token
injected by a secret manager cannot be silently replaced from the dashboard. ``token_info``
says which one is in use, so the admin API can tell the user that a token stored from the UI
is shadowed by the environment.

The token itself never leaves this module except to be sent to the hub: it is never logged,
never put in an error message, and shown only through ``mask`` ("hf_…abcd").
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

TOKEN_FILE = ".hf_token"
# Hub tokens are "hf_" followed by letters and digits; other hubs (mirrors, proxies) may use
# other shapes, so only what would break the file or an HTTP header is refused.
_VALID = re.compile(r"[\x21-\x7e]{1,512}")

TokenSource = Literal["environment", "file"]


class TokenError(ValueError):
    """A token that cannot be stored (the message never contains the token)."""


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about the token in use: where it comes from and its masked form."""

    source: TokenSource | None
    masked: str | None
    file: Path


def token_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / TOKEN_FILE


def mask(token: str | None) -> str | None:
    """The only form of a token that may be displayed: "hf_…abcd".

    The last four characters are shown only for tokens of 12 characters or more, so that a
    short (test or custom) token is never mostly revealed.
    """
    if not token:
        return None
    prefix = "hf_" if token.startswith("hf_") else ""
    tail = token[-4:] if len(token) >= 12 else ""
    return f"{prefix}…{tail}"


def read_token(cache_dir: Path) -> str | None:
    """The token stored in the cache folder, or None when there is none (or it is empty)."""
    try:
        text = token_path(cache_dir).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    token = text.strip()
    return token or None


def write_token(cache_dir: Path, token: str) -> str:
    """Store `token` in MODEL_CACHE_DIR/.hf_token (mode 0600, atomic); return its masked form.

    Why a temporary file and a rename: readers (a download starting at the same moment) see
    either the old token or the new one, never half a file; and the temporary file is created
    by `mkstemp`, which opens it with mode 0600 from the start, so the secret is never in a
    file others can read.
    """
    token = token.strip()
    if not _VALID.fullmatch(token):
        raise TokenError("a token must be 1 to 512 printable characters without spaces")
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".hf_token.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)  # mkstemp already uses 0600; a umask can only remove bits
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, token_path(folder))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    logger.info("Hugging Face token %s stored in %s", mask(token), token_path(folder))
    return mask(token) or ""


def delete_token(cache_dir: Path) -> bool:
    """Remove the stored token; True when there was one."""
    try:
        token_path(cache_dir).unlink()
    except FileNotFoundError:
        return False
    logger.info("Hugging Face token removed from %s", token_path(cache_dir))
    return True


def resolve_token(settings_token: str | None, cache_dir: Path) -> str | None:
    """The token to send to the hub: the environment's (settings) if set, else the file's."""
    if settings_token and settings_token.strip():
        return settings_token.strip()
    return read_token(cache_dir)


def token_info(settings_token: str | None, cache_dir: Path) -> TokenInfo:
    """Where the token in use comes from, masked: safe to return from the admin API."""
    if settings_token and settings_token.strip():
        return TokenInfo("environment", mask(settings_token.strip()), token_path(cache_dir))
    stored = read_token(cache_dir)
    source: TokenSource | None = "file" if stored else None
    return TokenInfo(source, mask(stored), token_path(cache_dir))


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (a crash right after must not bring the old token back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
