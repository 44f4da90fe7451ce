"""Several gateways sharing one PostgreSQL database (issue 18, docs/scale-out.md).

A real PostgreSQL server on loopback (Debian's binaries, `tests/postgres.py`), two real
`modelhost serve` processes on it (`MODELHOST_DATABASE_URL`), fake workers
(`tests/fake_worker.py`). Skipped, saying why, only where the server binaries (or psycopg)
are missing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.cluster.member import Member, libpq_url
from modelhost.config import HubSource
from modelhost.db.store import Store
from modelhost.db.workers import CHANNEL, Change, parse_payload
from modelhost.downloads.cache import repo_folder
from modelhost.persistence import Persistence
from tests.conftest import (
    Gateway,
    GatewayFactory,
    fake_model,
    pid_alive,
    started_pids,
    wait_for,
)
from tests.postgres import needs_postgres

pytestmark = needs_postgres

KEY = "sk-multi-user-4c1e9a7b2d5f8e3a"
ADMIN = "sk-multi-admin-7f2a9c4e1b8d6a3f"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def store(database: str) -> Iterator[Store]:
    with Store.open(database) as opened:
        yield opened


def env(database: str) -> dict[str, str]:
    return {"MODELHOST_DATABASE_URL": database, "OPENAI_API_KEYS": KEY,
            "MODELHOST_ADMIN_KEYS": ADMIN, "MODELHOST_ADMIN_ALLOW_CODE": "1",
            "MODELHOST_LOG_LEVEL": "DEBUG"}


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/api/admin{path}", timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)


def listed(gw: Gateway, name: str) -> int:
    return httpx.get(f"{gw.url}/v1/models/{name}", timeout=5,
                     headers={"Authorization": f"Bearer {KEY}"}).status_code


def chat(gw: Gateway, model: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=timeout,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": HI})


def within(seconds: float, predicate: Any) -> float:
    """How long `predicate()` took to become true; fails past `seconds`."""
    t0 = time.monotonic()
    assert wait_for(predicate, seconds, interval=0.02), f"not within {seconds} s"
    return time.monotonic() - t0


def two(gateway_factory: GatewayFactory, database: str) -> tuple[Gateway, Gateway]:
    return (gateway_factory(models=[], env=env(database)),
            gateway_factory(models=[], env=env(database)))


def test_added_changed_removed_through_one_served_by_the_other(
        gateway_factory: GatewayFactory, database: str, tmp_path: Path) -> None:
    a, b = two(gateway_factory, database)
    spec = fake_model("shared", tmp_path / "shared.events")
    assert admin(a, "PUT", "/models/shared", json=spec).status_code == 200
    print(f"added: {within(1.0, lambda: listed(b, 'shared') == 200):.3f} s")
    answer = chat(b, "shared")
    assert answer.status_code == 200, answer.text

    # A change (a new alias) through B is served by A within a second.
    assert admin(b, "PUT", "/models/shared", json={**spec, "aliases": ["also"]}
                 ).status_code == 200
    print(f"changed: {within(1.0, lambda: listed(a, 'also') == 200):.3f} s")
    assert chat(a, "also").status_code == 200

    # Removed through A: gone from B within a second.
    assert admin(a, "DELETE", "/models/shared").status_code in (200, 204)
    print(f"removed: {within(1.0, lambda: listed(b, 'shared') == 404):.3f} s")
    assert chat(b, "shared").status_code == 404


def usage_requests(store: Store, model: str) -> int:
    return sum(int(row.as_dict()["requests"]) for row in store.usage_sums(model=model,
                                                                           group_by=[]))


def test_one_worker_owner_killed_other_takes_over(
        gateway_factory: GatewayFactory, database: str, store: Store,
        tmp_path: Path) -> None:
    a, b = two(gateway_factory, database)
    events = tmp_path / "owned.events"
    assert admin(a, "PUT", "/models/owned", json=fake_model("owned", events)).status_code == 200
    within(1.0, lambda: listed(b, "owned") == 200)

    # Used through both: A loads it (its lock), B relays to A's worker. One worker.
    sent = 0
    for gw in (a, b, a, b, b):
        answer = chat(gw, "owned")
        assert answer.status_code == 200, answer.text
        sent += 1
    assert len(started_pids(events)) == 1
    owner_pid = started_pids(events)[0]  # the fake worker's own (its shim's is the card's)
    assert admin(a, "GET", "/models/owned").json()["worker"] is not None
    assert admin(b, "GET", "/models/owned").json()["worker"] is None  # relaying
    # Both ledgers flush within a second: every request is in the shared table.
    assert wait_for(lambda: usage_requests(store, "owned") == sent, 5), \
        usage_requests(store, "owned")

    # The owner dies outright; B takes the lock within seconds and starts its own worker.
    # (A's worker may answer a moment longer: its shim stops it once its gateway is gone.)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    t0 = time.monotonic()
    answered = 0  # by B after the kill, every one counted in B's usage

    def own_worker() -> bool:
        return admin(b, "GET", "/models/owned").json()["worker"] is not None

    while time.monotonic() - t0 < 15:
        mine = own_worker()
        answer = chat(b, "owned", timeout=15)
        if answer.status_code == 200:
            answered += 1
            if mine:
                break
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"taken over in {took:.2f} s")
    assert own_worker(), f"B did not take the model over: {answer.status_code} {answer.text}"
    assert took < 10, took
    pids = started_pids(events)
    assert len(pids) == 2 and pids[1] != owner_pid
    for _ in range(4):
        assert chat(b, "owned").status_code == 200
        answered += 1
    # Nothing lost: what A had flushed before its death, and all that B answered after.
    assert wait_for(lambda: usage_requests(store, "owned") == sent + answered, 5), \
        (usage_requests(store, "owned"), sent, answered)


def test_audit_log_has_both_gateways_actions(gateway_factory: GatewayFactory,
                                             database: str, tmp_path: Path) -> None:
    a, b = two(gateway_factory, database)
    assert admin(a, "PUT", "/models/audited",
                 json=fake_model("audited", None)).status_code == 200
    within(1.0, lambda: listed(b, "audited") == 200)
    assert admin(b, "DELETE", "/models/audited").status_code in (200, 204)

    def entries() -> list[tuple[str, str]]:
        rows = admin(a, "GET", "/audit", params={"model": "audited"}).json()["data"]
        return sorted((row["method"], row["path"]) for row in rows)

    assert wait_for(lambda: entries() == [("DELETE", "/api/admin/models/audited"),
                                          ("PUT", "/api/admin/models/audited")], 5), entries()



def test_owner_stopped_while_the_other_serves_under_load(
        gateway_factory: GatewayFactory, database: str, tmp_path: Path) -> None:
    """A rolling restart: the owner stops (SIGTERM) while requests keep coming through the
    other gateway, which takes over; a request that meets the gone worker is retried once
    the relay has seen its owner go (`Model.worker_lost`), so none fails."""
    a, b = two(gateway_factory, database)
    events = tmp_path / "rolling.events"
    assert admin(a, "PUT", "/models/rolling",
                 json=fake_model("rolling", events)).status_code == 200
    assert chat(a, "rolling").status_code == 200  # A owns it
    within(1.0, lambda: listed(b, "rolling") == 200)
    statuses: list[int] = []
    done = threading.Event()

    def load() -> None:  # one request after another, through B, all along
        while not done.is_set():
            statuses.append(chat(b, "rolling", timeout=30).status_code)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        time.sleep(0.5)
        before = len(statuses)
        a.stop()  # SIGTERM; returns once A has exited
        assert wait_for(lambda: len(started_pids(events)) == 2, 10)
        # Requests all along: before the stop, across it, and on B's own worker after.
        after = len(statuses)
        assert wait_for(lambda: len(statuses) >= after + 5, 60), statuses
    finally:
        done.set()
        sender.join(60)
    assert before >= 1, statuses
    assert set(statuses) == {200}, statuses
    assert len(started_pids(events)) == 2



def test_a_loaded_model_changed_through_a_gateway_that_does_not_own_it(
        gateway_factory: GatewayFactory, database: str, tmp_path: Path) -> None:
    """The change is rolled out where it was asked (a worker of the new spec, owned there);
    the owner of the old spec stops its worker; one worker at the end, of the new spec."""
    a, b = two(gateway_factory, database)
    events = tmp_path / "changed.events"
    spec = fake_model("changed", events)
    assert admin(a, "PUT", "/models/changed", json=spec).status_code == 200
    within(1.0, lambda: listed(b, "changed") == 200)
    assert chat(b, "changed").status_code == 200  # B owns it
    assert chat(a, "changed").status_code == 200  # A relays to it
    new = {**spec, "command": [*spec["command"], "--startup-delay", "0.2"]}
    answer = admin(a, "PUT", "/models/changed", json=new)
    assert answer.status_code == 200, answer.text
    assert wait_for(lambda: sum(map(pid_alive, started_pids(events))) == 1, 10), \
        [(pid, pid_alive(pid)) for pid in started_pids(events)]
    for gw in (a, b, a, b):
        assert chat(gw, "changed").status_code == 200
    assert sum(map(pid_alive, started_pids(events))) == 1
    assert len(started_pids(events)) == 2


# -- the parts, on the same server ------------------------------------------------------------


def test_a_committed_change_notifies_the_others(database: str, store: Store) -> None:
    import psycopg

    store.migrate()
    store.origin = "gateway-x"
    spec = json.dumps(fake_model("noted", None))
    with psycopg.connect(libpq_url(database), autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")

        def heard() -> list[dict[str, str]]:
            return [json.loads(n.payload) for n in listener.notifies(timeout=0.5)]

        changed = {"model": "noted", "gateway": "gateway-x", "kind": "spec"}
        store.upsert_model(spec, "noted", source="api", actor="test")
        assert heard() == [changed]
        store.upsert_model(spec, "noted", source="api", actor="test")  # unchanged: silent
        assert heard() == []
        store.delete_model("noted", actor="test")
        assert heard() == [changed]
        store.unload_everywhere("noted")  # with its desired state, in one transaction
        assert heard() == [{**changed, "kind": "unload"}]
        assert store.desired_states()["noted"].desired == "unloaded"
        store.origin = None  # a store outside a cluster (the CLI) tells nobody
        store.upsert_model(spec, "noted", source="api", actor="test")
        assert heard() == []
    # A payload of an earlier version (no kind) is a spec change; others are not ours.
    assert parse_payload('{"model":"m","gateway":"g"}') == Change("m", "g", "spec")
    assert parse_payload('{"model":"m","gateway":"g","kind":"unload"}') == \
        Change("m", "g", "unload")
    assert parse_payload("[1]") is None and parse_payload("not json") is None


async def _members(database: str, count: int) -> list[Member]:
    members = []
    for _ in range(count):
        persistence = Persistence(database)
        members.append(Member(database, persistence))
        await persistence.open()
    return members


async def _close(members: list[Member]) -> None:
    for member in members:
        await member.stop()
        await member.persistence.close()


def test_a_download_runs_in_one_gateway_at_a_time(database: str, tmp_path: Path) -> None:
    """The second gateway waits, says so, then finds the weights in the shared cache."""
    cache = tmp_path / "cache"
    source = HubSource(hf="org/weights")
    calls: list[str] = []

    async def main() -> None:
        first, second = await _members(database, 2)
        started, finish = asyncio.Event(), asyncio.Event()

        async def fetch(model_id: str, src: HubSource, progress: Any) -> Path:
            calls.append(model_id)
            started.set()
            await finish.wait()
            storage = repo_folder(cache, src.hf)
            (storage / "refs").mkdir(parents=True)
            (storage / "refs" / "main").write_text("a" * 40)
            snapshot = storage / "snapshots" / ("a" * 40)
            snapshot.mkdir(parents=True)
            (snapshot / "weights.bin").write_bytes(b"w")
            return snapshot

        told: list[dict[str, object]] = []
        try:
            one = asyncio.ensure_future(first.download(fetch, cache)("w", source,
                                                                     lambda _: None))
            await started.wait()
            two = asyncio.ensure_future(second.download(fetch, cache)("w", source,
                                                                      told.append))
            for _ in range(100):
                if told:
                    break
                await asyncio.sleep(0.02)
            assert told == [{"state": "downloading elsewhere", "model": "w"}]
            assert not two.done()
            finish.set()
            assert await one == await two
            assert calls == ["w"]
        finally:
            await _close([first, second])

    asyncio.run(main())


def test_a_gateway_whose_lock_session_breaks_loses_its_models(database: str) -> None:
    """The session ends (here terminated; a dead gateway's ends by itself): the lock is
    free for another, and the holder hears within seconds that it lost it."""
    import psycopg

    async def main() -> None:
        first, second = await _members(database, 2)
        try:
            await first.start()
            epoch = await first.own("held", "v1")
            assert epoch is not None
            assert await first.own("held", "v1") == epoch  # counted, not taken twice
            await first.disown("held", "v1", epoch)
            assert await second.own("held", "v1") is None
            assert not await second.owner_gone("held", "v1")
            with psycopg.connect(first.conninfo, autocommit=True) as admin_conn:
                admin_conn.execute("SELECT pg_terminate_backend(%s)",
                                   (first.locks.backend_pid,))
            await asyncio.wait_for(first.until_lost(epoch), 5)
            assert await second.owner_gone("held", "v1")
            assert await second.own("held", "v1") is not None
        finally:
            await _close([first, second])

    asyncio.run(main())


@pytest.mark.parametrize("replica", [0, 1])
def test_only_the_owner_places_the_worker_on_its_gpus(database: str, tmp_path: Path,
                                                      replica: int) -> None:
    """The GPUs of a model's worker (of each of its replicas) are asked for by the gateway
    that owns it, once it owns it: a gateway that relays to another's worker books none of
    its own (no room reserved, no idle model evicted for a worker it will never run)."""
    from modelhost.cluster.launcher import ClusterContext
    from modelhost.config import ModelSpec

    spec = ModelSpec.model_validate(fake_model("m", tmp_path / "events", gpu_count=1))

    async def no_download(*args: Any) -> Path:
        raise AssertionError("nothing to download")

    async def main() -> None:
        first, second = await _members(database, 2)
        asked: list[str] = []

        def placing(name: str) -> Any:
            async def place() -> list[int]:
                asked.append(name)
                return []  # no GPU on this machine: the fake worker runs on none
            return place

        contexts = [ClusterContext(cache_dir=tmp_path / "cache", log_dir=tmp_path / name,
                                   stop_timeout=5, download=no_download, member=member)
                    for name, member in (("a", first), ("b", second))]
        try:
            owner = await contexts[0].launch(spec, None, placing("a"), replica)
            await owner.wait_ready(30)
            relay = await contexts[1].launch(spec, None, placing("b"), replica)
            await relay.wait_ready(30)
            assert relay.base_url == owner.base_url and relay.pid is None
            assert asked == ["a"]
            await relay.stop()
            await owner.stop()
        finally:
            await _close([first, second])

    asyncio.run(main())


def test_replicas_are_owned_one_by_one_and_every_gateway_uses_them_all(
        gateway_factory: GatewayFactory, database: str, store: Store, tmp_path: Path) -> None:
    """`replicas: 2` behind two gateways: each replica is owned and published on its own
    (two rows in model_workers, two worker processes in all, not two per gateway), and the
    requests through the gateway that owns none reach both."""
    a, b = two(gateway_factory, database)
    events = tmp_path / "replicas.events"
    assert admin(a, "PUT", "/models/pair",
                 json=fake_model("pair", events, replicas=2)).status_code == 200
    assert chat(a, "pair").status_code == 200

    def published() -> list[str]:
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT address FROM model_workers WHERE model_id = 'pair'").fetchall()
        return sorted(row[0] for row in rows)

    assert wait_for(lambda: len(published()) == 2, 30), published()
    addresses = published()
    assert addresses[0] != addresses[1]
    within(5.0, lambda: listed(b, "pair") == 200)
    assert chat(b, "pair").status_code == 200

    def relayed() -> list[str | None]:  # B's replicas: each relaying to one of A's workers
        cards = admin(b, "GET", "/models/pair").json()["replicas"]
        return sorted(card["base_url"] or "" for card in cards if card["state"] == "ready")

    assert wait_for(lambda: relayed() == addresses, 30), (relayed(), addresses)
    statuses: list[int] = []

    def client() -> None:  # four at once, 0.1 s each: the least loaded replica takes each
        for _ in range(10):
            statuses.append(httpx.post(
                f"{b.url}/v1/chat/completions", timeout=30,
                headers={"Authorization": f"Bearer {KEY}"},
                json={"model": "pair", "messages": HI,
                      "fake": {"first_token_delay": 0.1}}).status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 40
    counts = [httpx.get(address.removesuffix("/v1") + "/stats", timeout=5).json()["requests"]
              for address in addresses]
    assert all(count >= 3 for count in counts), counts  # B used both of A's workers
    assert len(started_pids(events)) == 2, started_pids(events)
