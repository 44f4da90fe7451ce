"""Blue-green model updates with automatic rollback (`registry.rollout`), end to end.

Real gateways (`modelhost serve`) with real workers: the built-in SmolLM2 through llama.cpp
under a constant load of chat requests for the checks the issue names (an update, a rollback
to version 1, an update whose worker cannot start), the fake worker elsewhere; and the
update in place, in-process, over the NVML stand-in of tests/test_gpu.py, where the GPU has
no room for two versions.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import yaml

from modelhost.catalog import BUILTIN_MODELS, Catalog
from modelhost.config import ModelSpec
from modelhost.gpu.inventory import GpuMonitor
from modelhost.gpu.placement import estimate_bytes_per_gpu
from modelhost.persistence import spec_dict
from modelhost.registry.model import ModelContext, Target
from modelhost.registry.registry import Registry
from modelhost.registry.rollout import Rollouts, RolloutSettings
from tests.conftest import (
    Gateway,
    GatewayFactory,
    fake_model,
    openai_client,
    pid_alive,
    started_pids,
    wait_for,
    wait_gone,
)
from tests.test_gpu import FakeGpu, FakeNvml

MIB = 1024 ** 2
GIB = 1024 ** 3
# Short watches keep the tests fast (RolloutSettings.from_settings reads these).
FAST = {"MODELHOST_ROLLOUT_WATCH_SECONDS": "2", "MODELHOST_ROLLOUT_PROBE_EVERY": "0.2",
        "MODELHOST_ROLLOUT_MIN_REQUESTS": "3", "MODELHOST_ROLLOUT_PROBE_TIMEOUT": "20",
        "MODELHOST_ADMIN_ALLOW_CODE": "true"}
SMOLLM2 = next(s for s in BUILTIN_MODELS if s.id == "smollm2-135m")

# A worker that answers its readiness probe, then `ok` chat requests well, then only 500s.
FAILING_WORKER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, ok = int(sys.argv[1]), int(sys.argv[2])
answered = 0
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self._send(200, {"object": "list", "data": []})
    def do_POST(self):
        global answered
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answered += 1
        if answered > ok:
            self._send(500, {"error": {"message": "broken version", "type": "server_error",
                                       "param": None, "code": None}})
            return
        self._send(200, {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "ok"}}]})
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def failing_model(model_id: str, tmp: Path, ok: int, **fields: Any) -> dict[str, Any]:
    script = tmp / "failing_worker.py"
    script.write_text(FAILING_WORKER)
    return {"id": model_id, "backend": "command",
            "command": [sys.executable, str(script), "{port}", str(ok)], **fields}


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, gw.url + "/api/admin" + path, timeout=120, **kwargs)


def card(gw: Gateway, model_id: str) -> dict[str, Any]:
    resp = admin(gw, "GET", f"/models/{model_id}")
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


def history(gw: Gateway, model_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = admin(gw, "GET", f"/models/{model_id}/history").json()["data"]
    return data


def rollout_over(gw: Gateway, model_id: str, timeout: float = 60) -> dict[str, Any]:
    """The model's card once its rollout is finished (watch included)."""
    assert wait_for(lambda: (card(gw, model_id)["rollout"] or {}).get("finished_at"),
                    timeout, interval=0.2), card(gw, model_id)
    return card(gw, model_id)


def run_cli(*args: str) -> SimpleNamespace:
    """`modelhost ARGS` as a user runs it (a real process): its exit code and output."""
    done = subprocess.run([sys.executable, "-m", "modelhost", *args], capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())
    return SimpleNamespace(exit_code=done.returncode, output=done.stdout + done.stderr)


@contextmanager
def chat_load(gw: Gateway, model: str, clients: int = 4, max_tokens: int = 4,
              stream_every: int = 2) -> Iterator[list[str]]:
    """`clients` threads sending chat requests through the official client (every
    `stream_every`-th streamed) until the block ends; yields the list of failures."""
    failures: list[str] = []
    done: list[int] = []
    stop = threading.Event()

    def client(index: int) -> None:
        with openai_client(gw, timeout=120) as oa:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if n % stream_every == 0:
                        chunks = list(oa.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": "Hi"}],
                            max_tokens=max_tokens, stream=True))
                        assert any(c.choices and c.choices[0].finish_reason
                                   for c in chunks), f"a stream cut short: {chunks}"
                    else:
                        answer = oa.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": "Hi"}],
                            max_tokens=max_tokens)
                        assert answer.choices
                    done.append(1)
                except (openai.OpenAIError, AssertionError) as exc:
                    failures.append(f"client {index} request {n}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: len(done) >= clients, 60), f"no load: {failures}"
        yield failures
        assert len(done) > clients
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)


