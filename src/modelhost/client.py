"""A small client of a running gateway's HTTP API, for the CLI.

The CLI calls the admin API, so it sends an admin key: `MODELHOST_ADMIN_KEY`, else the first of
`MODELHOST_ADMIN_KEYS` (the server's own setting, when the CLI runs beside it), else the first
of `OPENAI_API_KEYS` (which the admin API refuses with 403 once keys are configured, with a
message that says what to set).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx2

from modelhost.settings import Settings


class GatewayError(Exception):
    """The gateway could not be reached or refused the call; the message says why."""


def admin_key(settings: Settings) -> str | None:
    """The key the CLI sends (see the module's docstring), or None."""
    key = os.environ.get("MODELHOST_ADMIN_KEY", "").strip()
    if key:
        return key
    for keys in (settings.admin_api_keys, settings.api_keys):
        if keys:
            return keys[0]
    return None


class GatewayClient:
    def __init__(self, url: str | None = None, key: str | None = None,
                 timeout: float = 600) -> None:
        settings = Settings()
        host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host
        self.url = (url or f"http://{host}:{settings.api_port}").rstrip("/")
        key = key or admin_key(settings)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx2.Client(base_url=self.url, headers=headers, timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx2.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise GatewayError(f"{resp.status_code}: {message}")
        return resp.json()

    def events(self) -> Iterator[dict[str, Any]]:
        """The admin event stream, one decoded event at a time."""
        try:
            with self._http.stream("GET", "/api/admin/events", timeout=None) as resp:
                if resp.status_code >= 400:
                    raise GatewayError(f"{resp.status_code}: {resp.read().decode()}")
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx2.HTTPError as exc:
            raise GatewayError(f"event stream from {self.url} broke: {exc}") from None
