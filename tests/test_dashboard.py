"""The dashboard over plain HTTP (docs/dashboard.md): sign-in, the session cookie's flags, CSRF,
foreign origins, sign-out, the open development server, and the traffic sampler that runs
only while a page watches. The browser tests are tests/test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import cast

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from modelhost.auth import KeyGuard, key_id
from modelhost.dashboard import Dashboard
from modelhost.dashboard.sessions import Sessions
from modelhost.dashboard.traffic import Traffic, quantile
from modelhost.gateway import Gateway as GatewayService
from modelhost.metrics.requests import RequestMetrics
from modelhost.persistence import Persistence
from modelhost.settings import Settings
from tests.conftest import Gateway, GatewayFactory, fake_model

ADMIN_KEY, INF_KEY = "sk-dash-admin", "sk-dash-inference"
KEYS = {"MODELHOST_ADMIN_KEYS": ADMIN_KEY, "OPENAI_API_KEYS": INF_KEY}


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory([fake_model("fake")], env={
        **KEYS, "MODELHOST_FORWARDED_ALLOW_IPS": "127.0.0.1"})


def sign_in(url: str, key: str = ADMIN_KEY, **headers: str) -> tuple[httpx.Client,
                                                                     httpx.Response]:
    """A client that went through the sign-in form as a browser does."""
    client = httpx.Client(base_url=url, timeout=30, headers=headers)
    page = client.get("/ui/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token, page.text
    resp = client.post("/ui/login", data={"csrf": token.group(1), "key": key,
                                          "next": "/ui/models"})
    return client, resp


def csrf_of(client: httpx.Client) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/ui/models").text)
    assert found
    return found.group(1)


@pytest.fixture
def signed_in(gateway: Gateway) -> Iterator[httpx.Client]:
    client, resp = sign_in(gateway.url)
    assert resp.status_code == 303, resp.text
    with closing(client):
        yield client


def test_root_without_a_session_is_the_sign_in_page_not_data(gateway: Gateway) -> None:
    resp = httpx.get(gateway.url + "/", follow_redirects=True)
    assert resp.status_code == 200
    assert "Sign in" in resp.text and "fake" not in resp.text
    for path in ("/ui/api/models", "/ui/events", "/ui/logs/fake", "/ui/v1/models"):
        refused = httpx.get(gateway.url + path)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "session_required"
    # The API key in a header is no way into the dashboard's data: only a session is.
    with_key = httpx.get(gateway.url + "/ui/api/models",
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert with_key.status_code == 401


def test_session_cookie_flags_and_data_through_the_session(gateway: Gateway) -> None:
    client, resp = sign_in(gateway.url)
    with closing(client):
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/models"
        cookie = next(v for k, v in resp.headers.multi_items()
                      if k == "set-cookie" and v.startswith("modelhost_session="))
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= flags
        assert "secure" not in flags  # plain HTTP on loopback
        sid = cookie.split(";")[0].split("=", 1)[1]
        assert len(sid) >= 43  # 256 random bits, URL-safe base64
        page = client.get("/ui/models")
        assert page.status_code == 200 and ADMIN_KEY not in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        models = client.get("/ui/api/models").json()["data"]
        assert [m["id"] for m in models] == ["fake"]


def test_secure_cookie_behind_a_trusted_tls_proxy(gateway: Gateway) -> None:
    tls = {"X-Forwarded-Proto": "https"}
    page = httpx.get(gateway.url + "/ui/login", headers=tls)
    token = page.cookies["modelhost_login"]
    assert "secure" in page.headers["set-cookie"].lower()
    # (httpx keeps a Secure cookie off plain HTTP: the proxy's client would send it.)
    resp = httpx.post(gateway.url + "/ui/login", headers={
        **tls, "Cookie": f"modelhost_login={token}"}, data={"csrf": token, "key": ADMIN_KEY})
    assert resp.status_code == 303
    cookie = next(v for k, v in resp.headers.multi_items()
                  if k == "set-cookie" and v.startswith("modelhost_session="))
    assert "secure" in cookie.lower()


def test_wrong_or_inference_key_is_refused(gateway: Gateway) -> None:
    for key in ("sk-wrong", INF_KEY):
        client, resp = sign_in(gateway.url, key)
        with closing(client):
            assert resp.status_code == 401
            assert "not an admin key" in resp.text
            assert client.get("/ui/api/models").status_code == 401


def test_sign_in_form_needs_its_token(gateway: Gateway) -> None:
    resp = httpx.post(gateway.url + "/ui/login", data={"key": ADMIN_KEY, "csrf": "forged"},
                      cookies={"modelhost_login": "other"})
    assert resp.status_code == 400
    assert "modelhost_session" not in resp.headers.get("set-cookie", "")


def test_forms_are_bounded(gateway: Gateway, signed_in: httpx.Client) -> None:
    big = httpx.post(gateway.url + "/ui/login", data={"key": "k" * 10_000, "csrf": "x"})
    assert big.status_code == 413
    spec = signed_in.post("/ui/check-spec/x", headers={"X-CSRF-Token": csrf_of(signed_in)},
                          content=b"{" + b" " * 2_000_000 + b"}")
    assert spec.status_code == 413


def test_csrf_attempts_change_nothing(gateway: Gateway, signed_in: httpx.Client) -> None:
    load = "/ui/api/models/fake/load?wait=false"
    # No token, a wrong token: 403, and the model stays where it was.
    assert signed_in.post(load).status_code == 403
    wrong = signed_in.post(load, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "csrf_failed"
    # From another origin, even with the right token: the gate refuses it first.
    token = csrf_of(signed_in)
    foreign = signed_in.post(load, headers={"X-CSRF-Token": token,
                                            "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "origin_not_allowed"
    cross = signed_in.post("/ui/logout", data={"csrf": token},
                           headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    time.sleep(0.5)
    assert gateway.model("fake", INF_KEY)["state"] != "ready"
    # A token of another session is no good either.
    other, _ = sign_in(gateway.url)
    with closing(other):
        assert other.post(load, headers={"X-CSRF-Token": token}).status_code == 403
    # And with its own token, the same request does what it says, in the audit log under
    # the id of the key that signed in.
    ok = signed_in.post(load, headers={"X-CSRF-Token": token})
    assert ok.status_code == 200, ok.text
    signed_in.post("/ui/api/models/fake/unload", headers={"X-CSRF-Token": token})
    audit = httpx.get(gateway.url + "/api/admin/audit?limit=5", headers={
        "Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    actions = [(row["actor"], row["path"]) for row in audit]
    assert (key_id(ADMIN_KEY), "/api/admin/models/fake/load") in actions, actions
    assert all(row["path"].startswith("/api/admin/") for row in audit)  # not /ui/api/...


def test_validation_by_field(signed_in: httpx.Client) -> None:
    token = csrf_of(signed_in)
    resp = signed_in.post("/ui/check-spec/new-one", headers={"X-CSRF-Token": token}, json={
        "backend": "nope", "max_queue": -1, "source": {"hf": 3}})
    fields = {e["field"] for e in resp.json()["errors"]}
    assert {"backend", "max_queue", "source.hf"} <= fields, resp.json()
    good = signed_in.post("/ui/check-spec/new-one", headers={"X-CSRF-Token": token},
                          json={"backend": "remote", "source": {"url": "http://127.0.0.1:9/v1"}})
    assert good.json() == {"valid": True, "errors": []}
    assert signed_in.post("/ui/check-spec/x", json={}).status_code == 403  # no token


def test_sign_out_ends_the_session(gateway: Gateway) -> None:
    client, _ = sign_in(gateway.url)
    with closing(client):
        token = csrf_of(client)
        assert client.post("/ui/logout", data={"csrf": "wrong"}).status_code == 403
        assert client.get("/ui/api/models").status_code == 200
        out = client.post("/ui/logout", data={"csrf": token})
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        assert client.get("/ui/api/models").status_code == 401
        assert client.get("/ui/models").headers["location"].startswith("/ui/login")


def test_events_stream_and_static_assets(signed_in: httpx.Client) -> None:
    with signed_in.stream("GET", "/ui/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        first = b""
        for chunk in resp.iter_bytes():
            first += chunk
            if b"\n\n" in first:
                break
        assert first.startswith(b"event: snapshot")
    css = httpx.get(str(signed_in.base_url) + "/ui/static/vendor/uplot/uPlot.min.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert httpx.get(str(signed_in.base_url)
                     + "/ui/static/../sessions.py").status_code in (400, 404)


def test_no_keys_no_sign_in(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")])
    resp = httpx.get(gw.url + "/")
    assert resp.status_code == 200 and "Models" in resp.text and "Sign out" not in resp.text
    assert httpx.get(gw.url + "/ui/api/models").status_code == 200
    # Still a CSRF token on state-changing calls, and still no foreign origin.
    assert httpx.post(gw.url + "/ui/api/models/fake/unload").status_code == 403
    assert httpx.get(gw.url + "/ui/login", follow_redirects=False).status_code == 303


def test_another_prefix(tmp_path: Path) -> None:
    """The dashboard's paths all follow its prefix (the pages, their links, the redirects)."""
    settings = Settings(data_dir=tmp_path)
    dash = Dashboard(cast(GatewayService, None), KeyGuard([], ["sk-a"]), RequestMetrics(dict),
                     settings, lambda: app, prefix="/console/")
    app = Starlette(routes=dash.routes())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        root = client.get("/", follow_redirects=False)
        assert root.headers["location"] == "/console/login?next=%2F"
        page = client.get("/console/login")
        assert 'href="/console/static/dash.css"' in page.text
        assert 'action="/console/login"' in page.text
        assert client.get("/console/static/dash.js").status_code == 200
        assert client.get("/ui/login").status_code == 404


