"""The HTTP answer to a lifecycle error (`modelhost.registry.errors`).

The lifecycle says why a model cannot serve (failed, not downloaded, downloading, still
loading, unloaded); this module says it to an HTTP client: the status (502 for a failure,
503 while it is worth waiting), the error code, Retry-After, and where an operator finds
the reason or starts the download (the admin API, the CLI). The reason itself (worker
output, addresses, paths) is never in the answer: it is for operators, in the admin routes.
"""

from __future__ import annotations

from modelhost.errors import ModelhostError, ModelNotReady, UpstreamError
from modelhost.registry.errors import (
    Downloading,
    LifecycleError,
    ModelFailed,
    NotDownloaded,
    NotReadyYet,
    UnloadedWhileLoading,
)


def http_error(exc: LifecycleError) -> ModelhostError:
    """The error envelope a request gets for `exc` (status, code, message, Retry-After)."""
    name = exc.model_id
    see_admin = f" (the reason is in GET /api/admin/models/{name})"
    if isinstance(exc, ModelFailed):
        what = "failed to load" if exc.while_loading else "failed"
        return UpstreamError(f"model '{name}' {what}{see_admin}", code="model_failed",
                             retry_after=exc.retry_after)
    if isinstance(exc, Downloading):
        pct = f" ({exc.percent:.0f}%)" if exc.percent is not None else ""
        return ModelNotReady(f"model '{name}' is downloading{pct}; retry when it is done",
                             code="model_downloading", retry_after=exc.retry_after)
    if isinstance(exc, NotDownloaded):
        failed = f" (the last download failed; the reason is in GET /api/admin/models/{name})" \
            if exc.download_failed else ""
        return ModelNotReady(
            f"model '{name}' is not downloaded{failed}: download it first "
            f"(`modelhost models download {name}` or "
            f"POST /api/admin/models/{name}/download)", code="model_not_downloaded",
            retry_after=exc.retry_after)
    if isinstance(exc, UnloadedWhileLoading):
        return ModelNotReady(f"model '{name}' was unloaded while loading",
                             retry_after=exc.retry_after)
    if isinstance(exc, NotReadyYet):
        return ModelNotReady(f"model '{name}' is not ready yet (state: {exc.state}); "
                             "retry later", retry_after=exc.retry_after)
    return ModelNotReady(f"model '{name}' is not ready", retry_after=exc.retry_after)
