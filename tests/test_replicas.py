"""`replicas: N`: N fake workers behind one model, end to end through a real gateway.

Requests spread over the replicas (each worker's own /stats counts what it answered); a
replica `kill -9`ed under a constant load loses no request (one whose worker died before
answering is retried on another replica) and comes back; scaling N up and down through the
admin API (a blue-green rollout) drops nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from modelhost.config import ModelSpec
from modelhost.registry.context import Place
from modelhost.registry.replicas import Replica, Replicas
from modelhost.workers.launchers import Worker
from tests.conftest import (
    Gateway,
    GatewayFactory,
    constant_load,
    fake_model,
    pid_alive,
    wait_for,
    wait_gone,
)

FAST = {"MODELHOST_ROLLOUT_WATCH_SECONDS": "1", "MODELHOST_ROLLOUT_PROBE_EVERY": "0.2",
        "MODELHOST_ROLLOUT_MIN_REQUESTS": "3", "MODELHOST_ROLLOUT_PROBE_TIMEOUT": "20",
        "MODELHOST_ADMIN_ALLOW_CODE": "true"}


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, gw.url + "/api/admin" + path, timeout=120, **kwargs)


def replicas(gw: Gateway, model_id: str = "m") -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] | None = gw.admin_card(model_id)["replicas"]
    return cards or []


def ready(gw: Gateway, n: int) -> bool:
    cards = replicas(gw)
    return len(cards) == n and all(c["state"] == "ready" and c["base_url"] for c in cards)


@contextmanager
def load(gw: Gateway, clients: int = 4) -> Iterator[list[str]]:
    """`clients` threads sending chat requests (not streamed, each taking 50 ms at the
    worker) until the block ends; yields the failures."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "fake": {"first_token_delay": 0.05}}
    with constant_load(gw.url + "/v1/chat/completions", body, clients) as (failures, done):
        assert wait_for(lambda: len(done) >= clients, 30), failures
        yield failures
        assert len(done) > clients


def served(card: dict[str, Any]) -> int:
    """What the replica's worker itself says it answered (the fake worker's /stats)."""
    base = card["base_url"].removesuffix("/v1")
    stats: dict[str, int] = httpx.get(base + "/stats", timeout=5).json()
    return stats["requests"]


def test_three_replicas_share_the_load_and_survive_a_kill(gateway_factory: GatewayFactory,
                                                          tmp_path: Path) -> None:
    gw = gateway_factory([fake_model("m", tmp_path / "events", replicas=3,
                                     max_concurrency=2)])
    assert admin(gw, "POST", "/models/m/load").status_code == 200
    assert wait_for(lambda: ready(gw, 3), 30), replicas(gw)
    with load(gw) as failures:
        time.sleep(1.5)
        cards = replicas(gw)
        assert all(served(c) > 0 for c in cards), cards  # every worker answered some
        assert len({c["pid"] for c in cards}) == 3
        victim = cards[1]
        os.kill(victim["pid"], signal.SIGKILL)
        # Out of the rotation at once, then back (another process) while the load goes on.
        assert wait_for(lambda: replicas(gw)[1]["pid"] not in (None, victim["pid"])
                        and replicas(gw)[1]["state"] == "ready", 20), replicas(gw)
        assert gw.model("m")["state"] == "ready"  # served by the others meanwhile
        first = replicas(gw)[0]
        os.kill(first["pid"], signal.SIGKILL)  # replica 0, the model's own worker
        assert wait_for(lambda: replicas(gw)[0]["pid"] not in (None, first["pid"])
                        and ready(gw, 3), 20), replicas(gw)
        time.sleep(1)
    assert failures == []
    cards = replicas(gw)
    assert not pid_alive(victim["pid"]) and not pid_alive(first["pid"])
    assert all(c["in_flight"] == 0 for c in cards), cards  # every call let go of its replica
    assert served(cards[1]) > 0
    gw.stop()  # every replica's worker goes with the gateway
    assert all(wait_gone(c["pid"]) for c in cards), cards
    # Each replica wrote its own log (two processes never rotate one file).
    logs = gw.tmp / "data" / "logs" / "workers"
    assert sorted(p.name for p in logs.iterdir()) == ["m.log", "m.r1.log", "m.r2.log"]
    assert all(p.stat().st_size > 0 for p in logs.iterdir())


