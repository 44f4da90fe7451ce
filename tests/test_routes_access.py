"""Every route of the built app, and who may call it (docs/security.md, "What each key can do").

The routes are enumerated from the app itself (FastAPI's routes, the relayed hot routes, the
health and documentation routes), and each must have an owner in `OWNERS`: a route added
without one makes `test_every_route_has_an_owner` fail. Each route is then called on a real
`modelhost serve` with no key, a wrong key, an inference key, an admin key, a foreign Host and a
foreign Origin, under the three key configurations (both roles, inference keys only, none).

The dashboard's routes (SESSION) take no key at all: a session cookie (tests/test_dashboard.py
signs in). Without one they answer the sign-in page (303) or 401, whatever key is sent; with
no key configured they are open, but a state-changing call still needs the page's CSRF token
(403 csrf_failed). The gate's Host and Origin checks apply to them as to every route.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from modelhost.app import build_app
from modelhost.serving.front import Front
from modelhost.settings import Settings
from tests.conftest import GatewayFactory

PUBLIC, INFERENCE, ADMIN, SESSION = "public", "inference", "admin", "session"
INF_KEY, ADMIN_KEY = "sk-inference", "sk-admin"
STATE_CHANGING = {"POST", "PUT", "DELETE", "PATCH"}

# (method, path template) -> who may call it. HEAD, where a route has it, goes with GET.
OWNERS: dict[tuple[str, str], str] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/v1/models"): INFERENCE,
    ("GET", "/v1/models/{model:path}"): INFERENCE,
    ("POST", "/v1/chat/completions"): INFERENCE,
    ("POST", "/v1/completions"): INFERENCE,
    ("POST", "/v1/embeddings"): INFERENCE,
    ("POST", "/v1/audio/transcriptions"): INFERENCE,
    ("POST", "/v1/audio/translations"): INFERENCE,
    ("POST", "/v1/audio/diarization"): INFERENCE,
    ("GET", "/api/admin/models"): ADMIN,
    ("GET", "/api/admin/models/{model_id:path}/history"): ADMIN,
    ("POST", "/api/admin/models/{model_id:path}/download"): ADMIN,
    ("DELETE", "/api/admin/models/{model_id:path}/download"): ADMIN,
    ("POST", "/api/admin/models/{model_id:path}/load"): ADMIN,
    ("POST", "/api/admin/models/{model_id:path}/unload"): ADMIN,
    ("DELETE", "/api/admin/models/{model_id:path}/cache"): ADMIN,
    ("POST", "/api/admin/models/{model_id:path}/rollback"): ADMIN,
    ("POST", "/api/admin/reload"): ADMIN,
    ("GET", "/api/admin/models/{model_id:path}"): ADMIN,
    ("PUT", "/api/admin/models/{model_id:path}"): ADMIN,
    ("DELETE", "/api/admin/models/{model_id:path}"): ADMIN,
    ("GET", "/api/admin/gpus"): ADMIN,
    ("GET", "/api/admin/cache"): ADMIN,
    ("GET", "/api/admin/token"): ADMIN,
    ("PUT", "/api/admin/token"): ADMIN,
    ("DELETE", "/api/admin/token"): ADMIN,
    ("GET", "/api/admin/events"): ADMIN,
    ("GET", "/metrics"): ADMIN,
    ("GET", "/api/admin/audit"): ADMIN,
    ("GET", "/api/admin/usage"): ADMIN,
    # The dashboard (modelhost.dashboard).
    ("GET", "/"): SESSION,
    ("GET", "/ui/login"): PUBLIC,
    ("POST", "/ui/login"): PUBLIC,
    ("POST", "/ui/logout"): SESSION,
    ("GET", "/ui/static/{name:path}"): PUBLIC,
    ("GET", "/ui/events"): SESSION,
    ("GET", "/ui/logs/{model_id:path}"): SESSION,
    ("POST", "/ui/check-spec/{model_id:path}"): SESSION,
    ("GET", "/ui/api/{rest:path}"): SESSION,
    ("POST", "/ui/api/{rest:path}"): SESSION,
    ("PUT", "/ui/api/{rest:path}"): SESSION,
    ("DELETE", "/ui/api/{rest:path}"): SESSION,
    ("GET", "/ui/v1/{rest:path}"): SESSION,
    ("POST", "/ui/v1/{rest:path}"): SESSION,
    ("GET", "/ui/{page}"): SESSION,
}


def built_app(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Front:
    (tmp / "models.yaml").write_text("include_builtin: false\nmodels: []\n")
    monkeypatch.setenv("MODELHOST_CONFIG", str(tmp / "models.yaml"))
    monkeypatch.setenv("MODELHOST_DATA_DIR", str(tmp / "data"))
    return build_app(Settings())


def app_routes(front: Front) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves."""
    found: set[tuple[str, str]] = set()
    # FastAPI keeps an included router whole: this walks into it, prefixes applied.
    for context in iter_route_contexts(front.app.routes):
        methods = getattr(context, "methods", None)
        assert methods, f"a route with no methods (a mount, a websocket?): {context.path}"
        for method in methods:
            found.add((str(method), str(context.path)))
    found |= {("POST", path.decode()) for path in front.hot_routes}
    found |= {("POST", path) for path in front.routes}
    return found


