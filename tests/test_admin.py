"""The admin API over real HTTP: load and unload, specs at run time, events, the key guard."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import GatewayFactory, fake_model, started_pids, wait_for, wait_gone

KEY = "sk-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
# The fake worker is a `command` model: the admin API takes it only when the operator says so.
ALLOW_CODE = {"MODELHOST_ADMIN_ALLOW_CODE": "true"}


def admin(gw_url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{gw_url}/api/admin{path}", headers=AUTH, timeout=60,
                         **kwargs)


def test_admin_routes_need_the_key(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")], env={"MODELHOST_ADMIN_KEYS": KEY})
    assert httpx.get(gw.url + "/api/admin/models").status_code == 401
    assert admin(gw.url, "GET", "/models").status_code == 200


def test_load_and_unload(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events)], env={"MODELHOST_ADMIN_KEYS": KEY})
    card = admin(gw.url, "POST", "/models/fake/load").json()
    assert card["state"] == "ready"
    assert card["worker"]["pid"] > 0
    pid = started_pids(events)[-1]
    card = admin(gw.url, "POST", "/models/fake/unload").json()
    assert card["state"] == "cached"
    assert card["worker"] is None
    assert wait_gone(pid)  # after an unload the worker process is gone
    listing = admin(gw.url, "GET", "/models").json()["data"]
    assert [(m["id"], m["state"]) for m in listing] == [("fake", "cached")]


def test_pinned_gpus_on_a_cpu_machine_is_a_clear_error(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")], env={"MODELHOST_ADMIN_KEYS": KEY})
    resp = admin(gw.url, "POST", "/models/fake/load", json={"gpu_device_ids": [1, 2]})
    assert resp.status_code == 409, resp.text
    message = resp.json()["error"]["message"]
    assert "GPU" in message and "no NVIDIA" in message


def test_a_failed_pinned_load_leaves_the_model_as_it_was(gateway_factory: GatewayFactory
                                                         ) -> None:
    """A load pinned to a GPU that cannot be had fails (409) and takes its pin with it: the
    next plain load starts the model where it belongs (here the CPU), and a loaded model
    asked to move there comes back where it was."""
    gw = gateway_factory([fake_model("fake"), fake_model("loaded")],
                         env={"MODELHOST_ADMIN_KEYS": KEY})
    resp = admin(gw.url, "POST", "/models/fake/load", json={"gpu_device_ids": [0]})
    assert resp.status_code == 409, resp.text
    card = admin(gw.url, "GET", "/models/fake").json()
    assert card["gpu_override"] is None
    assert "gpu_device_ids [0] dropped" in card["last_error"]
    resp = admin(gw.url, "POST", "/models/fake/load")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "ready" and resp.json()["gpus"] == []

    assert admin(gw.url, "POST", "/models/loaded/load").json()["state"] == "ready"
    resp = admin(gw.url, "POST", "/models/loaded/load", json={"gpu_device_ids": [0]})
    assert resp.status_code == 409, resp.text
    assert wait_for(lambda: admin(gw.url, "GET", "/models/loaded").json()["state"] == "ready",
                    timeout=20)
    assert admin(gw.url, "GET", "/models/loaded").json()["gpu_override"] is None


def test_a_loaded_model_is_moved_by_its_owner(gateway_factory: GatewayFactory,
                                              tmp_path: Path) -> None:
    """A load that changes a loaded model's GPUs restarts it there (here: from a pin to no
    GPU back to its own place) and answers once the new worker runs; the same pin again
    changes nothing."""
    events = tmp_path / "ev"
    gw = gateway_factory([fake_model("fake", events)], env={"MODELHOST_ADMIN_KEYS": KEY})
    card = admin(gw.url, "POST", "/models/fake/load", json={"gpu_device_ids": []}).json()
    assert (card["state"], card["gpu_override"]) == ("ready", [])
    first = card["worker"]["pid"]
    again = admin(gw.url, "POST", "/models/fake/load", json={"gpu_device_ids": []}).json()
    assert again["worker"]["pid"] == first
    moved = admin(gw.url, "POST", "/models/fake/load", json={"gpu_device_ids": None}).json()
    assert (moved["state"], moved["gpu_override"]) == ("ready", None)
    assert moved["worker"]["pid"] != first
    assert len(started_pids(events)) == 2


def test_unknown_model_is_404(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")])
    resp = httpx.post(gw.url + "/api/admin/models/nope/load")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"


def test_put_validates_persists_and_serves(gateway_factory: GatewayFactory,
                                           tmp_path: Path) -> None:
    gw = gateway_factory([fake_model("fake")], env=ALLOW_CODE)
    bad = httpx.put(gw.url + "/api/admin/models/new", json={"backend": "command"})
    assert bad.status_code == 400
    assert "command" in bad.json()["error"]["message"]
    spec = fake_model("new", tmp_path / "ev", aliases=["n"])
    resp = httpx.put(gw.url + "/api/admin/models/new", json=spec)
    assert resp.status_code == 200, resp.text
    assert resp.json()["source"] == "api"
    assert httpx.get(gw.url + "/api/admin/models/fake").json()["source"] == "file"
    chat = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "n", "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 200
    history = httpx.get(gw.url + "/api/admin/models/new/history").json()["data"]
    assert [h["action"] for h in history] == ["created"]
    # Change it: a new version, kept in the history.
    spec["max_concurrency"] = 2
    assert httpx.put(gw.url + "/api/admin/models/new", json=spec).status_code == 200
    history = httpx.get(gw.url + "/api/admin/models/new/history").json()["data"]
    assert [h["version"] for h in history] == [1, 2]
    assert httpx.delete(gw.url + "/api/admin/models/new").status_code == 200
    assert httpx.get(gw.url + "/v1/models/new").status_code == 404


def test_events_stream_state_changes(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")])
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", gw.url + "/api/admin/events", timeout=30) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    ready.set()
                    if seen[-1].get("state") == "ready":
                        return

    listener = threading.Thread(target=listen)
    listener.start()
    assert ready.wait(10)  # the snapshot arrived: the subscription is live
    httpx.post(gw.url + "/api/admin/models/fake/load", timeout=30)
    listener.join(20)
    states = [(e["previous"], e["state"]) for e in seen if e["type"] == "state"]
    assert states == [("cached", "starting"), ("starting", "ready")]
    assert seen[0]["type"] == "snapshot"
    assert seen[0]["models"][0]["id"] == "fake"


def test_openapi_groups_the_admin_routes(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")])
    spec = httpx.get(gw.url + "/openapi.json").json()
    tags = {tag for path in spec["paths"].values() for op in path.values()
            for tag in op.get("tags", [])}
    assert {"models", "downloads", "gpus", "events"} <= tags
    assert "/api/admin/models/{model_id}/load" in spec["paths"]


def test_state_survives_kill_9(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    data = str(tmp_path / "shared-data")
    events = tmp_path / "ev"
    models = [fake_model("declared", events), fake_model("idle")]
    gw = gateway_factory(models, env={"MODELHOST_DATA_DIR": data, **ALLOW_CODE})
    added = fake_model("added", tmp_path / "ev-added", aliases=["a"])
    assert httpx.put(gw.url + "/api/admin/models/added", json=added).status_code == 200
    assert httpx.post(gw.url + "/api/admin/models/declared/load", timeout=30).json()[
        "state"] == "ready"
    pid = started_pids(events)[-1]
    gw.proc.kill()
    gw.proc.wait()
    assert wait_gone(pid)

    again = gateway_factory(models, env={"MODELHOST_DATA_DIR": data})
    # The loaded model loads again by itself; the idle one stays unloaded.
    again.wait_state("declared", "ready", timeout=20)
    assert again.model("idle")["state"] == "cached"
    # The model added at run time is still served, with its history.
    assert again.model("a")["id"] == "added"
    history = httpx.get(again.url + "/api/admin/models/added/history").json()["data"]
    assert [h["action"] for h in history] == ["created"]
    # An unload is remembered too.
    httpx.post(again.url + "/api/admin/models/declared/unload", timeout=30)
    again.stop()
    third = gateway_factory(models, env={"MODELHOST_DATA_DIR": data})
    assert third.model("declared")["state"] == "cached"


def test_kill_9_during_a_load_then_restart(gateway_factory: GatewayFactory,
                                           tmp_path: Path) -> None:
    data = str(tmp_path / "shared-data")
    events = tmp_path / "ev"
    models = [fake_model("slow", events, "--startup-delay", "3")]
    gw = gateway_factory(models, env={"MODELHOST_DATA_DIR": data})
    resp = admin(gw.url, "POST", "/models/slow/load", params={"wait": "false"})
    assert resp.json()["state"] in ("cached", "starting")
    gw.wait_state("slow", "starting", timeout=10)
    assert wait_for(lambda: len(started_pids(events)) == 1, timeout=10)
    gw.proc.kill()
    gw.proc.wait()
    assert wait_gone(started_pids(events)[0])  # the half-started worker went with it
    again = gateway_factory(models, env={"MODELHOST_DATA_DIR": data})
    again.wait_state("slow", "ready", timeout=30)  # the load was not lost