def test_scaling_through_the_admin_api_drops_nothing(gateway_factory: GatewayFactory,
                                                     tmp_path: Path) -> None:
    gw = gateway_factory([], env=FAST)
    spec = fake_model("m", tmp_path / "events", replicas=3)
    assert admin(gw, "PUT", "/models/m", json=spec).status_code == 200
    assert admin(gw, "POST", "/models/m/load").status_code == 200
    assert wait_for(lambda: ready(gw, 3), 30), replicas(gw)
    with load(gw) as failures:
        time.sleep(0.5)
        for n in (1, 2):
            resp = admin(gw, "PUT", "/models/m", json={**spec, "replicas": n})
            assert resp.status_code == 200, resp.text
            assert resp.json()["spec"].get("replicas", 1) == n
            if n == 1:
                assert wait_for(lambda: gw.admin_card("m")["replicas"] is None, 10)
            else:
                assert wait_for(lambda: ready(gw, 2), 30), replicas(gw)
            assert wait_for(lambda: (gw.admin_card("m")["rollout"] or {})
                            .get("finished_at"), 30)
            time.sleep(0.5)
    assert failures == []
    card = gw.admin_card("m")
    assert card["state"] == "ready" and card["spec"]["replicas"] == 2
    # The old versions' workers are gone: two run now (the model's and one more).
    assert all(pid_alive(c["pid"]) for c in card["replicas"])


def test_one_replica_has_no_replica_cards(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("m")])
    resp = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    card = gw.admin_card("m")
    assert card["replicas"] is None and "replicas" not in card["spec"]


def test_a_failed_model_stops_its_other_replicas(gateway_factory: GatewayFactory,
                                                 tmp_path: Path) -> None:
    """Replica 0 crashes with no restart left: the model is `failed`, and its other
    replicas are stopped with it (none is left running behind a failed model)."""
    gw = gateway_factory([fake_model("m", tmp_path / "events", replicas=2, max_restarts=0)])
    assert admin(gw, "POST", "/models/m/load").status_code == 200
    assert wait_for(lambda: ready(gw, 2), 30), replicas(gw)
    first, other = replicas(gw)
    os.kill(first["pid"], signal.SIGKILL)
    gw.wait_state("m", "failed", 10)
    assert wait_for(lambda: not pid_alive(other["pid"]), 15), replicas(gw)
    assert replicas(gw)[1]["state"] == "stopped"


async def no_launch(replica: int, weights: Path | None, place: Place) -> Worker:
    raise AssertionError("no worker is started here")


async def no_place(replica: Replica) -> list[int]:
    raise AssertionError("no GPU is asked for here")


def test_the_pick_is_the_least_loaded_ready_replica_and_passes_over_a_shunned_one() -> None:
    spec = ModelSpec.model_validate({"id": "m", "backend": "command", "replicas": 3,
                                     "command": ["x", "{port}"]})
    chosen = Replicas("m", spec, no_launch, lambda: None, no_place, lambda: "http://a/v1")
    one, two = chosen.extra
    assert chosen.pick("http://a/v1") == "http://a/v1"  # the others are not ready yet
    assert chosen.pick(None) is None
    one.base, two.base = "http://b/v1", "http://c/v1"
    assert chosen.took(chosen.pick("http://a/v1") or "") is None  # replica 0, none in flight
    assert chosen.took(chosen.pick("http://a/v1") or "") is one
    assert chosen.pick("http://a/v1") == "http://c/v1"
    chosen.done(None)
    assert chosen.pick("http://a/v1") == "http://a/v1"
    # A replica a call could not reach is passed over, until it is the only one left.
    assert asyncio.run(chosen.lost("http://a/v1", grace=0)) is True
    assert chosen.pick("http://a/v1") == "http://c/v1"
    one.base = two.base = None
    assert chosen.pick("http://a/v1") == "http://a/v1"
    chosen.done(one)
    assert one.in_flight == 0 and chosen.primary_in_flight == 0
