"""Downloads through the gateway, as an operator does them: the CLI and the admin API against
a fake Hugging Face hub on loopback (tests/fake_hub.py) that can cut or slow a transfer."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, GatewayFactory, fake_model, wait_for
from tests.fake_hub import FakeHub

WEIGHTS = 600_000


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    repo = tmp_path / "hub" / "org" / "tiny" / "main"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "tiny"}')
    (repo / "weights.bin").write_bytes(os.urandom(WEIGHTS))
    with FakeHub(tmp_path / "hub") as server:
        yield server


def hub_gateway(factory: GatewayFactory, hub: FakeHub, tmp_path: Path,
                data: Path | None = None) -> Gateway:
    spec = fake_model("tiny", source={"hf": "org/tiny"})
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    if data is not None:
        env["MODELHOST_DATA_DIR"] = str(data)
    return factory([spec], env=env)


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelhost", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MODELHOST_URL": gw.url,
                                                       "COLUMNS": "120"})


def chat(gw: Gateway) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}]})


def test_download_cut_midway_resumes_and_completes(gateway_factory: GatewayFactory,
                                                   hub: FakeHub, tmp_path: Path) -> None:
    gw = hub_gateway(gateway_factory, hub, tmp_path)
    assert gw.model("tiny")["state"] == "absent"
    resp = chat(gw)  # a request never triggers a download
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "model_not_downloaded"
    hub.cut("weights.bin", after=200_000, times=1)
    result = cli(gw, "models", "download", "tiny")
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout  # the progress bar's line
    # The second transfer asked for the rest only.
    served = hub.bytes_served("weights.bin")
    assert WEIGHTS <= served < WEIGHTS + 250_000
    assert any(r.range for r in hub.content_requests("weights.bin"))
    # The hub's own cache layout, shared with other tools.
    repo = tmp_path / "cache" / "models--org--tiny"
    [snapshot] = (repo / "snapshots").iterdir()
    assert (snapshot / "weights.bin").stat().st_size == WEIGHTS
    assert (repo / "refs" / "main").read_text().strip() == snapshot.name
    assert gw.model("tiny")["state"] == "cached"
    assert chat(gw).status_code == 200
    # A second download of the same revision downloads nothing.
    before = hub.bytes_served()
    again = cli(gw, "models", "download", "tiny")
    assert again.returncode == 0
    assert hub.bytes_served() == before


def test_request_while_downloading_is_503_and_cancel(gateway_factory: GatewayFactory,
                                                    hub: FakeHub, tmp_path: Path) -> None:
    gw = hub_gateway(gateway_factory, hub, tmp_path)
    hub.throttle(50_000)
    httpx.post(gw.url + "/api/admin/models/tiny/download", timeout=30).raise_for_status()
    assert wait_for(lambda: gw.model("tiny")["state"] == "downloading", timeout=10)
    resp = chat(gw)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "model_downloading"
    assert "retry-after" in resp.headers
    cancelled = cli(gw, "models", "download", "tiny", "--cancel")
    assert cancelled.returncode == 0, cancelled.stderr
    assert gw.model("tiny")["state"] == "absent"
    served = hub.bytes_served()
    time.sleep(0.5)
    assert hub.bytes_served() == served  # the transfer really stopped


def test_kill_9_during_download_then_resume(gateway_factory: GatewayFactory, hub: FakeHub,
                                           tmp_path: Path) -> None:
    data = tmp_path / "data"
    gw = hub_gateway(gateway_factory, hub, tmp_path, data)
    hub.throttle(100_000)
    httpx.post(gw.url + "/api/admin/models/tiny/download", timeout=30).raise_for_status()
    assert wait_for(lambda: hub.bytes_served("weights.bin") > 150_000, timeout=20)
    gw.proc.kill()
    gw.proc.wait()
    hub.throttle(None)
    partial = hub.bytes_served("weights.bin")
    again = hub_gateway(gateway_factory, hub, tmp_path, data)
    again.wait_state("tiny", "cached", timeout=30)  # resumed by itself
    card = httpx.get(again.url + "/api/admin/models/tiny").json()
    assert card["download"]["state"] == "completed"
    assert hub.bytes_served("weights.bin") < partial + WEIGHTS  # not from zero
    rows: list[dict[str, Any]] = httpx.get(again.url + "/api/admin/cache").json()["repos"]
    assert [(r["repo"], r["complete"]) for r in rows] == [("org/tiny", True)]


def test_delete_from_cache(gateway_factory: GatewayFactory, hub: FakeHub,
                           tmp_path: Path) -> None:
    gw = hub_gateway(gateway_factory, hub, tmp_path)
    assert cli(gw, "models", "download", "tiny").returncode == 0
    assert chat(gw).status_code == 200
    busy = cli(gw, "models", "rm", "tiny", "--yes")
    assert busy.returncode == 1
    assert "unload it" in busy.stderr
    assert cli(gw, "models", "unload", "tiny").returncode == 0
    removed = cli(gw, "models", "rm", "tiny", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "freed 0.6 MiB" in removed.stdout
    assert gw.model("tiny")["state"] == "absent"
    assert not (tmp_path / "cache" / "models--org--tiny").exists()


def test_token_is_stored_privately_and_never_returned(gateway_factory: GatewayFactory,
                                                     hub: FakeHub, tmp_path: Path) -> None:
    gw = hub_gateway(gateway_factory, hub, tmp_path)
    secret = "hf_abcdefghijklmnopqrstuvwxyz0123"
    result = cli(gw, "token", "set", "--token", secret)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "cache" / ".hf_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shown = cli(gw, "token", "show")
    assert secret not in shown.stdout
    assert shown.stdout.strip().endswith("0123")
    assert secret not in httpx.get(gw.url + "/api/admin/token").text
    assert secret not in gw.output()
    hub.set_access("org/tiny", gated=True)
    failed = cli(gw, "models", "download", "tiny")
    assert failed.returncode == 1
    assert "accept" in failed.stderr.lower()
