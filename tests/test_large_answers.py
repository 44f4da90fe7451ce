"""Answers of any size, and request deadlines, through a real `modelhost serve`.

Large non-streamed answers (1 B to tens of MiB) arrive byte for byte on the fast path (the
server's hot cycle) and on the ASGI path (`MODELHOST_ACCESS_LOG=true` sends every request
through the ASGI app); past `max_answer_bytes` the client gets a 502 naming the limit; past
`request_timeout` or `idle_timeout` a 504. After each of these, and after a client that went
away or a worker that crashed mid-answer, the model's only slot (`max_concurrency: 1`) is free
again: the next request is answered.

The upstream is `tests/big_upstream.py`, a real process that answers as large, as slowly or as
badly as each request asks.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.workers.process import free_port
from tests.big_upstream import many_choices, payload
from tests.conftest import Gateway, GatewayFactory, wait_for

BIG_UPSTREAM = str(Path(__file__).parent / "big_upstream.py")
KiB = 1024
MiB = 1024 * KiB
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A big upstream server (its /v1 URL) and its events file."""
    events = tmp_path_factory.mktemp("big") / "events"
    port = free_port()
    proc = subprocess.Popen([sys.executable, BIG_UPSTREAM, "--port", str(port),
                             "--events", str(events)])
    url = f"http://127.0.0.1:{port}/v1"
    assert wait_for(lambda: _up(url), timeout=20)
    yield url, events
    proc.terminate()
    proc.wait(10)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/models", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def remote(url: str, model_id: str = "big", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "backend": "remote", "source": {"url": url},
            "max_concurrency": 1, **fields}


def gateway_for(tmp: Path, models: list[dict[str, Any]], asgi: bool,
                **env: str) -> Gateway:
    settings = {"MODELHOST_ACCESS_LOG": "true" if asgi else "false", **env}
    return Gateway(tmp, models, env=settings)


@pytest.fixture(scope="module", params=["fast", "asgi"])
def gateway(request: pytest.FixtureRequest, upstream: tuple[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway on the fast path or on the ASGI path, with one remote model of one slot."""
    gw = gateway_for(tmp_path_factory.mktemp(request.param), [remote(upstream[0])],
                     asgi=request.param == "asgi")
    yield gw
    gw.stop()


def chat(gw: Gateway, model: str = "big", timeout: float = 60, **big: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=timeout,
                      json={"model": model, "messages": MESSAGES, "big": big})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [1, 100 * KiB, 300 * KiB, 1 * MiB, 16 * MiB, 48 * MiB],
                         ids=["1B", "100KiB", "300KiB", "1MiB", "16MiB", "48MiB"])
def test_answers_of_every_size_arrive_byte_for_byte(gateway: Gateway, size: int) -> None:
    for chunked in (False, True):
        resp = chat(gateway, size=size, chunked=chunked)
        assert resp.status_code == 200, resp.text[:500]
        assert len(resp.content) == size
        assert sha(resp.content) == sha(payload(size))
        assert resp.headers["content-length"] == str(size)