def write_models(gw: Gateway, models: list[dict[str, Any]], include_builtin: bool) -> None:
    (gw.tmp / "models.yaml").write_text(yaml.safe_dump(
        {"include_builtin": include_builtin, "models": models}))


def test_smollm2_update_rollback_and_broken_update_under_load(
        gateway_factory: GatewayFactory) -> None:
    """The issue's checks, through the built-in SmolLM2 (llama.cpp) and 4 clients: an update
    of its spec (a changed context length), `rollback --to 1` (at once: the update's watch
    ends early), a PUT, and an update whose worker exits at once: zero failed requests
    throughout, and the right spec serving after each."""
    gw = gateway_factory([], include_builtin=True, env=FAST)
    model = SMOLLM2.id
    assert admin(gw, "POST", f"/models/{model}/load").status_code == 200
    first = card(gw, model)["spec"]
    assert first["engine_args"] == {"n_ctx": 2048}
    changed = {**spec_dict(SMOLLM2), "engine_args": {"n_ctx": 1024}}
    broken = {"id": SMOLLM2.id, "aliases": SMOLLM2.aliases, "backend": "command",
              "max_concurrency": 1,
              "command": [sys.executable, "-c", "import sys; sys.exit(3)", "{port}"]}
    with chat_load(gw, model) as failures:
        # 1. The models file changes the model's context length; `modelhost reload`.
        write_models(gw, [changed], include_builtin=True)
        result = run_cli("reload", "--url", gw.url)
        assert result.exit_code == 0, result.output
        assert f"{model}: updated (blue-green" in result.output
        now = card(gw, model)
        assert now["rollout"]["state"] == "watching", now["rollout"]
        assert now["spec"]["engine_args"] == {"n_ctx": 1024}
        assert now["rollout"]["probe"]["new_ms"] > 0
        # 2. Back to the first spec, while the update is still watched.
        result = run_cli("models", "--url", gw.url, "rollback", model, "--to", "1")
        assert result.exit_code == 0, result.output
        assert card(gw, model)["spec"]["engine_args"] == {"n_ctx": 2048}
        # 3. A change through the admin API (a built-in model too), then its watch's end.
        resp = admin(gw, "PUT", f"/models/{model}",
                     json={**spec_dict(SMOLLM2), "engine_args": {"n_ctx": 1536}})
        assert resp.status_code == 200, resp.text
        now = rollout_over(gw, model)
        assert now["rollout"]["state"] == "done", now["rollout"]
        assert now["spec"]["engine_args"] == {"n_ctx": 1536}
        # 4. A new version whose worker exits at once: rolled back by itself.
        write_models(gw, [broken], include_builtin=True)
        result = run_cli("reload", "--url", gw.url)
        assert result.exit_code == 1, result.output
        assert f"{model}: rolled back: the new version did not start" in result.output
        assert card(gw, model)["state"] == "ready"
        assert card(gw, model)["spec"]["engine_args"] == {"n_ctx": 1536}
    assert failures == []
    steps = history(gw, model)
    assert [(h["version"], h["action"], h["actor"]) for h in steps] == [
        (1, "created", "config-file"), (2, "updated", "config-file"),
        # Through the admin API, named by the key (none configured here: anonymous).
        (3, "rollback", "anonymous"), (4, "updated", "anonymous"),
        (5, "updated", "config-file"), (6, "rollback", "rollout")]
    assert steps[2]["spec"] == first == steps[0]["spec"]
    assert "rollback to version 1" in steps[2]["reason"]
    assert "exited with status 3" in steps[5]["reason"]
    assert steps[5]["spec"] == steps[3]["spec"]
    # Still answering, with the spec of the PUT.
    with openai_client(gw) as oa:
        assert oa.chat.completions.create(model=model, max_tokens=2, messages=[
            {"role": "user", "content": "Hi"}]).choices


@pytest.mark.parametrize("model", ["whisper-tiny.en", "resemblyzer"])
def test_audio_models_are_probed_with_a_tone(gateway_factory: GatewayFactory,
                                             model: str) -> None:
    """The smoke request of a transcription and a diarization model (a second of tone as a
    WAV file), on the built-in worker apps."""
    package = next(s.source for s in BUILTIN_MODELS if s.id == model)
    if importlib.util.find_spec(getattr(package, "package", "")) is None:
        pytest.skip(f"needs the package of {model}")
    gw = gateway_factory([], include_builtin=True, env=FAST)
    loaded = admin(gw, "POST", f"/models/{model}/load")
    assert loaded.status_code == 200, loaded.text
    resp = admin(gw, "PUT", f"/models/{model}", json={**loaded.json()["spec"], "idle_ttl": 60})
    assert resp.status_code == 200, resp.text
    probe = resp.json()["rollout"]["probe"]
    assert probe["new_ms"] > 0 and probe["old_ms"] > 0


