"""Who may reach the gateway, tried as an attacker would (docs/security.md), against a real
`modelhost serve`: the issue's attack (a web page that makes the operator's browser put and
load a `command` model), DNS rebinding, cross-site requests, CORS for configured origins, the
admin API's body limit, a key checked before any body is read, and draining.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from modelhost.app import build_app
from modelhost.settings import Settings
from tests.conftest import Gateway, GatewayFactory, fake_model

EVIL = "evil.example"


def payload(marker: Path) -> dict[str, Any]:
    """A model that runs code on the host when it is loaded: it writes `marker`."""
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('pwned')"
    return {"backend": "command", "command": [sys.executable, "-c", code, "{port}"]}


def chat(model: str = "fake") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def assert_error(resp: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if kind is not None:
        assert error["type"] == kind, error
    return error


def test_a_web_page_cannot_put_and_load_a_command_model(gateway_factory: GatewayFactory,
                                                        tmp_path: Path) -> None:
    """The issue's attack, with the default settings (no key, loopback): a page on
    evil.example that rebinds its name to 127.0.0.1, or posts to 127.0.0.1 straight from the
    operator's browser. Code through the API is allowed here, so that only the gate stands in
    the way, and the same calls made by the operator (same origin) show that the payload works.
    """
    gw = gateway_factory([fake_model("fake")], env={"MODELHOST_ADMIN_ALLOW_CODE": "true"})
    port = gw.port
    marker = tmp_path / "pwned"
    spec = payload(marker)
    attacks = [
        # DNS rebinding: evil.example now resolves to 127.0.0.1, the page is same-origin.
        ({"Host": f"{EVIL}:{port}", "Origin": f"http://{EVIL}:{port}"}, 421),
        ({"Host": f"{EVIL}:{port}"}, 421),
        ({"Host": EVIL, "Origin": f"http://{EVIL}"}, 421),
        # Cross-site request to the real address (CSRF): the Host is right, the Origin not.
        ({"Origin": f"http://{EVIL}"}, 403),
        ({"Origin": "null"}, 403),  # a sandboxed frame or a file:// page
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Origin": f"http://127.0.0.1:{port + 1}"}, 403),  # another local port is foreign
    ]
    for headers, status in attacks:
        for method, path, body in (("PUT", "/api/admin/models/x", spec),
                                   ("POST", "/api/admin/models/x/load", None),
                                   ("POST", "/api/admin/models/fake/load", None),
                                   ("DELETE", "/api/admin/models/fake/cache", None),
                                   ("PUT", "/api/admin/token", {"token": "hf_x"})):
            resp = httpx.request(method, gw.url + path, json=body, headers=headers, timeout=30)
            error = assert_error(resp, status)
            expected = "host_not_allowed" if status == 421 else "origin_not_allowed"
            assert error["code"] == expected, (headers, method, path, error)
            assert "access-control-allow-origin" not in resp.headers
    assert httpx.get(gw.url + "/api/admin/models/x").status_code == 404
    assert gw.admin_card("fake")["state"] == "cached"
    assert not httpx.get(gw.url + "/api/admin/token").json()["set"]
    assert not marker.exists()
    # Reading with a foreign Origin is let through (the browser hides the answer: no CORS
    # header); a rebinding page cannot read either.
    read = httpx.get(gw.url + "/api/admin/models", headers={"Origin": f"http://{EVIL}"})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    assert_error(httpx.get(gw.url + "/api/admin/models", headers={"Host": EVIL}), 421)
    # The operator's own calls, from the same origin, do what the attack wanted.
    same = {"Origin": f"http://127.0.0.1:{port}"}
    assert httpx.put(gw.url + "/api/admin/models/x", json=spec, headers=same,
                     timeout=30).status_code == 200
    httpx.post(gw.url + "/api/admin/models/x/load", headers=same, timeout=30)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "pwned"


def test_default_settings_refuse_a_command_model_even_same_origin(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory([fake_model("fake")])
    marker = tmp_path / "pwned"
    for headers in ({"Host": EVIL, "Origin": f"http://{EVIL}"}, {"Origin": f"http://{EVIL}"}, {}):
        resp = httpx.put(gw.url + "/api/admin/models/x", json=payload(marker),
                         headers=headers, timeout=30)
        assert resp.status_code in (400, 403, 421), resp.text
        httpx.post(gw.url + "/api/admin/models/x/load", headers=headers, timeout=30)
    assert httpx.get(gw.url + "/api/admin/models/x").status_code == 404
    assert not marker.exists()


def test_dns_rebinding_is_refused_on_every_kind_of_route(gateway_factory: GatewayFactory
                                                         ) -> None:
    gw = gateway_factory([fake_model("fake")])
    for host in (EVIL, f"{EVIL}:{gw.port}", "127.0.0.1.evil.example", "localhost.evil.example",
                 "evil.example.", "[::2]", "10.0.0.1", "127.0.0.1:80:80", "", "xn--e1a.localhostx"):
        for method, path, body in (("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", chat()),
                                   ("POST", "/v1/embeddings", {"model": "fake", "input": "x"}),
                                   ("GET", "/api/admin/models", None),
                                   ("GET", "/api/admin/events", None),
                                   ("GET", "/health", None), ("GET", "/ready", None),
                                   ("GET", "/openapi.json", None)):
            resp = httpx.request(method, gw.url + path, json=body, headers={"Host": host},
                                 timeout=30)
            assert_error(resp, 421)
    # The loopback names, any port, and the *.localhost names are this server's.
    for host in ("127.0.0.1", f"127.0.0.1:{gw.port}", "localhost", "LOCALHOST:1",
                 "[::1]", f"[::1]:{gw.port}", "app.localhost", "a.b.localhost:8080"):
        resp = httpx.get(gw.url + "/v1/models", headers={"Host": host}, timeout=30)
        assert resp.status_code == 200, (host, resp.text)


def test_foreign_origin_is_refused_on_chat_completions(gateway_factory: GatewayFactory) -> None:
    """On the hot path too, with and without keys; the same origin and non-browser clients
    (no Origin) are served."""
    gw = gateway_factory([fake_model("fake")])
    url = gw.url + "/v1/chat/completions"
    for headers in ({"Origin": f"http://{EVIL}"}, {"Origin": "https://127.0.0.1.nip.io"},
                    {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": f"http://{EVIL}", "Content-Type": "text/plain"}):
        resp = httpx.post(url, content=json.dumps(chat()), headers=headers, timeout=30)
        assert assert_error(resp, 403, "permission_error")["code"] == "origin_not_allowed"
    for headers in ({}, {"Origin": f"http://127.0.0.1:{gw.port}"},
                    {"Origin": f"http://localhost:{gw.port}", "Host": f"localhost:{gw.port}"},
                    {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}):
        resp = httpx.post(url, json=chat(), headers=headers, timeout=30)
        assert resp.status_code == 200, (headers, resp.text)
        assert resp.json()["object"] == "chat.completion"
    keyed = gateway_factory([fake_model("fake")], env={"OPENAI_API_KEYS": "sk-1"})
    resp = httpx.post(keyed.url + "/v1/chat/completions", json=chat(), timeout=30,
                      headers={"Origin": f"http://{EVIL}", "Authorization": "Bearer sk-1"})
    assert_error(resp, 403, "permission_error")


def test_configured_cors_origins_and_hosts(gateway_factory: GatewayFactory) -> None:
    app = "https://app.example"
    gw = gateway_factory([fake_model("fake")], env={
        "MODELHOST_CORS_ORIGINS": f"{app}/, http://localhost:3000",
        "MODELHOST_ALLOWED_HOSTS": "gw.example, .corp.example",
        "OPENAI_API_KEYS": "sk-inf", "MODELHOST_ADMIN_KEYS": "sk-adm"})
    key = {"Authorization": "Bearer sk-inf"}
    # Preflight of a listed origin: allowed, with what the browser needs.
    for path in ("/v1/chat/completions", "/v1/models", "/api/admin/models/x"):
        pre = httpx.options(gw.url + path, headers={
            "Origin": app, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        assert pre.status_code == 200, (path, pre.text)
        assert pre.headers["access-control-allow-origin"] == app
        assert "POST" in pre.headers["access-control-allow-methods"]
        allowed = pre.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-stainless-os" in allowed
        assert "access-control-allow-credentials" not in pre.headers
    # ... of any other origin: no CORS headers.
    pre = httpx.options(gw.url + "/v1/chat/completions", headers={
        "Origin": f"http://{EVIL}", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    # The listed origin's requests are served with CORS headers, a refusal too (so its page
    # can show why); other origins are refused.
    for origin in (app, "http://localhost:3000"):
        resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(), timeout=30,
                          headers={"Origin": origin, **key})
        assert resp.status_code == 200, resp.text
        assert resp.headers["access-control-allow-origin"] == origin
        nokey = httpx.post(gw.url + "/v1/chat/completions", json=chat(), timeout=30,
                           headers={"Origin": origin})
        assert_error(nokey, 401)
        assert nokey.headers["access-control-allow-origin"] == origin
    stream = httpx.post(gw.url + "/v1/chat/completions", json={**chat(), "stream": True},
                        timeout=30, headers={"Origin": app, **key})
    assert stream.status_code == 200 and stream.headers["access-control-allow-origin"] == app
    assert b"data: [DONE]" in stream.content
    listing = httpx.get(gw.url + "/v1/models", headers={"Origin": app, **key})
    assert listing.headers["access-control-allow-origin"] == app
    for origin in (f"http://{EVIL}", "https://app.example.evil", "http://app.example"):
        resp = httpx.post(gw.url + "/v1/chat/completions", json=chat(), timeout=30,
                          headers={"Origin": origin, **key})
        assert_error(resp, 403)
        assert "access-control-allow-origin" not in resp.headers
    # Configured host names, a domain and its subdomains; not a longer name.
    for host in ("gw.example", "GW.example:443", "corp.example", "a.corp.example:8443"):
        resp = httpx.get(gw.url + "/v1/models", headers={"Host": host, **key})
        assert resp.status_code == 200, (host, resp.text)
    for host in ("gw.example.evil", "xgw.example", "corp.example.evil", "evilcorp.example"):
        assert_error(httpx.get(gw.url + "/v1/models", headers={"Host": host, **key}), 421)


def test_any_host_when_asked(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([], env={"MODELHOST_ALLOWED_HOSTS": "*"})
    assert httpx.get(gw.url + "/health", headers={"Host": EVIL}).status_code == 200
    # The Origin rule still holds.
    resp = httpx.put(gw.url + "/api/admin/token", json={"token": "hf_x"},
                     headers={"Host": EVIL, "Origin": f"http://{EVIL}:1"})
    assert_error(resp, 403)


def test_admin_body_over_the_limit(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")], env={"MODELHOST_ADMIN_KEYS": "sk-adm"})
    key = {"Authorization": "Bearer sk-adm"}
    limit = 1024 * 1024
    # A 2 MiB spec: declared, then chunked (no Content-Length: counted while it is read).
    big = {"backend": "remote", "source": {"url": "https://api.example/v1"},
           "description": "x" * (2 * limit)}
    raw = json.dumps(big).encode()
    for kwargs in ({"content": raw}, {"content": iter([raw[i:i + 65536] for i in
                                                      range(0, len(raw), 65536)])}):
        resp = httpx.put(gw.url + "/api/admin/models/big", headers=key, timeout=30,
                         **kwargs)
        error = assert_error(resp, 413, "invalid_request_error")
        assert error["code"] == "request_too_large" and str(limit) in error["message"]
    for path in ("/api/admin/models/fake/load", "/api/admin/token"):
        resp = httpx.post(gw.url + path, headers=key, content=b"[" + b"0," * limit + b"0]",
                          timeout=30) if path.endswith("load") else httpx.put(
            gw.url + path, headers=key, json={"token": "hf_" + "x" * (limit + 10)}, timeout=30)
        assert_error(resp, 413)
    # Just under the limit: read, and judged on its content.
    small = {"token": "hf_" + "x" * (limit - 100)}
    resp = httpx.put(gw.url + "/api/admin/token", headers=key, json=small, timeout=30)
    assert resp.status_code != 413, resp.text
    httpx.delete(gw.url + "/api/admin/token", headers=key)
    assert httpx.get(gw.url + "/api/admin/models/big", headers=key).status_code == 404
    assert httpx.get(gw.url + "/health").status_code == 200


def test_smaller_admin_body_limit(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([], env={"MODELHOST_MAX_ADMIN_BODY_BYTES": "100"})
    resp = httpx.put(gw.url + "/api/admin/token", json={"token": "hf_" + "x" * 100})
    assert_error(resp, 413)
    resp = httpx.put(gw.url + "/api/admin/token", json={"token": "hf_x"})
    assert resp.status_code == 200, resp.text


def send_head(gw: Gateway, head: bytes, timeout: float = 5) -> tuple[bytes, bool]:
    """Send a request's head only, and read the answer; whether the server then closed."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            data += chunk
        return data, closed


