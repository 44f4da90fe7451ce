"""The skeleton every worker app (speech, diarization, embeddings) is built on, so that each app
declares only its engine and its routes.

What it gives them, the same way:

- the common command line (`add_common_arguments`): `--host`, `--port`, `--served-name`,
  `--device`, `--log-level`; the gateway starts every app with them (workers/plans.py);
- the model loaded before the port opens (`load_or_exit`): the gateway's readiness probe,
  `GET /v1/models`, can only succeed once the app can answer; a model that does not load is
  one log line and exit status 1, not a traceback;
- `GET /v1/models` (the one model card) and `GET /health` (`build_worker_app`);
- one error envelope, OpenAI's, from modelhost's exception tree (errors.py): a ModelhostError
  is answered with its status, body and headers (bad input 400, too large 413...); Starlette's
  own HTTP errors (404, 405, a malformed multipart body) and a failure of the app (500) are put
  in the same envelope;
- multipart forms and JSON bodies read under limits (`read_form`, `read_body`), an upload
  spooled to a file for the decoder (`spool_upload`);
- uvicorn (`serve`), which on SIGTERM stops accepting, lets requests in flight finish (for at
  most `GRACEFUL_SECONDS`), runs the apps' shutdown hooks and exits.

The apps need modelhost installed where they run (`python -m modelhost.workers.apps.X`, with a
model's `python:` pointing at another environment too), so they may import errors.py: it
needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive

from modelhost.errors import ModelhostError, RequestTooLarge, error_body

log = logging.getLogger("modelhost.workers.apps")

# How long requests in flight may take to finish once SIGTERM arrives.
GRACEFUL_SECONDS = 10
SPOOL_CHUNK = 1 << 20

T = TypeVar("T")


# --------------------------------------------------------------------------- command line


def add_common_arguments(parser: argparse.ArgumentParser, *, device_default: str = "auto",
                         device_choices: Sequence[str] | None = None,
                         device_help: str | None = None,
                         served_name_required: bool = False) -> None:
    """The arguments every worker app takes (the gateway passes all but `--log-level`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", required=served_name_required, default=None,
                        help="the model id /v1/models answers")
    parser.add_argument("--device", default=device_default, choices=device_choices,
                        help=device_help)
    parser.add_argument("--log-level", default="info")


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load_or_exit(what: str, load: Callable[[], T]) -> T:
    """Run `load` (before the port opens); on failure log one line saying `what` could not be
    loaded and why, and exit with status 1 (the traceback at debug level). A SystemExit raised
    by `load` (a missing optional engine, with its install hint) passes through."""
    began = time.monotonic()
    try:
        loaded = load()
    except Exception as exc:
        log.debug("model load failed", exc_info=True)
        log.error("cannot load %s: %s: %s", what, type(exc).__name__, exc)
        raise SystemExit(1) from None
    log.info("loaded %s in %.1f s", what, time.monotonic() - began)
    return loaded


def serve(app: Starlette, args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (uvicorn re-raises the signal
    once done: the exit status says which)."""
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                            log_level=args.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SECONDS)
    uvicorn.Server(config).run()


# --------------------------------------------------------------------------- the app


def build_worker_app(*, name: str, served_name: str, routes: Sequence[BaseRoute],
                     card: Mapping[str, Any] | None = None,
                     health: Mapping[str, Any] | None = None,
                     on_shutdown: Sequence[Callable[[], None]] = ()) -> Starlette:
    """A worker app serving one model as `served_name`: its `routes`, plus `GET /v1/models`
    (OpenAI's list with one card, extended with `card`), `GET /health` (`{"status": "ok"}`
    extended with `health`), and the one error envelope. `name` says which worker failed in a
    500's message; `on_shutdown` runs once the server has stopped."""
    created = int(time.time())
    model_card = {"id": served_name, "object": "model", "created": created,
                  "owned_by": "modelhost", **(card or {})}
    health_body = {"status": "ok", **(health or {})}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card]})

    async def healthy(request: Request) -> Response:
        return JSONResponse(health_body)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception after this answer, and uvicorn logs its traceback.
        return JSONResponse(error_body(f"the {name} worker failed: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for hook in on_shutdown:
            hook()

    return Starlette(
        routes=[Route("/v1/models", models, methods=["GET"]),
                Route("/health", healthy, methods=["GET"]), *routes],
        exception_handlers={ModelhostError: modelhost_error, HTTPException: http_error,
                            Exception: server_error},
        lifespan=lifespan)


async def modelhost_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ModelhostError)
    if exc.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route, wrong method, a malformed form) in the envelope."""
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = "unknown_url" if exc.status_code == 404 else None
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, kind, None, code), status_code=exc.status_code,
                        headers=exc.headers)


# --------------------------------------------------------------------------- bodies


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes, or before reading
    when its Content-Length says it will."""
    too_large = RequestTooLarge(f"the request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def read_form(request: Request, *, max_files: int, max_fields: int,
                    max_field_bytes: int = 1024 * 1024, max_body_bytes: int | None = None,
                    too_large: ModelhostError | None = None) -> AsyncIterator[FormData]:
    """The multipart (or urlencoded) form, its files spooled by Starlette (in memory up to
    1 MiB, then on disk) and closed on exit. Beyond `max_files` files, `max_fields` other
    fields or `max_field_bytes` in one field, Starlette answers 400; beyond `max_body_bytes`
    of body (declared, or as soon as received) `too_large` (default: a 413) is raised, so
    that an upload never costs more disk than that. A body that is not a form gives an empty
    form."""
    if max_body_bytes is not None:
        error = too_large or RequestTooLarge(
            f"the request body is larger than {max_body_bytes} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise error
        request = Request(request.scope, _capped(request.receive, max_body_bytes, error))
    async with request.form(max_files=max_files, max_fields=max_fields,
                            max_part_size=max_field_bytes) as form:
        yield form


def _capped(receive: Receive, limit: int, error: ModelhostError) -> Receive:
    """`receive`, raising `error` once the body passes `limit` bytes."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise error
        return message

    return capped


def spool_upload(upload: UploadFile, spool_dir: Path | None = None) -> Path:
    """The uploaded file copied to a named file (the decoder opens a path; Starlette's spool
    may be in memory), keeping a safe form of the upload's suffix (FFmpeg's format hint).
    Blocking: call it through asyncio.to_thread. The caller deletes the file."""
    with tempfile.NamedTemporaryFile("wb", dir=spool_dir, suffix=upload_suffix(upload.filename),
                                     delete=False) as out:
        upload.file.seek(0)
        shutil.copyfileobj(upload.file, out, SPOOL_CHUNK)
    return Path(out.name)


def upload_suffix(filename: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    return suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""
