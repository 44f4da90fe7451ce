"""Why a model cannot serve a request now: the lifecycle's own errors.

`Model.ensure_ready` raises them. They carry the facts (which model, how long to wait, how
far a download is) and no HTTP: status codes, error codes and the hints that point an
operator to the admin API or the CLI are the API layer's (`modelhost.api.lifecycle`), so
the lifecycle can be driven and tested without a web server, and a future caller (a
cluster launcher, a CLI without the server) can say the same facts its own way.
"""

from __future__ import annotations


class LifecycleError(Exception):
    """A model that cannot serve now. `retry_after`: seconds worth waiting before asking
    again."""

    def __init__(self, model_id: str, retry_after: float) -> None:
        super().__init__(model_id)
        self.model_id = model_id
        self.retry_after = retry_after


class ModelFailed(LifecycleError):
    """The model is `failed` (within the retry delay), or its load failed while the caller
    waited (`while_loading`). The reason is in the model's `last_error`, for operators."""

    def __init__(self, model_id: str, retry_after: float, while_loading: bool = False) -> None:
        super().__init__(model_id, retry_after)
        self.while_loading = while_loading


class NotDownloaded(LifecycleError):
    """The weights are not in the cache, and requests never download. `download_failed`:
    the last download failed."""

    def __init__(self, model_id: str, retry_after: float, download_failed: bool = False
                 ) -> None:
        super().__init__(model_id, retry_after)
        self.download_failed = download_failed


class Downloading(LifecycleError):
    """The weights are being downloaded; `percent` done when the size is known."""

    def __init__(self, model_id: str, retry_after: float, percent: float | None = None
                 ) -> None:
        super().__init__(model_id, retry_after)
        self.percent = percent


class NotReadyYet(LifecycleError):
    """The caller's wait ran out while the model loads (the load goes on)."""

    def __init__(self, model_id: str, retry_after: float, state: str) -> None:
        super().__init__(model_id, retry_after)
        self.state = state


class UnloadedWhileLoading(LifecycleError):
    """The model was unloaded (or the gateway began to stop) while the caller waited."""


def not_downloaded(model_id: str, state: str, progress: dict[str, object] | None
                   ) -> LifecycleError:
    """Why a model whose weights are not cached (`state`: absent, downloading or failed)
    cannot serve: downloading (with the percentage done when known) or not downloaded."""
    if state == "downloading":
        done, total = (progress or {}).get("bytes_done"), (progress or {}).get("bytes_total")
        percent = 100 * done / total \
            if isinstance(done, int) and isinstance(total, int) and total else None
        return Downloading(model_id, retry_after=30, percent=percent)
    return NotDownloaded(model_id, retry_after=60, download_failed=state == "failed")
