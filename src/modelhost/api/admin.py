"""The admin API under /api/admin: models, downloads, GPUs, events, the audit log, usage
(seed paths kept)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import StreamingResponse

from modelhost.db.audit import MAX_LIMIT
from modelhost.db.usage import GROUPS
from modelhost.errors import InvalidRequest
from modelhost.gateway import Gateway

HEARTBEAT_SECONDS = 15.0


class LoadRequest(BaseModel):
    gpu_device_ids: list[int] | None = Field(
        None, description="Load on these GPUs (NVML indices) instead of the model's own; "
                          "null: back to the model's own. A load that fails keeps the GPUs "
                          "asked before.")


class RollbackRequest(BaseModel):
    version: int | None = Field(
        None, ge=1, description="The version (from the model's history) whose spec serves "
                                "again; null: the spec before the current one.")


class TokenBody(BaseModel):
    token: str = Field(description="A Hugging Face access token (hf_...). Never returned.")


def _plain_path(request: Request) -> None:
    """Refuse a path with a control character: routes match with `$`, which also matches
    before a final newline, so `/models/abc%0A` would otherwise reach model `abc`."""
    path = request.scope["path"]
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise InvalidRequest("the path contains a control character (a model id is 1-128 "
                             "letters, digits and . _ : / -)", param="model")


def admin_router(gateway: Gateway) -> APIRouter:
    router = APIRouter(prefix="/api/admin", dependencies=[Depends(_plain_path)])

    @router.get("/models", tags=["models"], summary="List models with state and placement")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": gateway.cards()}

    @router.get("/models/{model_id:path}/history", tags=["models"],
                summary="Every change of a model's spec")
    async def model_history(model_id: str) -> dict[str, Any]:
        return {"object": "list", "data": await gateway.history(model_id)}

    @router.post("/models/{model_id:path}/download", tags=["downloads"], status_code=202,
                 summary="Download a model's files into the cache")
    async def download(model_id: str) -> dict[str, Any]:
        return await gateway.download(model_id)

    @router.delete("/models/{model_id:path}/download", tags=["downloads"],
                   summary="Cancel a running download (partial files are kept)")
    async def cancel_download(model_id: str) -> dict[str, Any]:
        return await gateway.cancel_download(model_id)

    @router.post("/models/{model_id:path}/load", tags=["models"],
                 summary="Load a model (optionally on given GPUs) and wait until ready")
    async def load(model_id: str, body: LoadRequest | None = Body(None),  # noqa: B008
                   wait: bool = Query(True)) -> dict[str, Any]:
        gpus = body.gpu_device_ids if body is not None else None
        # An explicit `"gpu_device_ids": null` goes back to the model's own GPUs.
        reset = body is not None and "gpu_device_ids" in body.model_fields_set and gpus is None
        return await gateway.load(model_id, gpus, wait=wait, reset_gpus=reset)

    @router.post("/models/{model_id:path}/unload", tags=["models"],
                 summary="Stop a model's worker")
    async def unload(model_id: str, wait: bool = Query(True)) -> dict[str, Any]:
        return await gateway.unload(model_id, wait=wait)

    @router.post("/models/{model_id:path}/rollback", tags=["models"],
                 summary="Serve an earlier version's spec again (blue-green, like any update)")
    async def rollback(model_id: str, body: RollbackRequest | None = Body(None)  # noqa: B008
                       ) -> dict[str, Any]:
        return await gateway.rollback(model_id, body.version if body is not None else None)

    @router.post("/reload", tags=["models"],
                 summary="Read the models file again and apply what changed in it")
    async def reload() -> dict[str, Any]:
        return await gateway.reload()

    @router.delete("/models/{model_id:path}/cache", tags=["downloads"],
                   summary="Delete a model's files from the cache")
    async def delete_cache(model_id: str) -> dict[str, Any]:
        return await gateway.delete_cache(model_id)

    @router.get("/models/{model_id:path}", tags=["models"], summary="One model")
    async def get_model(model_id: str) -> dict[str, Any]:
        return gateway.card(gateway.model(model_id))

    @router.put("/models/{model_id:path}", tags=["models"],
                summary="Add or change a model (validated, persisted, versioned)")
    async def put_model(model_id: str, spec: dict[str, Any] = Body(...)  # noqa: B008
                        ) -> dict[str, Any]:
        return await gateway.put_model(gateway.validate_spec(model_id, spec))

    @router.delete("/models/{model_id:path}", tags=["models"],
                   summary="Remove a model added at run time")
    async def delete_model(model_id: str) -> dict[str, Any]:
        await gateway.delete_model(model_id)
        return {"id": model_id, "deleted": True}

    @router.get("/gpus", tags=["gpus"], summary="GPUs with live figures")
    async def gpus() -> dict[str, Any]:
        return gateway.gpus()

    @router.get("/cache", tags=["downloads"], summary="What the model cache holds")
    async def cache() -> dict[str, Any]:
        return await gateway.cache()

    @router.get("/token", tags=["downloads"], summary="Whether a Hugging Face token is set")
    async def get_token() -> dict[str, Any]:
        return gateway.token()

    @router.put("/token", tags=["downloads"],
                summary="Store the Hugging Face token (MODEL_CACHE_DIR/.hf_token, mode 0600)")
    async def put_token(body: TokenBody) -> dict[str, Any]:
        return gateway.set_token(body.token)

    @router.delete("/token", tags=["downloads"], summary="Delete the stored token")
    async def delete_token() -> dict[str, Any]:
        return gateway.delete_token()

    @router.get("/audit", tags=["audit"],
                summary="The audit log: admin actions, newest first (docs/admin-api.md)")
    async def audit(since: str | None = None, until: str | None = None,
                    model: str | None = None, actor: str | None = None,
                    action: str | None = None, limit: str = "100", offset: str = "0"
                    ) -> dict[str, Any]:
        filters: dict[str, Any] = {
            "since": _moment("since", since), "until": _moment("until", until),
            "target": model, "actor": actor, "action": action,
            "limit": _count("limit", limit, 1, MAX_LIMIT),
            "offset": _count("offset", offset, 0, 10**9)}
        rows = await gateway.persistence.now(lambda store: store.audit(**filters))
        return {"object": "list", "data": [r.as_dict() for r in rows]}

    @router.get("/usage", tags=["audit"],
                summary="Usage by key id and model: requests, tokens, audio seconds, "
                        "embedding inputs (docs/admin-api.md)")
    async def usage(since: str | None = None, until: str | None = None,
                    group_by: str = "key,model", key: str | None = None,
                    model: str | None = None) -> dict[str, Any]:
        groups = [g.strip() for g in group_by.split(",") if g.strip()]
        if not set(groups) <= set(GROUPS) or {"hour", "day"} <= set(groups):
            raise InvalidRequest("'group_by' must list any of key, model, and hour or day "
                                 "(comma-separated)", param="group_by")
        filters: dict[str, Any] = {
            "since": _moment("since", since), "until": _moment("until", until),
            "key": key or None, "model": model or None, "group_by": groups}
        rows = await gateway.persistence.now(lambda store: store.usage_sums(**filters))
        return {"object": "list", "group_by": groups, "data": [r.as_dict() for r in rows]}

    @router.get("/events", tags=["events"],
                summary="Server-sent events: state changes and download progress")
    async def events(request: Request) -> StreamingResponse:
        return StreamingResponse(_event_stream(gateway, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _event_stream(gateway: Gateway, request: Request) -> AsyncIterator[bytes]:
    async with gateway.events.subscribe() as queue:
        # First, where everything stands, so a client needs no separate listing call.
        yield _sse("snapshot", {"type": "snapshot", "models": gateway.cards()})
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            yield _sse(event["type"], event)


def _moment(name: str, text: str | None) -> datetime | None:
    """An ISO 8601 time (`2026-12-06T02:00:00Z`, a date alone is its midnight); without an
    offset, UTC."""
    if text is None or text == "":
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 time such as "
                             f"2026-12-06T02:00:00Z", param=name) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _count(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}", param=name)
    return value


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