def _with_sessions(tmp_path: Path, check: Callable[[Persistence], Awaitable[None]]) -> None:
    """Run `check` with a real state database (SQLite) opened as the gateway opens it."""
    async def run() -> None:
        persistence = Persistence(f"sqlite:///{tmp_path / 'state.db'}")
        await persistence.open()
        try:
            await check(persistence)
        finally:
            await persistence.close()

    asyncio.run(run())


def _rows(persistence: Persistence) -> list[tuple[object, ...]]:
    assert persistence.store is not None
    with persistence.store.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM dashboard_sessions")]


def test_sessions_expire(tmp_path: Path) -> None:
    async def check(persistence: Persistence) -> None:
        sessions = Sessions(lambda: persistence, ["k"], idle=1, longest=10)
        sid, session = await sessions.open("k", "key-x")
        assert await sessions.get(sid) is session
        await asyncio.sleep(1.1)
        assert await sessions.get(sid) is None and _rows(persistence) == []
        assert await sessions.get("") is None and await sessions.get("nope") is None
        longest = Sessions(lambda: persistence, ["k"], idle=10, longest=1)
        sid, _ = await longest.open("k", "key-x")
        assert await longest.get(sid) is not None
        await asyncio.sleep(1.1)
        assert await longest.get(sid) is None

    _with_sessions(tmp_path, check)


