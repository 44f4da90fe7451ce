"""One error envelope everywhere, with the right status codes; the API key guard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, fake_model, gateways, openai_client, wait_for

KEY = "sk-test-key-1"


# Each test runs twice: on the server's hot path for the relayed routes (the default), and with
# the access log on, which sends every request through the ASGI app (server.py).
@pytest.fixture(scope="module", params=["hot-path", "asgi-path"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Gateway]:
    env = {"OPENAI_API_KEYS": f"{KEY}, sk-other", "MODELHOST_MAX_REQUEST_BYTES": "4096"}
    if request.param == "asgi-path":
        env["MODELHOST_ACCESS_LOG"] = "true"
    # Its own `gateways`, not module_gateway_factory: each path's gateway stops before the
    # next one starts.
    with gateways(tmp_path_factory.mktemp(request.param)) as make:
        yield make([fake_model("fake"), {**fake_model("embedder"), "task": "embedding"}],
                   env=env)


def post(gw: Gateway, path: str, content: bytes | None = None, key: str | None = KEY,
         **json_body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(gw.url + path, content=content, headers=headers, timeout=30)
    return httpx.post(gw.url + path, json=json_body, headers=headers, timeout=30)


def assert_envelope(resp: httpx.Response, status: int, param: str | None = None,
                    code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_missing_key_is_401(gateway: Gateway) -> None:
    resp = post(gateway, "/v1/chat/completions", key=None, model="fake", messages=[])
    error = assert_envelope(resp, 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert resp.headers["www-authenticate"] == "Bearer"


def test_wrong_key_is_401(gateway: Gateway) -> None:
    with openai_client(gateway, api_key="sk-wrong") as client, \
            pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_every_configured_key_works(gateway: Gateway) -> None:
    for key in (KEY, "sk-other"):
        with openai_client(gateway, api_key=key) as client:
            assert {m.id for m in client.models.list()} == {"fake", "embedder"}


def test_health_and_ready_need_no_key(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/ready").status_code == 200


def test_unknown_model_is_404(gateway: Gateway) -> None:
    with openai_client(gateway, api_key=KEY) as client, \
            pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": ""}])
    assert info.value.code == "model_not_found"
    resp = httpx.get(gateway.url + "/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert_envelope(resp, 404, param="model", code="model_not_found")
    # Matched in full: a trailing newline does not reach model 'fake'.
    resp = httpx.get(gateway.url + "/v1/models/fake%0A",
                     headers={"Authorization": f"Bearer {KEY}"})
    assert_envelope(resp, 404, param="model", code="model_not_found")


def test_malformed_json_is_400(gateway: Gateway) -> None:
    error = assert_envelope(post(gateway, "/v1/chat/completions", content=b'{"model": '), 400)
    assert "JSON" in error["message"]
    assert_envelope(post(gateway, "/v1/chat/completions", content=b"[1, 2]"), 400)
    assert_envelope(post(gateway, "/v1/chat/completions", content=b""), 400)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "fake"}, "messages"),
    ({"model": "fake", "messages": []}, "messages"),
    ({"model": "fake", "messages": ["hi"]}, "messages[0]"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "stream"),
])
def test_invalid_fields_are_400_with_param(gateway: Gateway, body: dict[str, Any],
                                           param: str) -> None:
    error = assert_envelope(post(gateway, "/v1/chat/completions", **body), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_completions_need_a_prompt(gateway: Gateway) -> None:
    assert_envelope(post(gateway, "/v1/completions", model="fake"), 400, param="prompt")


def test_model_of_another_task_is_400(gateway: Gateway) -> None:
    resp = post(gateway, "/v1/chat/completions", model="embedder",
                messages=[{"role": "user", "content": "x"}])
    assert_envelope(resp, 400, param="model", code="model_not_supported")


def test_body_too_large_is_413(gateway: Gateway) -> None:
    big = "x" * 10_000
    resp = post(gateway, "/v1/chat/completions", model="fake",
                messages=[{"role": "user", "content": big}])
    assert_envelope(resp, 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b'{"model": "fake", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    resp = httpx.post(gateway.url + "/v1/chat/completions", content=chunks(),
                      headers={"Authorization": f"Bearer {KEY}"})
    assert_envelope(resp, 413)


def test_unknown_route_and_method(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    assert_envelope(httpx.get(gateway.url + "/v1/nothing", headers=headers), 404)
    assert_envelope(httpx.get(gateway.url + "/v1/chat/completions", headers=headers), 405)


def test_access_log_has_the_relayed_routes(gateway: Gateway) -> None:
    post(gateway, "/v1/chat/completions", key=None, model="fake")
    line = '"POST /v1/chat/completions HTTP/1.1" 401'
    if "MODELHOST_ACCESS_LOG" in gateway.env:
        assert wait_for(lambda: line in gateway.output(), timeout=5), gateway.output()[-2000:]
    else:
        assert line not in gateway.output()