@pytest.fixture
def fake_gateway(gateway_factory: GatewayFactory, tmp_path: Path
                 ) -> tuple[Gateway, dict[str, Any], Path]:
    """A gateway with model `m` (the fake worker) added through the API and loaded."""
    gw = gateway_factory([], env=FAST)
    events = tmp_path / "events"
    spec = fake_model("m", events)
    assert admin(gw, "PUT", "/models/m", json=spec).status_code == 200
    assert admin(gw, "POST", "/models/m/load").status_code == 200
    return gw, spec, events


def stream_load(gw: Gateway, stop: threading.Event, results: list[tuple[int, bool]]) -> None:
    while not stop.is_set():
        resp = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "fake": {"tokens": 6, "gap": 0.05}})
        results.append((resp.status_code, resp.text.rstrip().endswith("data: [DONE]")))


def test_an_update_keeps_streams_whole_and_stops_the_old_worker_after_the_watch(
        fake_gateway: tuple[Gateway, dict[str, Any], Path]) -> None:
    gw, spec, events = fake_gateway
    [old_pid] = started_pids(events)
    stop, results = threading.Event(), list[tuple[int, bool]]()
    threads = [threading.Thread(target=stream_load, args=(gw, stop, results))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        resp = admin(gw, "PUT", "/models/m", json={**spec, "idle_ttl": 120})
        assert resp.status_code == 200, resp.text
        assert resp.json()["rollout"]["state"] == "watching"
        assert resp.json()["spec"]["idle_ttl"] == 120  # the new version serves at once
        new_pid = started_pids(events)[-1]
        assert new_pid != old_pid and pid_alive(old_pid)  # standing by during the watch
        over = rollout_over(gw, "m")
        assert over["rollout"]["state"] == "done"
        assert wait_gone(old_pid)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert results and all(r == (200, True) for r in results), \
        [r for r in results if r != (200, True)][:5]
    assert card(gw, "m")["worker"]["pid"] is not None
    assert pid_alive(new_pid)


def test_a_version_that_fails_its_smoke_request_never_serves(
        fake_gateway: tuple[Gateway, dict[str, Any], Path], tmp_path: Path) -> None:
    gw, spec, _ = fake_gateway
    resp = admin(gw, "PUT", "/models/m", json=failing_model("m", tmp_path, ok=0))
    assert resp.status_code == 409
    error = resp.json()["error"]
    assert error["code"] == "update_rolled_back"
    assert "failed its smoke request" in error["message"]
    assert "answered 500: broken version" in error["message"]
    assert card(gw, "m")["spec"]["command"] == spec["command"]
    assert httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    last = history(gw, "m")[-1]
    assert last["action"] == "rollback" and last["actor"] == "rollout"
    assert "smoke request" in last["reason"]


def test_errors_while_watched_switch_traffic_back(
        fake_gateway: tuple[Gateway, dict[str, Any], Path], tmp_path: Path) -> None:
    """A version that passes its smoke request, then answers 500: rolled back by the watch,
    the old worker (standing by) serving again."""
    gw, spec, events = fake_gateway
    [old_pid] = started_pids(events)
    seen: list[str] = []
    subscribed = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", gw.url + "/api/admin/events", timeout=60) as stream:
            for line in stream.iter_lines():
                subscribed.set()
                seen.append(line)
                if "rolled_back" in line:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(10)
    resp = admin(gw, "PUT", "/models/m", json=failing_model("m", tmp_path, ok=2))
    assert resp.status_code == 200, resp.text
    listener.join(30)
    rollout_events = [json.loads(line[6:]) for line in seen
                      if line.startswith("data: ") and '"type": "rollout"' in line]
    assert [e["state"] for e in rollout_events] == [
        "starting", "probing", "watching", "rolled_back"]
    assert "while watched" in rollout_events[-1]["reason"]
    over = rollout_over(gw, "m", timeout=30)
    assert over["rollout"]["state"] == "rolled_back"
    assert "failed" in over["rollout"]["reason"] and "while watched" in over["rollout"]["reason"]
    assert over["spec"]["command"] == spec["command"]
    assert over["worker"]["pid"] is not None
    assert pid_alive(old_pid)  # the same old worker: it stood by
    assert httpx.post(gw.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert [h["action"] for h in history(gw, "m")] == ["created", "updated", "rollback"]


def test_a_crash_while_watched_rolls_back(
        fake_gateway: tuple[Gateway, dict[str, Any], Path]) -> None:
    gw, spec, events = fake_gateway
    [old_pid] = started_pids(events)
    # The watch is 2 s (FAST): the crash comes well within it.
    resp = admin(gw, "PUT", "/models/m", json={**spec, "max_restarts": 3})
    assert resp.status_code == 200
    new_pid = started_pids(events)[-1]
    crash = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "fake": {"tokens": 3, "crash_after": 1}})
    assert crash.status_code == 200  # the stream began, then broke
    assert wait_gone(new_pid)
    over = rollout_over(gw, "m", timeout=30)
    assert over["rollout"]["state"] == "rolled_back"
    assert "worker exited" in over["rollout"]["reason"]
    assert "max_restarts" not in over["spec"]
    assert over["worker"]["pid"] is not None and pid_alive(old_pid)