def concrete(path: str) -> str:
    """A path to call for a template: a model that does not exist (nothing is changed)."""
    return (path.replace("{model_id:path}", "no/such-model")
            .replace("{model:path}", "no/such-model").replace("{rest:path}", "models")
            .replace("{name:path}", "dash.css").replace("{page}", "gpus"))


def test_every_route_has_an_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = app_routes(built_app(tmp_path, monkeypatch))
    heads = {(m, p) for m, p in served if m == "HEAD"}
    for _, path in heads:
        assert ("GET", path) in served, f"HEAD {path} without GET"
    unowned = sorted(served - heads - OWNERS.keys())
    assert not unowned, f"routes with no owner in OWNERS (add them): {unowned}"
    gone = sorted(OWNERS.keys() - served)
    assert not gone, f"OWNERS lists routes the app no longer serves: {gone}"


def calls(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, str]]:
    """(method, concrete path, owner) of every route, HEAD included where it is served."""
    for method, path in sorted(app_routes(built_app(tmp, monkeypatch))):
        owner = OWNERS[("GET" if method == "HEAD" else method, path)]
        yield method, concrete(path), owner


def status_of(client: httpx.Client, method: str, path: str,
              headers: dict[str, str]) -> tuple[int, str]:
    body = b"{}" if method in STATE_CHANGING else None
    # Streamed, so that the event stream's endless answer is not waited for.
    with client.stream(method, path, content=body, headers={
            "Content-Type": "application/json", **headers}) as resp:
        code = ""
        if resp.status_code in (401, 403, 421) and method != "HEAD":
            resp.read()
            code = resp.json()["error"]["code"] or ""
        return resp.status_code, code


def passes(status: int) -> bool:
    """Let through the gate: whatever the route then answers, but no refusal and no 5xx."""
    return status not in (401, 403, 421) and status < 500


def check_all(url: str, tmp: Path, monkeypatch: pytest.MonkeyPatch,
              keys: str) -> list[str]:
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, owner in calls(tmp, monkeypatch):
            problems += check_route(client, url, keys, method, path, owner)
    return problems