def test_sessions_are_shared_and_keep_no_secret(tmp_path: Path) -> None:
    """Two gateways' `Sessions` on one database: a session opened on one works on the other
    (and after a restart: a new `Sessions`), with the key its id names in this gateway's
    configuration; sign-out on one ends it on the other within a second; a key no longer
    configured ends its sessions; the table holds neither the id nor the key."""
    key = "sk-dash-shared-admin-0123456789"

    async def check(persistence: Persistence) -> None:
        a = Sessions(lambda: persistence, [key])
        b = Sessions(lambda: persistence, ["sk-other", key])
        sid, opened = await a.open(key, key_id(key))
        on_b = await b.get(sid)
        assert on_b is not None and on_b.key == key and on_b.actor == key_id(key)
        assert on_b.csrf == opened.csrf and on_b.csrf_ok(opened.csrf)
        assert not on_b.csrf_ok("wrong") and not on_b.csrf_ok(None)
        restarted = Sessions(lambda: persistence, [key])
        assert (await restarted.get(sid) or opened).key == key
        dump = repr(_rows(persistence))
        assert sid not in dump and key not in dump and key_id(key) in dump

        await a.close(sid)
        assert await a.get(sid) is None  # at once where it was signed out
        t0 = time.monotonic()
        while await b.get(sid) is not None:
            assert time.monotonic() - t0 < 1.5, "still open on the other gateway"
            await asyncio.sleep(0.05)
        assert _rows(persistence) == []

        sid, _ = await a.open(key, key_id(key))
        removed = Sessions(lambda: persistence, ["sk-a-new-admin-key"])
        assert await removed.get(sid) is None and _rows(persistence) == []

    _with_sessions(tmp_path, check)


