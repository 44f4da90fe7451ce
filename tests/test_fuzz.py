"""Property-based fuzzing of a real `modelhost serve`: no request, however malformed, gets a
5xx.

The admin API is fuzzed from the gateway's own OpenAPI document (schemathesis: valid and
invalid parameters and bodies for every operation); the relayed /v1 routes, which the OpenAPI
document does not describe, from hypothesis strategies of OpenAI-shaped and arbitrary JSON
bodies. The only model is the fake worker (loaded once, before the run), so nothing heavy is
loaded; the runs are derandomized (the same cases every time) and bounded to well under a
minute.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from tests.conftest import Gateway, GatewayFactory, fake_model

ADMIN_KEY = "sk-admin-fuzz"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
EXAMPLES = 30  # per operation and generation mode
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    gw = module_gateway_factory([fake_model("fake")], env={
        "MODELHOST_ADMIN_KEYS": ADMIN_KEY, "OPENAI_API_KEYS": "sk-inf"})
    resp = httpx.post(gw.url + "/api/admin/models/fake/load", headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return gw


def send(client: httpx.Client, kwargs: dict[str, Any]) -> tuple[int, bytes]:
    """A request from schemathesis' `requests` arguments, through httpx; only the start of
    an answer is read (the event stream never ends)."""
    content: Any = None
    if "json" in kwargs:
        content = json.dumps(kwargs["json"], allow_nan=True).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        content = data if isinstance(data, bytes) else str(data).encode()
    headers = {k: str(v) for k, v in kwargs.get("headers", {}).items()}
    headers.update(AUTH)
    with client.stream(kwargs["method"], kwargs["url"], params=kwargs.get("params") or None,
                       headers=headers, content=content) as resp:
        head = b""
        for chunk in resp.iter_bytes():
            head += chunk
            if len(head) > 4096 or resp.headers.get("content-type", "").startswith(
                    "text/event-stream"):
                break
        return resp.status_code, head


def admin_operations(gateway: Gateway) -> list[Any]:
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document is valid OpenAPI
        operations.append(result.ok())
    assert len(operations) >= 15, [op.label for op in operations]
    return operations


def test_admin_api_fuzz(gateway: Gateway) -> None:
    failures: list[str] = []
    seen: dict[str, set[int]] = {}
    with httpx.Client(timeout=30) as client:
        for operation in admin_operations(gateway):
            # Random ids (mostly unknown models), then the fake model's own.
            passes: list[tuple[GenerationMode, dict[str, str] | None]] = [
                (GenerationMode.POSITIVE, None), (GenerationMode.NEGATIVE, None)]
            if "{model_id}" in operation.path:
                passes.append((GenerationMode.POSITIVE, {"model_id": "fake"}))
            for mode, ids in passes:
                @FUZZ
                @given(case=operation.as_strategy(generation_mode=mode, path_parameters=ids))
                def run(case: Case[Any]) -> None:
                    kwargs = case.as_transport_kwargs(base_url=gateway.url)
                    status, head = send(client, kwargs)
                    seen.setdefault(case.operation.label, set()).add(status)
                    if status >= 500:
                        failures.append(f"{kwargs['method']} {kwargs['url']} "
                                        f"{kwargs.get('json', kwargs.get('data'))!r:.300}: "
                                        f"{status} {head[:300]!r}")

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (no parameter, no body)
                    assert mode == GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n".join(failures[:20])
    # The key was accepted: the fuzz reached the routes, not only the gate.
    assert all(codes - {401, 403, 421} for codes in seen.values()), seen
    assert httpx.get(gateway.url + "/health").status_code == 200


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20)
MODELS = st.sampled_from(["fake", "nope", "", "fake\n", "FAKE", "fake/../fake"]) | st.text(
    max_size=12)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]) | JSON},
    optional={"content": st.text(max_size=50) | JSON, "name": JSON})
PARAMS = st.fixed_dictionaries({}, optional={
    "stream": st.booleans() | JSON, "n": st.integers(-2, 3) | JSON,
    "max_tokens": st.integers(-5, 50) | JSON, "temperature": st.floats(-1, 3) | JSON,
    "stop": st.lists(st.text(max_size=5), max_size=3) | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "encoding_format": st.sampled_from(["float", "base64", "x"]) | JSON,
    "user": JSON, "seed": JSON})
BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {"model": MODELS | JSON, "messages": st.lists(MESSAGE, max_size=3) | JSON}),
    "/v1/completions": st.fixed_dictionaries(
        {"model": MODELS | JSON, "prompt": st.text(max_size=50) | st.lists(
            st.text(max_size=10), max_size=3) | JSON}),
    "/v1/embeddings": st.fixed_dictionaries(
        {"model": MODELS | JSON, "input": st.text(max_size=50) | st.lists(
            st.text(max_size=10), max_size=5) | JSON}),
}


@pytest.mark.parametrize("path", sorted(BODIES))
def test_relayed_routes_fuzz(gateway: Gateway, path: str) -> None:
    failures: list[str] = []
    seen: dict[int, int] = {}
    keys = ["sk-inf", ADMIN_KEY]
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        @settings(max_examples=300, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=(BODIES[path].flatmap(lambda b: PARAMS.map(lambda p: {**p, **b})) | JSON),
               raw=st.booleans(), key=st.sampled_from(keys))
        def run(body: Any, raw: bool, key: str) -> None:
            content = json.dumps(body).encode()
            if raw:  # cut short: not JSON any more
                content = content[:max(1, len(content) // 2)]
            resp = client.post(path, content=content, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            if resp.status_code >= 500:
                failures.append(f"{content[:300]!r}: {resp.status_code} {resp.text[:300]}")

        run()
    assert not failures, "\n".join(failures[:20])
    # Not only refusals: some bodies were valid and answered (by the fake worker, for chat).
    assert 400 in seen and (200 in seen or path == "/v1/embeddings"), seen


def test_fuzz_gateway_log_has_no_traceback(gateway: Gateway) -> None:
    """Run last in the module: nothing the fuzz sent made the gateway log an exception."""
    assert "Traceback" not in gateway.output(), gateway.output()[-3000:]