def test_key_is_checked_before_the_body(gateway_factory: GatewayFactory) -> None:
    """An unauthenticated 8 MiB body that is never sent: 401 at once, no `100 Continue`, and
    the connection closed (a host, an origin or a role refused the same way)."""
    gw = gateway_factory([fake_model("fake")], env={
        "OPENAI_API_KEYS": "sk-inf", "MODELHOST_ADMIN_KEYS": "sk-adm"})
    size = 8 * 1024 * 1024
    cases = [
        (b"POST /v1/chat/completions", b"", b"401"),
        (b"POST /v1/embeddings", b"Authorization: Bearer sk-wrong\r\n", b"401"),
        (b"POST /v1/audio/transcriptions", b"", b"401"),
        (b"PUT /api/admin/models/x", b"Authorization: Bearer sk-inf\r\n", b"403"),
        (b"POST /v1/chat/completions", b"Authorization: Bearer sk-inf\r\nHost: evil\r\n",
         b"421"),
    ]
    for line, extra, status in cases:
        host = b"" if b"Host:" in extra else b"Host: 127.0.0.1\r\n"
        for expect in (b"", b"Expect: 100-continue\r\n"):
            head = (line + b" HTTP/1.1\r\n" + host + extra + expect +
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size)
            started = time.monotonic()
            data, closed = send_head(gw, head)
            assert data.startswith(b"HTTP/1.1 " + status), (line, data[:200])
            assert b"100 Continue" not in data
            assert closed, (line, "the connection was left open, waiting for the body")
            assert time.monotonic() - started < 5
    assert httpx.get(gw.url + "/health").status_code == 200