def test_rollback_to_a_version_and_to_the_previous_one(
        fake_gateway: tuple[Gateway, dict[str, Any], Path]) -> None:
    gw, spec, _ = fake_gateway
    for ttl in (100, 200):
        assert admin(gw, "PUT", "/models/m", json={**spec, "idle_ttl": ttl}).status_code == 200
        rollout_over(gw, "m")
    # No version: the spec before the current one (idle_ttl 100).
    resp = admin(gw, "POST", "/models/m/rollback")
    assert resp.status_code == 200, resp.text
    assert resp.json()["spec"]["idle_ttl"] == 100
    rollout_over(gw, "m")
    result = run_cli("models", "--url", gw.url, "rollback", "m", "--to", "1")
    assert result.exit_code == 0, result.output
    assert "m: ready" in result.output
    assert "idle_ttl" not in card(gw, "m")["spec"]
    rollout_over(gw, "m")
    assert admin(gw, "POST", "/models/m/rollback", json={"version": 1}).status_code == 409
    assert admin(gw, "POST", "/models/m/rollback", json={"version": 99}).status_code == 404
    assert admin(gw, "POST", "/models/m/rollback", json={"version": 0}).status_code == 400
    result = run_cli("models", "--url", gw.url, "history", "m")
    assert result.exit_code == 0
    assert "rollback to version 1, asked" in result.output
    assert [h["action"] for h in history(gw, "m")] == [
        "created", "updated", "updated", "rollback", "rollback"]


def test_a_model_not_loaded_takes_the_new_spec_at_once(gateway_factory: GatewayFactory,
                                                       tmp_path: Path) -> None:
    gw = gateway_factory([], env=FAST)
    events = tmp_path / "events"
    spec = fake_model("m", events)
    assert admin(gw, "PUT", "/models/m", json=spec).status_code == 200
    resp = admin(gw, "PUT", "/models/m", json={**spec, "idle_ttl": 5})
    assert resp.status_code == 200
    assert resp.json()["rollout"]["mode"] == "direct"
    assert resp.json()["state"] == "cached"
    assert started_pids(events) == []  # no probe, no worker


def test_the_rollback_revision_is_stored_with_its_reason(tmp_path: Path) -> None:
    from modelhost.db.store import Store

    with Store.open(f"sqlite:///{tmp_path / 'db.sqlite'}") as store:
        store.migrate()
        v1 = '{"id": "m", "backend": "remote", "source": {"url": "http://h:1/v1"}}'
        v2 = '{"id": "m", "backend": "remote", "source": {"url": "http://h:2/v1"}}'
        store.upsert_model(v1, "m", "api", "admin-api")
        store.upsert_model(v2, "m", "api", "admin-api")
        assert store.upsert_model(v1, "m", "api", "rollout", rollback="probe failed") == 3
        # The same spec again: nothing new, rollback or not.
        assert store.upsert_model(v1, "m", "api", "rollout", rollback="again") == 3
        rows = store.history("m")
        assert [(r.action, r.reason) for r in rows] == [
            ("created", None), ("updated", None), ("rollback", "probe failed")]


# -- in place: no room on the GPU for both versions (in-process, NVML stand-in) ----------

class MeteredNvml(FakeNvml):
    """A GPU whose used memory grows by `per_worker` for each worker holding it now."""

    def __init__(self, gpus: list[FakeGpu], holders: Callable[[], int], per_worker: int
                 ) -> None:
        super().__init__(gpus)
        self.holders = holders
        self.per_worker = per_worker

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        used = handle.used + self.holders() * self.per_worker
        return SimpleNamespace(total=handle.total, used=used, free=handle.total - used)


