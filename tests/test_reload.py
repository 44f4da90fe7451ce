"""Hot reload of the models file (`modelhost reload`, `POST /api/admin/reload`, SIGHUP) on real
gateways with fake workers: only what changed in the file changes; an invalid file changes
nothing and says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import (
    Gateway,
    GatewayFactory,
    fake_model,
    pid_alive,
    started_pids,
    wait_for,
    wait_gone,
)

FAST = {"MODELHOST_ROLLOUT_WATCH_SECONDS": "1", "MODELHOST_ROLLOUT_PROBE_EVERY": "0.2",
        "MODELHOST_ADMIN_ALLOW_CODE": "true"}


def write(gw: Gateway, models: list[dict[str, Any]]) -> None:
    (gw.tmp / "models.yaml").write_text(yaml.safe_dump(
        {"include_builtin": False, "models": models}))


def reload(gw: Gateway) -> httpx.Response:
    return httpx.post(gw.url + "/api/admin/reload", timeout=120)


def admin(gw: Gateway, path: str) -> Any:
    return httpx.get(gw.url + "/api/admin" + path, timeout=10).json()


def load(gw: Gateway, model_id: str) -> None:
    resp = httpx.post(f"{gw.url}/api/admin/models/{model_id}/load", timeout=60)
    assert resp.status_code == 200, resp.text


def test_reload_changes_adds_and_removes_only_what_the_file_changed(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    ev = {name: tmp_path / name for name in ("changed", "same", "gone", "new")}
    models = [fake_model("changed", ev["changed"]), fake_model("same", ev["same"]),
              fake_model("gone", ev["gone"])]
    gw = gateway_factory(models, env=FAST)
    for model_id in ("changed", "same", "gone"):
        load(gw, model_id)
    api_spec = fake_model("api", None)
    assert httpx.put(gw.url + "/api/admin/models/api", json=api_spec).status_code == 200
    [same_pid] = started_pids(ev["same"])
    [gone_pid] = started_pids(ev["gone"])
    [changed_pid] = started_pids(ev["changed"])

    write(gw, [{**models[0], "idle_ttl": 77}, models[1], fake_model("new", ev["new"])])
    resp = reload(gw)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["added"] == ["new"]
    assert result["removed"] == ["gone"]
    assert result["unchanged"] == ["same"]
    assert list(result["changed"]) == ["changed"]
    assert result["changed"]["changed"]["mode"] == "blue-green"

    ids = {m["id"] for m in admin(gw, "/models")["data"]}
    assert ids == {"changed", "same", "new", "api"}  # the API's model is untouched
    assert admin(gw, "/models/changed")["spec"]["idle_ttl"] == 77
    assert started_pids(ev["same"]) == [same_pid] and pid_alive(same_pid)
    assert wait_gone(gone_pid)
    assert wait_for(lambda: not pid_alive(changed_pid), 20)  # after the watch
    assert admin(gw, "/models/new")["state"] == "cached"
    history = admin(gw, "/models/gone/history")["data"]
    assert [h["action"] for h in history] == ["created", "deleted"]
    assert admin(gw, "/models/changed/history")["data"][-1]["actor"] == "config-file"

    # The same file again: nothing to do.
    again = reload(gw).json()
    assert again["added"] == again["removed"] == [] and again["changed"] == {}


def test_an_invalid_file_changes_nothing_and_says_why(gateway_factory: GatewayFactory,
                                                       tmp_path: Path) -> None:
    events = tmp_path / "events"
    gw = gateway_factory([fake_model("a", events)], env=FAST)
    load(gw, "a")
    write(gw, [{**fake_model("a", events), "max_concurrency": 0}, fake_model("b")])
    resp = reload(gw)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "invalid_models_file"
    assert "nothing changed" in error["message"]
    assert "field 'max_concurrency'" in error["message"]
    assert {m["id"] for m in admin(gw, "/models")["data"]} == {"a"}
    assert admin(gw, "/models/a")["state"] == "ready"
    assert len(started_pids(events)) == 1
    assert "reload: the models file is not applied, nothing changed" in gw.output()
    # Not YAML at all; then a name that a model added through the API has.
    (gw.tmp / "models.yaml").write_text("models: [oops\n")
    assert reload(gw).json()["error"]["code"] == "invalid_models_file"
    assert httpx.put(gw.url + "/api/admin/models/api", json=fake_model("api", None, aliases=[
        "taken"])).status_code == 200
    write(gw, [fake_model("a", events), fake_model("b", None, aliases=["taken"])])
    resp = reload(gw)
    assert resp.status_code == 400
    assert "name 'taken' of model 'b' is already used by model 'api'" in \
        resp.json()["error"]["message"]
    assert {m["id"] for m in admin(gw, "/models")["data"]} == {"a", "api"}


def test_the_cli_reloads(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("a")], env=FAST)
    write(gw, [fake_model("a"), fake_model("b")])
    done = subprocess.run([sys.executable, "-m", "modelhost", "reload", "--url", gw.url],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["b: added", "1 model(s) unchanged"]


def test_sighup_reloads_a_running_serve(gateway_factory: GatewayFactory,
                                        tmp_path: Path) -> None:
    events = tmp_path / "events"
    gw = gateway_factory([fake_model("a", events)], env=FAST)
    load(gw, "a")
    [old_pid] = started_pids(events)
    write(gw, [{**fake_model("a", events), "idle_ttl": 42}, fake_model("b")])
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "b" in {m["id"] for m in admin(gw, "/models")["data"]}, 20), \
        gw.output()[-3000:]
    assert wait_for(lambda: admin(gw, "/models/a")["spec"].get("idle_ttl") == 42, 20)
    assert wait_gone(old_pid, 20)
    assert httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "a", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert gw.proc.poll() is None  # SIGHUP did not stop it
    # An invalid file: logged, nothing changed, still serving.
    (gw.tmp / "models.yaml").write_text("models: 3\n")
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "SIGHUP: reload refused" in gw.output(), 10)
    assert {m["id"] for m in admin(gw, "/models")["data"]} == {"a", "b"}
    assert gw.proc.poll() is None


def test_a_declared_model_changed_through_the_api_stays_the_files(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "events"
    declared = fake_model("a", events)
    gw = gateway_factory([declared], env=FAST)
    load(gw, "a")
    resp = httpx.put(gw.url + "/api/admin/models/a", json={**declared, "idle_ttl": 11},
                     timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["rollout"]["mode"] == "blue-green"
    assert resp.json()["spec"]["idle_ttl"] == 11
    assert httpx.delete(gw.url + "/api/admin/models/a").status_code == 409
    # The file did not change this entry: a reload leaves the API's change alone...
    assert reload(gw).json()["unchanged"] == ["a"]
    assert admin(gw, "/models/a")["spec"]["idle_ttl"] == 11
    # ... until it does.
    assert wait_for(lambda: admin(gw, "/models/a")["rollout"]["finished_at"], 20)
    write(gw, [{**declared, "idle_ttl": 22}])
    assert list(reload(gw).json()["changed"]) == ["a"]
    assert admin(gw, "/models/a")["spec"]["idle_ttl"] == 22
    assert [(h["action"], h["actor"]) for h in admin(gw, "/models/a/history")["data"]] == [
        ("created", "config-file"), ("updated", "anonymous"), ("updated", "config-file")]