@pytest.fixture
def drained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The app in this process (no server), told to drain, as the server does on SIGTERM."""
    (tmp_path / "models.yaml").write_text("include_builtin: false\nmodels: []\n")
    monkeypatch.setenv("MODELHOST_CONFIG", str(tmp_path / "models.yaml"))
    monkeypatch.setenv("MODELHOST_DATA_DIR", str(tmp_path / "data"))
    for name in ("OPENAI_API_KEYS", "MODELHOST_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    front = build_app(Settings())
    front.draining = True
    # Not entered: the lifespan (workers, database) is not started.
    return TestClient(front, base_url="http://localhost")


def test_draining_refuses_all_but_health(drained: TestClient) -> None:
    assert drained.get("/health").json() == {"status": "ok"}
    for method, path in (("GET", "/ready"), ("GET", "/v1/models"),
                         ("POST", "/v1/chat/completions"), ("GET", "/api/admin/models"),
                         ("PUT", "/api/admin/models/x"), ("GET", "/docs")):
        resp = drained.request(method, path, json={})
        error = assert_error(resp, 503, "service_unavailable")
        assert error["code"] == "shutting_down"
        assert int(resp.headers["retry-after"]) >= 1
    # A foreign Host is still told so first.
    assert_error(drained.get("/health", headers={"Host": EVIL}), 421)


def test_the_asgi_path_refuses_as_the_server_does(gateway_factory: GatewayFactory,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests through the server (which asks the gate when the headers are
    complete) and through the app called as plain ASGI (another server, a test client): the
    same refusals."""
    env = {"OPENAI_API_KEYS": "sk-inf", "MODELHOST_ADMIN_KEYS": "sk-adm",
           "MODELHOST_ALLOWED_HOSTS": "gw.example"}
    gw = gateway_factory([fake_model("fake")], env=env)
    (tmp_path / "models.yaml").write_text("include_builtin: false\nmodels: []\n")
    monkeypatch.setenv("MODELHOST_CONFIG", str(tmp_path / "models.yaml"))
    monkeypatch.setenv("MODELHOST_DATA_DIR", str(tmp_path / "data"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    front = build_app(Settings())
    assert not front.server_gates
    asgi = TestClient(front, base_url="http://127.0.0.1")
    inf, adm = {"Authorization": "Bearer sk-inf"}, {"Authorization": "Bearer sk-adm"}
    cases: list[tuple[str, str, dict[str, str], int | None]] = [
        ("POST", "/v1/chat/completions", {}, 401),
        ("POST", "/v1/chat/completions", {"Authorization": "Bearer nope"}, 401),
        ("POST", "/v1/chat/completions", {**inf, "Host": EVIL}, 421),
        ("POST", "/v1/chat/completions", {**inf, "Origin": f"http://{EVIL}"}, 403),
        ("POST", "/v1/embeddings", {**adm, "Sec-Fetch-Site": "cross-site"}, 403),
        ("GET", "/v1/models", {}, 401),
        ("GET", "/v1/models", {**inf, "Host": "gw.example:443"}, None),
        ("GET", "/api/admin/models", inf, 403),
        ("GET", "/api/admin/models", adm, None),
        ("PUT", "/api/admin/token", {**adm, "Origin": "null"}, 403),
        ("GET", "/api/%61dmin/models", inf, 403),
        ("GET", "/health", {"Host": EVIL}, 421),
        ("GET", "/health", {}, None),
        ("GET", "/nowhere", {}, 404),
    ]
    for method, path, headers, wanted in cases:
        served = httpx.request(method, gw.url + path, headers=headers, json={}, timeout=30)
        direct = asgi.request(method, path, headers=headers, json={})
        for label, resp in (("server", served), ("asgi", direct)):
            if wanted is None:
                assert resp.status_code not in (401, 403, 421), (label, method, path, resp.text)
            else:
                assert resp.status_code == wanted, (label, method, path, resp.text)
        if wanted in (401, 403, 421):
            assert served.json()["error"] == direct.json()["error"], (method, path)
