"""Secrets and dashboard sessions shared by the gateways of one state database (issue 18;
docs/scale-out.md, docs/configuration.md "Secret key", docs/dashboard.md).

Sealing itself is tested here as a unit (`modelhost.sealing`); the rest with real parts: a
real PostgreSQL server on loopback (`tests/postgres.py`) and real `modelhost serve`
processes on it, a real OpenAI-compatible upstream that wants a bearer key
(`tests/fake_worker.py`), and a real SQLite file for the single-gateway migration. The
PostgreSQL tests skip, saying why, only where its server binaries (or psycopg) are missing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from modelhost.db.store import Store
from modelhost.sealing import Malformed, Sealer, Tampered, WrongKey
from modelhost.settings import Settings
from modelhost.workers.process import free_port
from tests.conftest import FAKE_WORKER, Gateway, GatewayFactory, wait_for
from tests.postgres import needs_postgres

KEY = "sk-shared-user-5e1a9c7b3d2f8e4a"
ADMIN = "sk-shared-admin-8b2d6f1a9c4e7b3d"
SECRET_KEY = "k4Jq9vT2xWm8ZrB5nP0sLd7Hc3Fy6Ga1Ue2Io9QwXz8="
OTHER_KEY = "Zq1Wx2Ec3Rv4Tb5Yn6Um7Ii8Oo9Pp0AaSsDdFfGgHh="
REMOTE_KEY = "sk-upstream-3f9a7c1e5b2d4f6a"
URL_PASSWORD = "urlpass-6c2e9b4d1a"
HI = [{"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------- sealing


def test_sealed_values_open_with_their_key_and_model_only() -> None:
    sealer = Sealer(SECRET_KEY)
    value = {"versions": {"abc": {"source.api_key": REMOTE_KEY}}}
    sealed = sealer.seal("m", value)
    assert REMOTE_KEY not in sealed and sealed.startswith(f"mh1.{sealer.key_id}.")
    assert sealer.seal("m", value) != sealed  # a fresh nonce every time
    assert sealer.open("m", sealed) == value
    assert Sealer(SECRET_KEY).open("m", sealed) == value  # same key, another process

    with pytest.raises(WrongKey, match="another secret key"):
        Sealer(OTHER_KEY).open("m", sealed)
    with pytest.raises(Tampered):
        sealer.open("other-model", sealed)  # a row moved onto another model
    head, _, body = sealed.rpartition(".")
    flipped = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
    with pytest.raises(Tampered, match="changed"):
        sealer.open("m", f"{head}.{flipped}")
    with pytest.raises(Tampered):
        sealer.open("m", f"{head}.{body[:-4]}")
    for broken in ("", "plain text", "mh1.x", f"mh2.{sealer.key_id}.{body}",
                   f"mh1.{sealer.key_id}.!!!", f"mh1.{sealer.key_id}.QUJD"):
        with pytest.raises((Malformed, WrongKey)):
            sealer.open("m", broken)
    assert SECRET_KEY not in repr(sealer) and sealer.key_id in repr(sealer)

    # Changing the key: the earlier one as a fallback opens what it sealed, and says so.
    rotated = Sealer(OTHER_KEY, fallbacks=(SECRET_KEY,))
    assert rotated.sealed_with_fallback(sealed) and rotated.open("m", sealed) == value
    again = rotated.seal("m", value)
    assert not rotated.sealed_with_fallback(again) and Sealer(OTHER_KEY).open("m", again)
    with pytest.raises(WrongKey):
        sealer.open("m", again)
    with pytest.raises(ValueError, match="at least 32"):
        Sealer(OTHER_KEY, fallbacks=("short",))


def test_the_secret_key_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        Sealer("short")
    with pytest.raises(ValidationError, match="at least 32"):
        Settings.with_overrides(secret_key="too-short")
    settings = Settings.with_overrides(secret_key=SECRET_KEY)
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == SECRET_KEY
    assert SECRET_KEY not in repr(settings)
    key_file = tmp_path / "secret_key"
    key_file.write_text(SECRET_KEY + "\n")
    from_file = Settings.with_overrides(secret_key_file=key_file)
    assert from_file.secret_key is not None
    assert from_file.secret_key.get_secret_value() == SECRET_KEY
    with pytest.raises(ValidationError, match="cannot be read"):
        Settings.with_overrides(secret_key_file=tmp_path / "missing")
    both = Settings.with_overrides(secret_key=OTHER_KEY,
                                   secret_key_fallbacks=f"{SECRET_KEY}, {SECRET_KEY[::-1]}")
    assert both.secret_key_fallback_list == (SECRET_KEY, SECRET_KEY[::-1])
    with pytest.raises(ValidationError, match="needs MODELHOST_SECRET_KEY"):
        Settings.with_overrides(secret_key_fallbacks=SECRET_KEY)
    with pytest.raises(ValidationError, match="at least 32"):
        Settings.with_overrides(secret_key=OTHER_KEY, secret_key_fallbacks="short")


def test_a_reader_never_pairs_a_spec_with_the_secrets_of_another_version(
        tmp_path: Path) -> None:
    """The secrets are sealed by spec version and written before the spec: between the two
    writes a reader still gets the stored spec with its own secrets; after them, the new
    ones; a version the table has no secrets for is refused, not served with `***`."""
    from modelhost.config import ModelSpec
    from modelhost.db.store import Store
    from modelhost.persistence import spec_json, spec_secrets
    from modelhost.secretkeeper import Keeper, SecretFile

    def spec(url: str, key: str) -> ModelSpec:
        return ModelSpec.model_validate({"id": "m", **remote_spec(url, key)})

    old, new = spec("http://old.example/v1", "sk-old-0123456789"), \
        spec("http://new.example/v1", "sk-new-0123456789")
    keeper = Keeper(SecretFile(tmp_path / "secrets.json"), Sealer(SECRET_KEY))
    with Store.open(f"sqlite:///{tmp_path / 'state.db'}") as store:
        store.migrate()

        def change(to: ModelSpec) -> None:
            keeper.put(store, "m", spec_secrets(to), keeper.snapshot(store, "m"))

        def served() -> tuple[dict[str, Any], str | None]:
            row = store.model("m")
            assert row is not None
            return keeper.spec_of(store, row)

        change(old)
        store.upsert_model(spec_json(old), "m", source="api", actor="t")
        assert served() == (old.model_dump(mode="json", exclude_defaults=True), None)
        change(new)  # the spec itself not yet written: the old one, with its own key
        assert served()[0]["source"]["api_key"] == "sk-old-0123456789"
        store.upsert_model(spec_json(new), "m", source="api", actor="t")
        assert served()[0]["source"]["api_key"] == "sk-new-0123456789"
        assert served()[0]["source"]["url"].startswith(f"http://user:{URL_PASSWORD}@new.")
        sealed = store.sealed_secrets("m")["m"]
        assert "sk-new" not in sealed and not (tmp_path / "secrets.json").exists()

        # Written by hand (or by a gateway that died between its two writes): refused.
        third = spec("http://third.example/v1", "sk-third-0123456789")
        store.upsert_model(spec_json(third), "m", source="api", actor="t")
        data, reason = served()
        assert data["source"]["api_key"] == "***"
        assert reason is not None and "another version" in reason
        changed = sealed[:-2] + ("AA" if not sealed.endswith("AA") else "BB")
        store.upsert_model(spec_json(new), "m", source="api", actor="t")
        assert served()[0]["source"]["api_key"] == "sk-new-0123456789"
        store.put_sealed_secrets("m", changed)  # changed in the database
        data, reason = served()
        assert data["source"]["api_key"] == "***"
        assert reason is not None and "cannot be opened" in reason and "changed" in reason


# ----------------------------------------------------------------------------- helpers


@contextmanager
def upstream(port: int, key: str) -> Iterator[str]:
    """The fake OpenAI-compatible server on `port`, wanting `key`; yields its /v1 URL."""
    proc = subprocess.Popen([sys.executable, FAKE_WORKER, "--port", str(port), "--api-key",
                             key], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/v1/models", timeout=1,
                             headers={"Authorization": f"Bearer {key}"}).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_for(up, 20), "the fake upstream did not start"
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(10)


def remote_spec(url: str, key: str) -> dict[str, Any]:
    with_credentials = url.replace("http://", f"http://user:{URL_PASSWORD}@")
    return {"backend": "remote", "source": {"url": with_credentials, "api_key": key,
                                            "model": "fake"}}


def env(database: str | None = None, secret_key: str | None = SECRET_KEY,
        admin: str = ADMIN) -> dict[str, str]:
    values = {"OPENAI_API_KEYS": KEY, "MODELHOST_ADMIN_KEYS": admin,
              "MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"}
    if database is not None:
        values["MODELHOST_DATABASE_URL"] = database
    if secret_key is not None:
        values["MODELHOST_SECRET_KEY"] = secret_key
    return values


def admin(gw: Gateway, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/api/admin{path}", timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)


def chat(gw: Gateway, model: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": HI})


def listed(gw: Gateway, name: str) -> bool:
    return httpx.get(f"{gw.url}/v1/models/{name}", timeout=5,
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def postgres_dump(database: str) -> str:
    """Every row of every table, as text."""
    import psycopg

    from modelhost.cluster.member import libpq_url

    with psycopg.connect(libpq_url(database)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(f"{t}: {row[0]}" for t in tables for row in conn.execute(
            f'SELECT row_to_json(t)::text FROM "{t}" t'))


def sealed_rows(database: str) -> dict[str, str]:
    import psycopg

    from modelhost.cluster.member import libpq_url

    with psycopg.connect(libpq_url(database)) as conn:
        return dict(conn.execute("SELECT model_id, sealed FROM model_secrets").fetchall())


def last_error(gw: Gateway, model: str) -> str:
    return str(admin(gw, "GET", f"/models/{model}").json().get("last_error") or "")


# ----------------------------------------------------------------------------- PostgreSQL


@needs_postgres
def test_a_model_with_a_secret_added_through_one_is_served_by_the_other(
        gateway_factory: GatewayFactory, database: str) -> None:
    port = free_port()
    with upstream(port, REMOTE_KEY) as url:
        a = gateway_factory(models=[], env=env(database))
        b = gateway_factory(models=[], env=env(database))
        assert admin(a, "PUT", "/models/sealed", json=remote_spec(url, REMOTE_KEY)
                     ).status_code == 200
        assert wait_for(lambda: listed(b, "sealed"), 1, interval=0.02)
        answer = chat(b, "sealed")  # the upstream checks the bearer key
        assert answer.status_code == 200, answer.text
        assert chat(a, "sealed").status_code == 200

        # The database holds the secrets sealed, never in clear; no secrets file anywhere.
        dump = postgres_dump(database)
        assert "model_secrets: " in dump
        for secret in (REMOTE_KEY, URL_PASSWORD, SECRET_KEY):
            assert secret not in dump, secret
        assert not (a.tmp / "data" / "secrets.json").exists()
        assert Sealer(SECRET_KEY).open("sealed", sealed_rows(database)["sealed"])

        # A gateway with another key, and one with none: the model is listed, cannot be
        # served there, and says why; the gateways keep serving.
        wrong = gateway_factory(models=[], env=env(database, secret_key=OTHER_KEY))
        none = gateway_factory(models=[], env=env(database, secret_key=None))
        for gw, why in ((wrong, "another secret key"), (none, "this gateway has none")):
            assert listed(gw, "sealed")
            refused = chat(gw, "sealed")
            assert refused.status_code == 502, refused.text
            assert refused.json()["error"]["code"] == "model_failed"
            assert why in last_error(gw, "sealed")
            assert "cannot be served by this gateway" in gw.output()
            assert httpx.get(gw.url + "/health", timeout=5).status_code == 200
            # The card sent back with its `***` would drop the secrets for every gateway.
            card = admin(gw, "GET", "/models/sealed").json()["spec"]
            kept = admin(gw, "PUT", "/models/sealed", json={**card, "max_queue": 7})
            assert kept.status_code == 400, kept.text
            assert kept.json()["error"]["code"] == "secrets_unavailable"
            assert why in kept.json()["error"]["message"]
            for secret in (REMOTE_KEY, URL_PASSWORD):
                assert secret not in gw.output()
        assert chat(b, "sealed").status_code == 200
        # Their failed starts are theirs: the model stays `loaded` for every gateway (a
        # gateway alone records a failed load as `unloaded`, not to load it at its next start).
        time.sleep(0.5)  # (a queued write lands within milliseconds)
        with Store.open(database) as store:
            assert store.desired_states()["sealed"].desired == "loaded"

    # A new key for the same server (the stored spec does not change): B hears of it.
    with upstream(port, REMOTE_KEY + "-rotated") as url:
        changed = admin(a, "PUT", "/models/sealed",
                        json=remote_spec(url, REMOTE_KEY + "-rotated"))
        assert changed.status_code == 200, changed.text
        assert wait_for(lambda: chat(b, "sealed").status_code == 200, 20)
        assert REMOTE_KEY + "-rotated" not in postgres_dump(database)

    # Deleted through B: its sealed secrets go with it.
    assert admin(b, "DELETE", "/models/sealed").status_code in (200, 204)
    assert "sealed" not in sealed_rows(database)


@needs_postgres
def test_a_models_file_model_changed_through_another_gateway_keeps_its_secrets(
        gateway_factory: GatewayFactory, database: str) -> None:
    """Both gateways declare the model in their models file, with its key there. A change
    through A's admin API (its card sent back, `***` and all) reaches B, which keeps the key
    of its own file rather than serving `***`."""
    with upstream(free_port(), REMOTE_KEY) as url:
        declared = [{"id": "filed", **remote_spec(url, REMOTE_KEY)}]
        a = gateway_factory(models=declared, env=env(database))
        b = gateway_factory(models=declared, env=env(database))
        assert chat(b, "filed").status_code == 200
        card = admin(a, "GET", "/models/filed").json()["spec"]
        assert card["source"]["api_key"] == "***"
        assert admin(a, "PUT", "/models/filed", json={**card, "max_queue": 7}
                     ).status_code == 200

        def applied() -> bool:
            return bool(admin(b, "GET", "/models/filed").json()["spec"].get("max_queue") == 7)

        assert wait_for(applied, 2, interval=0.05)
        answer = chat(b, "filed")
        assert answer.status_code == 200, answer.text
        assert "cannot be served by this gateway" not in b.output()


def dashboard(gw: Gateway, cookie: str | None = None) -> httpx.Client:
    client = httpx.Client(base_url=gw.url, timeout=30)
    if cookie is not None:
        client.cookies.set("modelhost_session", cookie)
    return client


def sign_in(gw: Gateway) -> tuple[str, str]:
    """The session cookie and CSRF token of a sign-in through the form, as a browser."""
    with dashboard(gw) as client:
        page = client.get("/ui/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token, page.text
        resp = client.post("/ui/login", data={"csrf": token.group(1), "key": ADMIN,
                                              "next": "/ui/models"})
        assert resp.status_code == 303, resp.text
        sid = client.cookies.get("modelhost_session")
        assert sid
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/ui/models").text)
        assert csrf
        return sid, csrf.group(1)


def session_works(gw: Gateway, sid: str) -> bool:
    with closing(dashboard(gw, sid)) as client:
        return client.get("/ui/api/models").status_code == 200


@needs_postgres
def test_dashboard_sessions_are_shared(gateway_factory: GatewayFactory, database: str,
                                       tmp_path: Path) -> None:
    a_env = {**env(database), "MODELHOST_DATA_DIR": str(tmp_path / "a-data")}
    a = gateway_factory(models=[], env=a_env)
    b = gateway_factory(models=[], env=env(database))
    sid, csrf = sign_in(a)
    assert session_works(a, sid) and session_works(b, sid)
    with closing(dashboard(b, sid)) as client:  # a state-changing call through B
        assert client.post("/ui/check-spec/x", json={"backend": "remote"},
                           headers={"X-CSRF-Token": csrf}).status_code == 200
        assert client.post("/ui/check-spec/x", json={},
                           headers={"X-CSRF-Token": "wrong"}).status_code == 403

    # A restart keeps it.
    a.stop()
    a = gateway_factory(models=[], env=a_env)
    assert session_works(a, sid)

    # Nothing secret in the table: not the session id, not the key.
    dump = postgres_dump(database)
    assert "dashboard_sessions: " in dump
    assert sid not in dump and ADMIN not in dump

    # A gateway whose configuration no longer has the key refuses (and ends) the session.
    other = gateway_factory(models=[], env=env(database, admin="sk-another-admin-key-1234"))
    with closing(dashboard(other, sid)) as client:
        assert client.get("/ui/api/models").status_code == 401
        assert client.get("/ui/models").headers["location"].startswith("/ui/login")
    assert wait_for(lambda: not session_works(a, sid), 1.5, interval=0.05)

    # Signed out on A: ended on B within a second.
    sid, csrf = sign_in(a)
    assert session_works(b, sid)
    with closing(dashboard(a, sid)) as client:
        assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    assert not session_works(a, sid)
    assert wait_for(lambda: not session_works(b, sid), 1.5, interval=0.05)


# ----------------------------------------------------------------------------- SQLite


def test_a_secrets_file_moves_into_the_database_when_a_key_is_set(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    """One gateway on SQLite: without a key, secrets.json as before; with a key, its entries
    are sealed into the database and the file goes; a wrong key says so and does not crash;
    the right key again serves; a new key with the old one as a fallback seals them again."""
    data = tmp_path / "data"
    with upstream(free_port(), REMOTE_KEY) as url:
        plain = {**env(secret_key=None), "MODELHOST_DATA_DIR": str(data)}
        gw = gateway_factory(models=[], env=plain)
        assert admin(gw, "PUT", "/models/kept", json=remote_spec(url, REMOTE_KEY)
                     ).status_code == 200
        gw.stop()
        secrets_file = data / "secrets.json"
        assert json.loads(secrets_file.read_text())["kept"]["source.api_key"] == REMOTE_KEY

        sealed = {**plain, "MODELHOST_SECRET_KEY": SECRET_KEY}
        gw = gateway_factory(models=[], env=sealed)
        answer = chat(gw, "kept")
        assert answer.status_code == 200, answer.text
        assert not secrets_file.exists()
        assert "now sealed in the state database" in gw.output()
        gw.stop()
        blob = b"".join(p.read_bytes() for p in data.glob("modelhost.db*"))
        assert REMOTE_KEY.encode() not in blob and URL_PASSWORD.encode() not in blob

        gw = gateway_factory(models=[], env={**sealed, "MODELHOST_SECRET_KEY": OTHER_KEY})
        assert chat(gw, "kept").status_code == 502
        assert "another secret key" in last_error(gw, "kept")
        gw.stop()

        gw = gateway_factory(models=[], env=sealed)
        assert chat(gw, "kept").status_code == 200
        gw.stop()

        # A new key, the old one as a fallback: sealed again at start; then the new alone.
        rotated = {**sealed, "MODELHOST_SECRET_KEY": OTHER_KEY,
                   "MODELHOST_SECRET_KEY_FALLBACKS": SECRET_KEY}
        gw = gateway_factory(models=[], env=rotated)
        assert chat(gw, "kept").status_code == 200
        assert "sealed again with the secret key" in gw.output()
        gw.stop()
        del rotated["MODELHOST_SECRET_KEY_FALLBACKS"]
        gw = gateway_factory(models=[], env=rotated)
        assert chat(gw, "kept").status_code == 200
