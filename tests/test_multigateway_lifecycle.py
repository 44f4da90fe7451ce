"""Several gateways sharing one PostgreSQL database act as one on a model's lifecycle (issue
18, docs/scale-out.md): an unload through any gateway unloads it on all, idleness counts
every gateway's requests, and workers listen where gateways on other machines reach them.

Real PostgreSQL (`tests/postgres.py`), real `modelhost serve` processes, fake workers
(`tests/fake_worker.py`); "other machines" are loopback addresses (127.0.0.2, 127.0.0.3).
The tests without gateways check the parts (settings, the local launcher) on their own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from modelhost.config import ModelSpec
from modelhost.db.schema import ModelActivity, ModelWorker
from modelhost.db.store import Store
from modelhost.settings import Settings
from modelhost.workers.launchers import LocalProcessLauncher, reach
from tests.conftest import (
    Gateway,
    GatewayFactory,
    fake_model,
    pid_alive,
    started_pids,
    wait_for,
)
from tests.postgres import needs_postgres
from tests.test_multigateway import _close, _members, admin, chat, env, listed, within


@pytest.fixture(scope="module")
def pair(module_gateway_factory: GatewayFactory, database: str) -> tuple[Gateway, Gateway]:
    """Two gateways on the database, shared by the tests that use models of their own."""
    return (module_gateway_factory(models=[], env=env(database)),
            module_gateway_factory(models=[], env=env(database)))


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    with Store.open(database) as opened:
        yield opened


def card(gw: Gateway, model: str) -> dict[str, Any]:
    answer = admin(gw, "GET", f"/models/{model}")
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses a worker (its shim `pid` and the shim's children) listens on."""
    shim = psutil.Process(pid)
    return {(c.laddr.ip, c.laddr.port) for proc in [shim, *shim.children(recursive=True)]
            for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def refused(port: int) -> None:
    """127.0.0.1:`port` refuses a connection, unless another test's process happens to
    listen there (the tests run in parallel; `listening` is the proof)."""
    taken = any(c.laddr == ("127.0.0.1", port) and c.status == psutil.CONN_LISTEN
                for c in psutil.net_connections(kind="tcp"))
    if not taken:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def alive(events: Path) -> list[int]:
    return [pid for pid in started_pids(events) if pid_alive(pid)]


@needs_postgres
def test_unload_through_the_relaying_gateway_unloads_everywhere(
        pair: tuple[Gateway, Gateway], store: Store, tmp_path: Path) -> None:
    a, b = pair
    events = tmp_path / "unload.events"
    assert admin(a, "PUT", "/models/unl", json=fake_model("unl", events)).status_code == 200
    within(1.0, lambda: listed(b, "unl") == 200)
    assert chat(a, "unl").status_code == 200  # A owns it
    assert chat(b, "unl").status_code == 200  # B relays to A's worker
    [owner_worker] = alive(events)
    assert card(b, "unl")["worker"] is None

    # Unloaded through B, which only relays: A's worker stops, within a second or so.
    answer = admin(b, "POST", "/models/unl/unload")
    assert answer.status_code == 200, answer.text
    print(f"owner's worker gone: {within(5.0, lambda: not pid_alive(owner_worker)):.2f} s")
    assert wait_for(lambda: card(a, "unl")["state"] == "cached", 5), card(a, "unl")
    assert card(b, "unl")["state"] == "cached"
    assert store.desired_states()["unl"].desired == "unloaded"
    # Nobody takes it over: no worker anywhere for a few seconds (takeover would be ~2 s).
    time.sleep(3)
    assert len(started_pids(events)) == 1 and alive(events) == []
    assert {card(a, "unl")["state"], card(b, "unl")["state"]} == {"cached"}

    # A request through either starts it again: one worker, the other gateway relays.
    assert chat(b, "unl").status_code == 200
    assert chat(a, "unl").status_code == 200
    assert len(alive(events)) == 1 and len(started_pids(events)) == 2
    assert [card(gw, "unl")["worker"] is not None for gw in (a, b)] == [False, True]

    # Unloaded through the owner (B now): A, relaying, does not take it over.
    assert admin(b, "POST", "/models/unl/unload").status_code == 200
    assert wait_for(lambda: alive(events) == [], 5)
    time.sleep(3)
    assert len(started_pids(events)) == 2 and alive(events) == []
    assert card(a, "unl")["state"] == "cached"
    # A load through the admin API of either starts it again, once.
    assert admin(a, "POST", "/models/unl/load").status_code == 200
    assert chat(b, "unl").status_code == 200
    assert len(alive(events)) == 1 and len(started_pids(events)) == 3


@needs_postgres
def test_an_unload_sent_while_the_owner_did_not_listen_still_stops_its_worker(
        pair: tuple[Gateway, Gateway], database: str, tmp_path: Path) -> None:
    """The listening connections break (killed by the server), the model is unloaded
    through the relaying gateway at once, before they listen again: the notification is
    lost, yet the owner reads the stored unload when it listens again and stops its worker
    (without it, the worker would run on until its idle timer)."""
    a, b = pair
    events = tmp_path / "lost.events"
    assert admin(a, "PUT", "/models/lost", json=fake_model("lost", events)).status_code == 200
    within(1.0, lambda: listed(b, "lost") == 200)
    assert chat(b, "lost").status_code == 200  # B owns it
    assert chat(a, "lost").status_code == 200  # A relays
    [owner_worker] = alive(events)
    assert _end_listening(database) >= 2  # (and any other test's gateway on this server)
    assert admin(a, "POST", "/models/lost/unload").status_code == 200
    print(f"owner's worker gone: {within(6.0, lambda: not pid_alive(owner_worker)):.2f} s")
    log = b.log.read_text(errors="replace")
    assert "listening to model changes again" in log
    # Sent within the reconnection's 1 s, the unload was lost and caught up; a machine slow
    # enough to send it later would have B hear it (the test above covers the gap for sure).
    print("caught up:", "was unloaded on every gateway while this one did not listen" in log)
    assert wait_for(lambda: card(b, "lost")["state"] == "cached", 5), card(b, "lost")
    time.sleep(2)
    assert alive(events) == [] and len(started_pids(events)) == 1


def _end_listening(database: str) -> int:
    """Kill every gateway's listening connection to the server (as a restart of it or a
    network fault would); how many there were."""
    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'modelhost-listen'")).scalar() or 0)
    finally:
        engine.dispose()


@needs_postgres
def test_the_unloads_stored_while_a_gateway_did_not_listen_are_caught_up(
        database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parts (`Member`), with a 2 s reconnection delay so that the unload surely falls
    in the gap: one unloaded in the gap is acted on once listening again; one heard before
    is not acted on twice; one loaded in the gap is left alone."""
    from modelhost.cluster import notify

    monkeypatch.setattr(notify, "RECONNECT_S", 2.0)

    async def main() -> None:
        a, b = await _members(database, 2)
        heard: list[str] = []
        b.on_unload = heard.append
        try:
            await a.start()
            await b.start()
            assert await until(lambda: b._desired_seen is not None, 5)  # its first reading
            await a.announce_unload("heard")
            assert await until(lambda: heard == ["heard"], 5), heard
            await asyncio.sleep(0.3)  # b's first reading of the desired states is done
            assert _end_listening(database) >= 2
            listener = b._listener
            assert listener is not None
            assert await until(lambda: not listener.listening.is_set(), 5)
            await a.announce_unload("gap")  # sent while b does not listen: lost
            await a.persistence.now(lambda store: store.set_desired("loaded", "loaded"))
            assert heard == ["heard"]
            assert await until(lambda: listener.listening.is_set(), 10)
            assert await until(lambda: heard == ["heard", "gap"], 5), heard
            await asyncio.sleep(0.5)
            assert heard == ["heard", "gap"]
        finally:
            await _close([a, b])

    asyncio.run(main())


async def until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@needs_postgres
@pytest.mark.parametrize("ttl", [4, 1])
def test_idle_time_counts_the_requests_of_every_gateway(
        pair: tuple[Gateway, Gateway], store: Store, tmp_path: Path, ttl: int) -> None:
    """idle_ttl 4 s: requests through B only keep A's worker up well past it; once they
    stop, it is unloaded (everywhere) within the TTL and a few seconds, and stays so. Each
    gateway records its uses every 2 s, so across gateways nothing is idle for less than
    `RECORD_LAG_S` (3.5 s): an idle_ttl of 1 s is held to that, not unloaded under use."""
    a, b = pair
    events = tmp_path / "idle.events"
    spec = fake_model("idle", events, idle_ttl=ttl)
    assert admin(a, "PUT", "/models/idle", json=spec).status_code == 200
    within(1.0, lambda: listed(b, "idle") == 200)
    assert chat(a, "idle").status_code == 200  # A owns it; no more requests through A
    [worker] = alive(events)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 9:  # well past idle_ttl for A
        assert chat(b, "idle").status_code == 200
        time.sleep(0.3)
    assert pid_alive(worker) and len(started_pids(events)) == 1
    assert card(a, "idle")["state"] == "ready"
    with store.engine.connect() as conn:  # B's uses are recorded, not A's alone
        gateways = conn.scalars(sa.select(ModelActivity.gateway_id)
                                .where(ModelActivity.model_id == "idle")).all()
    assert len(set(gateways)) == 2, gateways

    stopped = time.monotonic()
    assert wait_for(lambda: not pid_alive(worker), 10)
    took = time.monotonic() - stopped
    print(f"unloaded {took:.1f} s after the last request (idle_ttl {ttl} s)")
    assert took >= 3.0, took  # not before the TTL or 3.5 s (less the last request's time)
    assert wait_for(lambda: card(b, "idle")["state"] == "cached", 3), card(b, "idle")
    time.sleep(3)
    assert len(started_pids(events)) == 1 and alive(events) == []
    assert card(a, "idle")["state"] == "cached"
    assert admin(a, "DELETE", "/models/idle").status_code in (200, 204)
    within(2.0, lambda: listed(b, "idle") == 404)


@needs_postgres
def test_workers_listen_where_the_other_gateways_reach_them(
        gateway_factory: GatewayFactory, database: str, store: Store, tmp_path: Path) -> None:
    """Gateway A's workers on 127.0.0.2 only, B's on 127.0.0.3: B relays to A's worker at
    the address A published."""
    a = gateway_factory(models=[], env={**env(database), "MODELHOST_WORKER_HOST": "127.0.0.2"})
    b = gateway_factory(models=[], env={**env(database), "MODELHOST_WORKER_HOST": "127.0.0.3"})
    events = tmp_path / "far.events"
    spec = fake_model("far", events, "--host", "{host}")
    assert admin(a, "PUT", "/models/far", json=spec).status_code == 200
    within(1.0, lambda: listed(b, "far") == 200)
    assert chat(a, "far").status_code == 200  # A owns it
    with store.engine.connect() as conn:
        [address] = conn.scalars(sa.select(ModelWorker.address)
                                 .where(ModelWorker.model_id == "far")).all()
    port = card(a, "far")["worker"]["port"]
    assert address == f"http://127.0.0.2:{port}/v1"
    with socket.create_connection(("127.0.0.2", port), timeout=2):
        pass
    assert listening(card(a, "far")["worker"]["pid"]) == {("127.0.0.2", port)}
    refused(port)

    for gw in (b, a, b):
        answer = chat(gw, "far")
        assert answer.status_code == 200, answer.text
    assert len(started_pids(events)) == 1
    assert card(b, "far")["worker"] is None  # relayed to A's worker

    # A stops: B takes the model over, its own worker on 127.0.0.3, published so.
    a.stop()
    assert wait_for(lambda: chat(b, "far").status_code == 200
                    and card(b, "far")["worker"] is not None, 15)

    def published() -> list[str]:
        with store.engine.connect() as conn:
            return list(conn.scalars(sa.select(ModelWorker.address)
                                     .where(ModelWorker.model_id == "far")).all())

    port = card(b, "far")["worker"]["port"]
    assert wait_for(lambda: published() == [f"http://127.0.0.3:{port}/v1"], 5), published()


# -- the parts -------------------------------------------------------------------------------


@needs_postgres
def test_an_unload_and_the_uses_through_the_database(database: str) -> None:
    """An unload announced by one member is heard by the other (not echoed to itself), with
    the desired state; uses are recorded per gateway, the most recent one counts, and a
    gateway's rows go when it forgets them."""

    async def main() -> None:
        first, second = await _members(database, 2)
        heard: dict[str, list[str]] = {"first": [], "second": []}
        first.on_unload, second.on_unload = heard["first"].append, heard["second"].append
        try:
            await first.start()
            await second.start()
            t0 = time.monotonic()
            await first.announce_unload("m")
            for _ in range(100):
                if heard["second"]:
                    break
                await asyncio.sleep(0.01)
            print(f"unload heard after {time.monotonic() - t0:.3f} s")
            assert heard == {"first": [], "second": ["m"]}
            assert first.unloaded_after("m", t0) and second.unloaded_after("m", t0)
            assert not second.unloaded_after("m", time.monotonic())
            desired = await second.desired("m")
            assert desired is not None and desired[0] == "unloaded"
            # A relay that finds `unloaded` stored: heard since it began, an unload...
            assert await second.hears_unload("m", t0, 1.0)
            # ...not heard while listening: a gateway's late note of its own stop, not one.
            later = time.monotonic()
            assert not await second.hears_unload("m", later, 0.2)
            assert heard["second"] == ["m"]
            # Not listening: the stored state is believed, and the model stopped here.
            await second.stop()
            assert await second.hears_unload("m", later, 0.2)
            assert heard["second"] == ["m", "m"]

            assert await first.idle_for("m") is None
            await first.record_use({"m": 30.0})
            await second.record_use({"m": 2.0})
            await first.record_use({"m": 60.0})  # older than what it recorded: kept
            idle = await first.idle_for("m")
            assert idle is not None and 2.0 <= idle < 5.0, idle
            await second.forget_uses(24 * 3600.0)  # the second stops
            idle = await first.idle_for("m")
            assert idle is not None and 30.0 <= idle < 33.0, idle
            await first.forget_uses(24 * 3600.0)
            assert await first.idle_for("m") is None
        finally:
            await _close([first, second])

    asyncio.run(main())



def test_worker_host_settings() -> None:
    assert Settings.with_overrides().worker_host == "127.0.0.1"  # loopback, as alone
    for everywhere in ("0.0.0.0", "::"):
        with pytest.raises(ValidationError, match="MODELHOST_WORKER_ADVERTISE_HOST"):
            Settings.with_overrides(worker_host=everywhere)
        settings = Settings.with_overrides(worker_host=everywhere,
                                           worker_advertise_host="10.0.0.7")
        assert settings.worker_advertise_host == "10.0.0.7"
    assert (reach("0.0.0.0"), reach("::"), reach("10.0.0.7")) == ("127.0.0.1", "::1",
                                                                  "10.0.0.7")


def test_a_local_worker_listens_on_the_worker_host(tmp_path: Path) -> None:
    """It answers on the worker host, not on 127.0.0.1; this gateway reaches it there, the
    others at the advertised host."""
    spec = ModelSpec.model_validate(fake_model("here", None, "--host", "{host}"))

    async def main() -> None:
        launcher = LocalProcessLauncher(tmp_path, 5.0, lambda: None, 60.0, 1 << 20, 1,
                                        host="127.0.0.2", advertised_host="gw-a.internal")
        worker = await launcher.start(spec, None, [])
        try:
            await worker.wait_ready(20)
            assert worker.base_url == f"http://127.0.0.2:{worker.port}/v1"
            assert worker.advertised_url == f"http://gw-a.internal:{worker.port}/v1"
            assert worker.pid is not None and worker.port is not None
            assert listening(worker.pid) == {("127.0.0.2", worker.port)}
            refused(worker.port)
        finally:
            await worker.stop()

    asyncio.run(main())
    default = LocalProcessLauncher(tmp_path, 5.0, lambda: None, 60.0, 1 << 20, 1)
    assert default.host == "127.0.0.1" and default.advertised_host is None
