"""The audit log (issue 15): every state-changing admin request recorded with the key's id,
never the key nor a secret, readable through `GET /api/admin/audit` and `modelhost audit`.

The store's part runs on SQLite and, when MODELHOST_TEST_DATABASE_URL is set, PostgreSQL
(the fixtures of tests/test_db.py); the rest drives a real `modelhost serve` with keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.api.audit import action_of, query_detail
from modelhost.auth import KeyGuard, key_id
from modelhost.db.store import AuditEntry, Store
from tests.conftest import Gateway, GatewayFactory, fake_model
from tests.test_db import store, url  # noqa: F401 (fixtures: both backends)

INFERENCE_KEY = "sk-inference-4c1d9e0b7a3f5e2d"
ADMIN_KEY = "sk-admin-9f8e7d6c5b4a39281706"
OTHER_ADMIN_KEY = "sk-admin2-0a1b2c3d4e5f60718293"
HF_TOKEN = "hf_AuditNeverStoresThisValue1234567890"
KEYS_ENV = {"OPENAI_API_KEYS": INFERENCE_KEY,
            "MODELHOST_ADMIN_KEYS": f"{ADMIN_KEY},{OTHER_ADMIN_KEY}"}
SECRETS = (ADMIN_KEY, OTHER_ADMIN_KEY, INFERENCE_KEY, HF_TOKEN)


# -- the key's id and the actions ---------------------------------------------------------------


def test_key_id_is_stable_and_reveals_nothing() -> None:
    expected = "key-" + hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:12]
    assert key_id(ADMIN_KEY) == key_id(ADMIN_KEY.encode()) == expected
    assert key_id(OTHER_ADMIN_KEY) != expected
    guard = KeyGuard([INFERENCE_KEY], [ADMIN_KEY])
    assert guard.actor(f"Bearer {ADMIN_KEY}".encode()) == expected
    assert guard.actor(f"bearer   {ADMIN_KEY} ".encode()) == expected
    assert guard.actor(None) == "anonymous"
    assert KeyGuard([]).actor(f"Bearer {ADMIN_KEY}".encode()) == "anonymous"


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/api/admin/models/m/load", ("model.load", "m")),
    ("POST", "/api/admin/models/org/m/unload", ("model.unload", "org/m")),
    ("POST", "/api/admin/models/m/download", ("download.start", "m")),
    ("DELETE", "/api/admin/models/m/download", ("download.cancel", "m")),
    ("DELETE", "/api/admin/models/m/cache", ("cache.delete", "m")),
    ("PUT", "/api/admin/models/m/load", ("model.put", "m/load")),  # as the routes match
    ("PUT", "/api/admin/models/m", ("model.put", "m")),
    ("DELETE", "/api/admin/models/m", ("model.delete", "m")),
    ("PUT", "/api/admin/token", ("token.set", None)),
    ("DELETE", "/api/admin/token", ("token.delete", None)),
    ("POST", "/api/admin/models/org/m/rollback", ("model.rollback", "org/m")),
    ("POST", "/api/admin/reload", ("models.reload", None)),
    ("POST", "/api/admin/models/load", ("unknown", None)),
    ("POST", "/api/admin/nothing", ("unknown", None)),
    ("POST", "/api/admin/models/", ("unknown", None)),
])
def test_action_of(method: str, path: str, expected: tuple[str, str | None]) -> None:
    assert action_of(method, path) == expected


def test_query_detail_masks_secret_names() -> None:
    raw = f"wait=false&token={HF_TOKEN}&api_key=x&X-Api-Key=y&gpu=1".encode()
    assert query_detail(raw) == {"wait": "false", "token": "***", "api_key": "***",
                                 "X-Api-Key": "***", "gpu": "1"}
    assert len(query_detail(b"&".join(b"p%d=1" % i for i in range(100)))) == 20


# -- the store, on every backend -----------------------------------------------------------------


def test_store_appends_and_queries(store: Store) -> None:  # noqa: F811
    base = datetime(2026, 12, 1, tzinfo=UTC)
    for i in range(6):
        store.record_audit(AuditEntry(
            actor=f"key-{i % 2:012d}", method="POST", path=f"/api/admin/models/m{i % 3}/load",
            action="model.load" if i % 2 else "model.unload", target=f"m{i % 3}",
            client="127.0.0.1:5000", status=200 if i < 5 else 404,
            outcome="ok" if i < 5 else "model_not_found",
            detail={"query": {"wait": "true"}, "n": i}, at=base + timedelta(minutes=i)))
    rows = store.audit()
    assert [r.detail["n"] for r in rows if r.detail] == [5, 4, 3, 2, 1, 0]  # newest first
    assert rows[0].at == base + timedelta(minutes=5) and rows[0].at.tzinfo is not None
    assert rows[0].outcome == "model_not_found" and rows[0].status == 404
    assert rows[0].as_dict()["at"] == "2026-12-01T00:05:00Z"
    assert [r.detail["n"] for r in store.audit(target="m1") if r.detail] == [4, 1]
    assert len(store.audit(actor="key-000000000001")) == 3
    assert len(store.audit(action="model.load")) == 3
    window = store.audit(since=base + timedelta(minutes=2), until=base + timedelta(minutes=4))
    assert [r.detail["n"] for r in window if r.detail] == [3, 2]
    assert [r.detail["n"] for r in store.audit(limit=2, offset=1) if r.detail] == [4, 3]
    with pytest.raises(ValueError, match="limit"):
        store.audit(limit=0)
    with pytest.raises(ValueError, match="timezone"):
        store.audit(since=datetime(2026, 1, 1))  # naive
    assert store.prune_audit(base + timedelta(minutes=3)) == 3
    assert len(store.audit()) == 3


def test_store_makes_odd_input_safe(store: Store) -> None:  # noqa: F811
    """An entry describes what a client sent: control characters and long paths are kept
    readable and within their columns (PostgreSQL refuses NUL in text)."""
    store.record_audit(AuditEntry(actor="anonymous", method="DELETE",
                                  path="/api/admin/models/a\x00b\n" + "x" * 2000,
                                  action="model.delete", target="a\x00b\n", status=400,
                                  outcome="invalid_request_error",
                                  detail={"error": "bad\x1b[31m", "k\x00": ["\x07"]}))
    (row,) = store.audit()
    assert row.target == "a\\x00b\\x0a"
    assert len(row.path) == 512 and row.path.startswith("/api/admin/models/a\\x00b\\x0a")
    assert row.detail == {"error": "bad\\x1b[31m", "k\\x00": ["\\x07"]}


def test_migration_renders_the_table_for_postgresql() -> None:
    import io

    from alembic import command

    from modelhost.db.store import alembic_config

    config = alembic_config("postgresql+psycopg://modelhost@localhost/modelhost")
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "CREATE TABLE audit" in sql
    assert "CREATE INDEX ix_audit_at ON audit (at)" in sql
    assert "CREATE INDEX ix_audit_target ON audit (target)" in sql


# -- a real gateway -----------------------------------------------------------------------------

SPEC_SECRET = "spec-env-secret-5d4c3b2a19"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_ADMIN_KEY}"}


def audit(gw: Gateway, headers: dict[str, str] = ADMIN, **params: Any) -> list[dict[str, Any]]:
    resp = httpx.get(gw.url + "/api/admin/audit", headers=headers, params=params, timeout=10)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def wait_entries(gw: Gateway, count: int) -> list[dict[str, Any]]:
    """The entries, once `count` are there (they are written after the answer)."""
    deadline = time.monotonic() + 10
    while len(entries := audit(gw, limit=1000)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return entries


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHOST_")}
    env.update(API_PORT=str(gw.port), MODELHOST_ADMIN_KEY=ADMIN_KEY)
    return subprocess.run([sys.executable, "-m", "modelhost", "audit", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def database_bytes(gw: Gateway) -> bytes:
    folder = gw.tmp / "data"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("modelhost.db*")))


def test_admin_actions_recorded_with_key_ids_never_secrets(gateway_factory: GatewayFactory,
                                                           tmp_path: Path) -> None:
    models = [fake_model("m")]
    env = {**KEYS_ENV, "MODELHOST_ADMIN_ALLOW_CODE": "true"}
    gw = gateway_factory(models, env=env)
    base = gw.url + "/api/admin"
    added = fake_model("added", env={"HF_TOKEN": SPEC_SECRET})
    answers = [
        httpx.post(base + "/models/m/load", headers=ADMIN, timeout=60),
        httpx.post(base + "/models/m/unload", headers=OTHER, params={"wait": "true"},
                   timeout=60),
        httpx.put(base + "/models/added", headers=ADMIN, json=added, timeout=30),
        httpx.delete(base + "/models/added", headers=ADMIN, timeout=30),
        httpx.put(base + "/token", headers=ADMIN, json={"token": HF_TOKEN}, timeout=10),
        httpx.delete(base + "/token", headers=ADMIN, timeout=10),
        # Failed ones: an unknown model, a bad body, a bad token, a route that is not there.
        httpx.post(base + "/models/nope/load", headers=ADMIN, timeout=10),
        httpx.put(base + "/models/bad", headers=ADMIN, json={"backend": "nope"}, timeout=10),
        httpx.put(base + "/token", headers=ADMIN, json={"token": HF_TOKEN + " x"}, timeout=10),
        httpx.post(base + "/nothing", headers=ADMIN, timeout=10),
        httpx.delete(base + "/models/m/unload", headers=ADMIN, timeout=10,
                     params={"token": HF_TOKEN}),
    ]
    statuses = [a.status_code for a in answers]
    assert statuses[:6] == [200] * 6, [a.text for a in answers]
    assert statuses[6:] == [404, 400, 400, 404, 404]
    # Refused by the key check before any route: not recorded (see docs/operations.md).
    assert httpx.post(base + "/models/m/load", timeout=10).status_code == 401
    assert httpx.post(base + "/models/m/load", timeout=10, headers={
        "Authorization": f"Bearer {INFERENCE_KEY}"}).status_code == 403
    # Reads are not recorded.
    assert httpx.get(base + "/models", headers=ADMIN, timeout=10).status_code == 200

    entries = wait_entries(gw, len(answers))
    assert len(entries) == len(answers)
    oldest_first = entries[::-1]
    assert [(e["action"], e["model"], e["status"]) for e in oldest_first] == [
        ("model.load", "m", 200), ("model.unload", "m", 200), ("model.put", "added", 200),
        ("model.delete", "added", 200), ("token.set", None, 200), ("token.delete", None, 200),
        ("model.load", "nope", 404), ("model.put", "bad", 400), ("token.set", None, 400),
        ("unknown", None, 404), ("model.delete", "m/unload", 404)]
    admin_id, other_id = key_id(ADMIN_KEY), key_id(OTHER_ADMIN_KEY)
    assert [e["actor"] for e in oldest_first] == [admin_id, other_id] + [admin_id] * 9
    assert oldest_first[-1]["detail"]["query"] == {"token": "***"}
    # The model's own history names the same actor (the key's id), for its creation and its
    # deletion alike.
    history = httpx.get(base + "/models/added/history", headers=ADMIN, timeout=10).json()
    assert [(h["action"], h["actor"]) for h in history["data"]] == [
        ("created", admin_id), ("deleted", admin_id)]
    assert oldest_first[6]["outcome"] == "model_not_found"
    assert oldest_first[0]["outcome"] == "ok"
    assert oldest_first[1]["detail"]["query"] == {"wait": "true"}
    for entry in entries:
        assert entry["client"].startswith("127.0.0.1:")
        assert entry["method"] in ("POST", "PUT", "DELETE")
        assert datetime.fromisoformat(entry["at"]).tzinfo is not None

    # No secret anywhere: the answer, the database file, the CLI's table and JSON.
    listing = httpx.get(base + "/audit", headers=ADMIN, timeout=10).text
    table, as_json = cli(gw), cli(gw, "--json")
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    stored = database_bytes(gw)
    for secret in (*SECRETS, SPEC_SECRET):
        assert secret not in listing and secret not in table.stdout + as_json.stdout
        assert secret.encode() not in stored, secret
    assert admin_id.encode() in stored

    # The CLI: a table like `modelhost models`, newest first, and JSON.
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["AT", "ACTOR", "CLIENT", "ACTION"]
    assert len(lines) == 1 + len(answers)  # the CLI's own read is not recorded
    assert lines[2].split()[1:] == [admin_id, lines[2].split()[2], "unknown", "-", "404",
                                    "invalid_request_error"]
    assert lines[4].split()[3:7] == ["model.put", "bad", "400", "invalid_request_error"]
    decoded = json.loads(as_json.stdout)
    assert [e["id"] for e in decoded] == [e["id"] for e in entries]

    # Filters, through the API and the CLI.
    assert [e["action"] for e in audit(gw, model="m")] == ["model.unload", "model.load"]
    assert {e["model"] for e in audit(gw, actor=other_id)} == {"m"}
    assert len(audit(gw, action="token.set")) == 2
    assert [e["status"] for e in audit(gw, action="model.delete")] == [404, 200]
    assert len(audit(gw, limit=3)) == 3
    assert audit(gw, since=entries[0]["at"]) == entries[:1]
    assert audit(gw, until=entries[-1]["at"]) == []
    assert audit(gw, since="2999-01-01") == []
    filtered = cli(gw, "--model", "m", "--json")
    assert [e["action"] for e in json.loads(filtered.stdout)] == ["model.unload", "model.load"]
    by_key = cli(gw, "--actor", other_id, "--action", "model.unload", "--limit", "5")
    assert len(by_key.stdout.splitlines()) == 2, by_key.stdout + by_key.stderr

    # It survives a restart of the gateway (same data folder).
    gw.stop()
    again = Gateway(gw.tmp, models, env=env)
    try:
        assert audit(again, limit=1000) == entries
    finally:
        again.stop()


@pytest.mark.parametrize(("param", "value"), [
    ("since", "yesterday"), ("until", "2026-13-01"), ("limit", "0"), ("limit", "1001"),
    ("limit", "x"), ("offset", "-1"),
])
def test_bad_filters_are_400(module_gateway: Gateway, param: str, value: str) -> None:
    resp = httpx.get(module_gateway.url + "/api/admin/audit", headers=ADMIN,
                     params={param: value}, timeout=10)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_audit_needs_an_admin_key(module_gateway: Gateway) -> None:
    target = module_gateway.url + "/api/admin/audit"
    assert httpx.get(target, timeout=10).status_code == 401
    assert httpx.get(target, timeout=10, headers={
        "Authorization": f"Bearer {INFERENCE_KEY}"}).status_code == 403


def test_cli_refuses_a_bad_time(module_gateway: Gateway) -> None:
    result = cli(module_gateway, "--since", "last tuesday")
    assert result.returncode != 0 and "--since" in result.stderr


@pytest.fixture(scope="module")
def module_gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory([], env=KEYS_ENV)


def test_open_dev_server_records_anonymous(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("m")])
    assert httpx.post(gw.url + "/api/admin/models/m/unload", timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while not (entries := audit(gw, headers={})) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e["actor"], e["action"]) for e in entries] == [("anonymous", "model.unload")]


def test_oversized_body_is_recorded(module_gateway: Gateway) -> None:
    """A 413 of the admin body limit is answered before any route: still recorded."""
    resp = httpx.put(module_gateway.url + "/api/admin/models/huge", headers=ADMIN,
                     content=b"{" + b" " * (2 << 20), timeout=30)
    assert resp.status_code == 413
    deadline = time.monotonic() + 10
    while not (found := audit(module_gateway, model="huge")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e["action"], e["status"]) for e in found] == [("model.put", 413)]


def test_retention_deletes_old_entries(gateway_factory: GatewayFactory) -> None:
    """MODELHOST_AUDIT_RETENTION_DAYS: an entry older than that is gone after the next
    recorded action; a recent one stays."""
    models, env = [fake_model("m")], {**KEYS_ENV, "MODELHOST_AUDIT_RETENTION_DAYS": "30"}
    first = gateway_factory(models, env=env)
    first.stop()
    now = datetime.now(UTC)
    with Store.open(f"sqlite:///{first.tmp / 'data' / 'modelhost.db'}") as db:
        for days in (40, 20):
            db.record_audit(AuditEntry(actor="key-000000000000", method="DELETE",
                                       path="/api/admin/token", action="token.delete",
                                       status=200, outcome="ok", at=now - timedelta(days=days)))
    gw = Gateway(first.tmp, models, env=env)
    try:
        assert len(audit(gw)) == 2  # nothing recorded yet: nothing pruned
        resp = httpx.post(gw.url + "/api/admin/models/m/unload", headers=ADMIN, timeout=30)
        assert resp.status_code == 200
        deadline = time.monotonic() + 10
        while len(entries := audit(gw)) != 2 or entries[0]["action"] != "model.unload":
            assert time.monotonic() < deadline, entries
            time.sleep(0.05)
        assert [e["action"] for e in entries] == ["model.unload", "token.delete"]
        assert datetime.fromisoformat(entries[1]["at"]) > now - timedelta(days=21)
    finally:
        gw.stop()