async def _no_download(*args: Any) -> Path:
    raise AssertionError("nothing to download")


def gpu_registry(tmp: Path, spec: ModelSpec) -> Registry:
    """A registry over one 1 GiB GPU, 200 MiB used by others, each worker taking 600 MiB:
    room for one worker of `spec` (512 MiB wanted), not two."""
    need = estimate_bytes_per_gpu("command", 0, {}, GIB, 1)
    assert 400 * MIB < need <= 800 * MIB
    ctx = ModelContext(cache_dir=tmp / "cache", log_dir=tmp / "logs", stop_timeout=5,
                       download=_no_download)
    holder: list[Registry] = []

    def holders() -> int:
        registry = holder[0]
        return sum(m.holds_gpus for m in [*registry.models.values(), *registry.extras])

    nvml = MeteredNvml([FakeGpu("NVIDIA A10", "GPU-a", GIB, 200 * MIB)], holders, 600 * MIB)
    registry = Registry(Catalog([spec]), ctx, gpus=GpuMonitor(nvml=nvml))
    holder.append(registry)
    return registry


def test_no_room_for_both_updates_in_place_and_restores_a_failed_one(tmp_path: Path) -> None:
    events = tmp_path / "events"
    first = ModelSpec.model_validate(fake_model("m", events, gpus=[0]))
    second = first.model_copy(update={"idle_ttl": 60.0})
    broken = ModelSpec.model_validate(
        fake_model("m", events, "--exit-at-start", "3", gpus=[0]))

    async def scenario() -> None:
        registry = gpu_registry(tmp_path, first)
        rollouts = Rollouts(registry, RolloutSettings(watch_seconds=0.5, probe_every=0.1))
        await registry.start()
        try:
            await registry.models["m"].ensure_ready(30)
            assert registry.models["m"].gpus == [0]
            served: list[str] = []

            async def requests() -> None:  # a caller holding the model, as a request does
                while True:
                    served.append(await registry.model("m").ensure_ready(30))
                    await asyncio.sleep(0.05)

            caller = asyncio.create_task(requests())
            rollout = await rollouts.update(second)
            assert rollout.mode == "in-place" and not rollout.rolled_back
            assert rollout.warning is not None and "not enough room" in rollout.warning
            assert registry.models["m"].spec == second
            assert registry.models["m"].state.value == "ready"
            while rollouts.running("m"):
                await asyncio.sleep(0.05)
            assert rollouts.last["m"].state == "done"
            assert len([p for p in started_pids(events) if pid_alive(p)]) == 1
            # A new version that cannot start: the previous spec is started again.
            rollout = await rollouts.update(broken)
            assert rollout.mode == "in-place" and rollout.rolled_back
            assert "did not start" in (rollout.reason or "")
            assert registry.models["m"].spec == second
            await registry.model("m").ensure_ready(30)
            assert registry.models["m"].gpus == [0]
            caller.cancel()
            assert served  # the caller was served before, during and after
            assert registry.models["m"].target is Target.ready
        finally:
            await rollouts.close()
            await registry.close()

    asyncio.run(scenario())


def test_a_change_during_a_watch_ends_it_early(gateway_factory: GatewayFactory,
                                               tmp_path: Path) -> None:
    """A second change while the first update is watched (30 s) does not wait for the watch:
    the watched version is kept, the one it replaced stops, and the second change runs."""
    gw = gateway_factory([], env={**FAST, "MODELHOST_ROLLOUT_WATCH_SECONDS": "30"})
    events = tmp_path / "events"
    spec = fake_model("m", events)
    assert admin(gw, "PUT", "/models/m", json=spec).status_code == 200
    assert admin(gw, "POST", "/models/m/load").status_code == 200
    [v1] = started_pids(events)
    assert admin(gw, "PUT", "/models/m", json={**spec, "idle_ttl": 1000}).json()[
        "rollout"]["state"] == "watching"
    v2 = started_pids(events)[-1]
    started = time.monotonic()
    resp = admin(gw, "PUT", "/models/m", json={**spec, "idle_ttl": 2000})
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started < 15
    assert resp.json()["spec"]["idle_ttl"] == 2000
    assert wait_gone(v1)  # the first update's old version: stopped when its watch ended
    assert pid_alive(v2)  # the second update's old version, standing by
    resp = admin(gw, "POST", "/models/m/rollback")  # at once again: back to idle_ttl 1000
    assert resp.status_code == 200, resp.text
    assert resp.json()["spec"]["idle_ttl"] == 1000
    assert [h["action"] for h in history(gw, "m")] == [
        "created", "updated", "updated", "rollback"]