def test_sessions_are_capped(tmp_path: Path) -> None:
    async def check(persistence: Persistence) -> None:
        sessions = Sessions(lambda: persistence, ["k"], cap=3)
        sids = [(await sessions.open("k", "key-x"))[0] for _ in range(5)]
        assert len(_rows(persistence)) == 3
        fresh = Sessions(lambda: persistence, ["k"])  # no cache: what the table says
        assert [await fresh.get(s) is not None for s in sids] == [False] * 2 + [True] * 3

    _with_sessions(tmp_path, check)


def test_quantile_interpolates_in_its_bucket() -> None:
    hist = {0.1: 0.0, 0.5: 10.0, 1.0: 20.0, float("inf"): 20.0}
    assert quantile(hist, 0.5) == pytest.approx(0.5)
    assert quantile(hist, 0.25) == pytest.approx(0.3)
    assert quantile({1.0: 0.0, float("inf"): 0.0}, 0.5) is None


def test_traffic_samples_only_while_watched() -> None:
    metrics = RequestMetrics(lambda: {"m": "chat"})
    reads = 0

    async def tokens() -> dict[str, float]:
        nonlocal reads
        reads += 1
        return {"m": 10.0 * reads}

    async def run() -> None:
        traffic = Traffic(metrics.collect, tokens, interval=0.05)
        await asyncio.sleep(0.2)
        assert reads == 0  # nobody watching: nothing sampled
        async with traffic.watch() as queue:
            await asyncio.sleep(0.01)  # the sampler's first reading: the baseline
            tally = metrics.tally("m", "/chat/completions")
            for _ in range(4):
                metrics.record(tally, 200, 0.2, 0.0004)
            metrics.record(tally, 503, 0.01, 0.0001)
            point = await asyncio.wait_for(queue.get(), 2)
        row = point["models"]["m"]
        assert row["rps"] > 0 and row["errors"] == {"5xx": 1}
        assert 100 <= row["p50"] <= 250 and row["overhead_ms"] > 0 and row["tokens_per_s"] > 0
        seen = reads
        await asyncio.sleep(0.2)
        assert reads == seen and traffic.watchers == 0  # stopped with the last watcher

    asyncio.run(run())


def test_a_configured_prefix(gateway_factory: GatewayFactory) -> None:
    """MODELHOST_DASHBOARD_PREFIX moves the dashboard; `/` links there; the old place is
    nothing (a server without keys: no sign-in)."""
    gw = gateway_factory([fake_model("fake")], env={"MODELHOST_DASHBOARD_PREFIX": "/console"})
    resp = httpx.get(gw.url + "/", follow_redirects=True)
    assert resp.status_code == 200 and 'href="/console/' in resp.text
    assert httpx.get(gw.url + "/console/models").status_code == 200
    assert "fake" in httpx.get(gw.url + "/console/api/models").text
    assert httpx.get(gw.url + "/ui/models").status_code == 404
