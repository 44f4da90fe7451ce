"""Why a download failed, said so that the operator knows what to do next.

Whatever a download raises (huggingface_hub's errors, an HTTP status, a broken connection, a
full disk) becomes one `DownloadError` whose message names the cause and the remedy (accept a
model's terms, set a token, check `hf:` or `revision`, free disk space) and whose `ErrorKind`
is a stable name that clients see in the job's `error_kind`. The job manager scrubs the
token from the message, in case a library quoted it.
"""

from __future__ import annotations

import errno
from enum import StrEnum
from pathlib import Path

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # worth trying again later
SET_TOKEN = "set a token with `modelhost token set` or the HUGGINGFACE_TOKEN environment variable"


class ErrorKind(StrEnum):
    """Why a download failed: a stable name, shown to clients as the job's `error_kind`."""

    gated = "gated"
    unauthorized = "unauthorized"
    not_found = "not_found"
    revision_not_found = "revision_not_found"
    no_files = "no_files"
    network = "network"
    hub = "hub"
    disk_space = "disk_space"
    disk = "disk"
    checksum = "checksum"
    offline = "offline"
    internal = "internal"


class DownloadError(Exception):
    """A download that cannot go on; the message says what happened and what to do."""

    def __init__(self, message: str, kind: ErrorKind) -> None:
        super().__init__(message)
        self.kind = kind


def explain(exc: BaseException, *, repo: str, revision: str, token_set: bool,
            endpoint: str | None, cache_dir: Path) -> DownloadError:
    """Turn whatever a download raised into a DownloadError that says what to do."""
    if isinstance(exc, DownloadError):
        return exc
    page = f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo}"
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(f"cannot download {repo}: HF_HUB_OFFLINE is set, which forbids "
                             "any access to the hub; unset it to download", ErrorKind.offline)
    if isinstance(exc, GatedRepoError):
        if token_set:
            return DownloadError(
                f"{repo} is a gated model and the token in use has no access to it: accept "
                f"the model's terms at {page} with the account that owns the token, or "
                f"{SET_TOKEN} (one of an account that has access)", ErrorKind.gated)
        return DownloadError(f"{repo} is a gated model: accept the model's terms at {page}, "
                             f"then {SET_TOKEN}", ErrorKind.gated)
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"revision '{revision}' does not exist in {repo}: check "
                             f"`revision` in the model's source (a branch, tag or commit of "
                             f"{page})", ErrorKind.revision_not_found)
    if isinstance(exc, RepositoryNotFoundError):
        if token_set:
            return DownloadError(f"repository {repo} was not found, or the token in use cannot "
                                 f"read it: check `hf: {repo}`; for a private repository use a "
                                 "token with read access to it", ErrorKind.not_found)
        return DownloadError(f"repository {repo} was not found: check `hf: {repo}`; if it is "
                             f"private, {SET_TOKEN}", ErrorKind.not_found)
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(f"a file of {repo}@{revision} disappeared from the hub during the "
                             "download: start it again", ErrorKind.not_found)
    if isinstance(exc, HfHubHTTPError):
        return _explain_status(exc, repo, revision, token_set)
    if isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        detail = str(exc) or type(exc).__name__
        return DownloadError(f"network error while downloading {repo} from "
                             f"{endpoint or constants.ENDPOINT}: {detail}; the download "
                             "resumes where it stopped when started again", ErrorKind.network)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return DownloadError(f"the disk holding {cache_dir} is full: free some space or "
                                 "point MODEL_CACHE_DIR at a larger disk; the download resumes "
                                 "where it stopped", ErrorKind.disk_space)
        return DownloadError(f"cannot write to the model cache {cache_dir}: "
                             f"{exc.strerror or exc}; check MODEL_CACHE_DIR and its "
                             "permissions", ErrorKind.disk)
    return DownloadError(f"download of {repo}@{revision} failed: {type(exc).__name__}: {exc}",
                         ErrorKind.internal)


def _explain_status(exc: HfHubHTTPError, repo: str, revision: str,
                    token_set: bool) -> DownloadError:
    status = exc.response.status_code
    if status == 401:
        if token_set:
            return DownloadError("the Hugging Face token was rejected (invalid, expired or "
                                 f"revoked): {SET_TOKEN} with a valid one",
                                 ErrorKind.unauthorized)
        return DownloadError(f"the hub requires a token to download {repo}: {SET_TOKEN}",
                             ErrorKind.unauthorized)
    if status == 403:
        return DownloadError(f"the token in use is not allowed to read {repo} (a fine-grained "
                             f"token needs read access to it): {SET_TOKEN} with that permission",
                             ErrorKind.unauthorized)
    if status in RETRYABLE_STATUS:
        return DownloadError(f"the hub answered {status} while downloading {repo}: try again "
                             "later; the download resumes where it stopped", ErrorKind.hub)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else str(status)
    return DownloadError(f"the hub refused the download of {repo}@{revision}: {first}",
                         ErrorKind.hub)