def check_route(client: httpx.Client, url: str, keys: str, method: str, path: str,
                owner: str) -> list[str]:
    problems: list[str] = []

    def expect(label: str, headers: dict[str, str], wanted: int | None,
               code: str | None = None) -> None:
        status, got_code = status_of(client, method, path, headers)
        ok = passes(status) if wanted is None else status == wanted
        if code is not None and ok and method != "HEAD":  # HEAD: no body
            ok = got_code == code
        if not ok:
            problems.append(f"{method} {path} ({owner}) {label}: {status} {got_code}, "
                            f"expected {wanted or 'to pass'} {code or ''}")

    if owner == SESSION:
        return check_session_route(client, url, keys, method, path)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    inference = {"Authorization": f"Bearer {INF_KEY}"}
    wrong = {"Authorization": "Bearer sk-wrong"}
    if keys == "both":
        needs_key = 401 if owner != PUBLIC else None
        expect("no key", {}, needs_key)
        expect("wrong key", wrong, needs_key)
        expect("inference key", inference, 403 if owner == ADMIN else None,
               "admin_key_required" if owner == ADMIN else None)
        expect("admin key", admin, None)
    elif keys == "inference":
        expect("no key", {}, {PUBLIC: None, INFERENCE: 401, ADMIN: 403}[owner])
        expect("inference key", inference, 403 if owner == ADMIN else None,
               "admin_disabled" if owner == ADMIN else None)
        expect("admin key of another server", admin,
               {PUBLIC: None, INFERENCE: 401, ADMIN: 403}[owner])
    else:
        expect("no key", {}, None)
        expect("any key", wrong, None)
    # A foreign Host or Origin, with the best key of the configuration.
    best = {"both": admin, "inference": inference, "none": {}}[keys]
    best_result = 403 if keys == "inference" and owner == ADMIN else None
    expect("foreign Host", {**best, "Host": "evil.example"}, 421, "host_not_allowed")
    foreign = {**best, "Origin": "http://evil.example"}
    if method in STATE_CHANGING:
        expect("foreign Origin", foreign, 403, "origin_not_allowed")
        expect("cross-site", {**best, "Sec-Fetch-Site": "cross-site"}, 403,
               "origin_not_allowed")
    else:  # a browser may send it, and cannot read the answer (no CORS)
        expect("foreign Origin, read only", foreign, best_result)
    expect("same origin", {**best, "Origin": url}, best_result)
    return problems


def check_session_route(client: httpx.Client, url: str, keys: str, method: str,
                        path: str) -> list[str]:
    """A dashboard route called without a session: refused (303 to the sign-in page, or
    401) whatever key is sent; with no key configured, open but for the CSRF token."""
    problems: list[str] = []
    changing = method in STATE_CHANGING

    def expect(label: str, headers: dict[str, str], wanted: set[int] | None,
               code: str | None = None) -> None:
        status, got_code = status_of(client, method, path, headers)
        ok = passes(status) if wanted is None else status in wanted
        if code is not None and ok and method != "HEAD":
            ok = got_code == code
        if not ok:
            problems.append(f"{method} {path} (session) {label}: {status} {got_code}, "
                            f"expected {wanted or 'to pass'} {code or ''}")

    headers_tried = {"no key": {}, "wrong key": {"Authorization": "Bearer sk-wrong"},
                     "inference key": {"Authorization": f"Bearer {INF_KEY}"},
                     "admin key": {"Authorization": f"Bearer {ADMIN_KEY}"},
                     "same origin": {"Origin": url}}
    for label, headers in headers_tried.items():
        if keys != "none":
            expect(label, headers, {303, 401})
        elif changing:
            expect(label, headers, {403}, "csrf_failed")
        else:
            expect(label, headers, None)
    expect("foreign Host", {"Host": "evil.example"}, {421}, "host_not_allowed")
    if changing:
        expect("foreign Origin", {"Origin": "http://evil.example"}, {403}, "origin_not_allowed")
        expect("cross-site", {"Sec-Fetch-Site": "cross-site"}, {403}, "origin_not_allowed")
    return problems


@pytest.mark.parametrize("keys", ["both", "inference", "none"])
def test_who_may_call_each_route(gateway_factory: GatewayFactory, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    env = {"both": {"OPENAI_API_KEYS": INF_KEY, "MODELHOST_ADMIN_KEYS": ADMIN_KEY},
           "inference": {"OPENAI_API_KEYS": INF_KEY}, "none": {}}[keys]
    gw = gateway_factory([], env=env)
    problems = check_all(gw.url, tmp_path, monkeypatch, keys)
    assert not problems, "\n".join(problems)
    assert httpx.get(gw.url + "/health").status_code == 200
