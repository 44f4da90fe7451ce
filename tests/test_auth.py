"""The API key guard (`modelhost.auth.KeyGuard`): which Authorization headers it accepts, and
the two roles (inference keys call /v1, admin keys the admin API and /v1)."""

from __future__ import annotations

import pytest

from modelhost.auth import ADMIN, INFERENCE, MISSING, WRONG, KeyGuard, route_role
from modelhost.errors import Forbidden, ModelhostError, Unauthorized

ROLE_NAMES = {INFERENCE: "inference", ADMIN: "admin", MISSING: "anyone"}


def check(guard: KeyGuard, *values: bytes) -> ModelhostError | None:
    return guard.check([(b"content-type", b"application/json"),
                        *((b"authorization", v) for v in values)])


GUARD = KeyGuard(["sk-one", "sk-twö"])


@pytest.mark.parametrize("values", [
    pytest.param((b"Bearer sk-one",), id="bearer"),
    pytest.param((b"bearer sk-one",), id="scheme-in-lower-case"),
    pytest.param((b"Bearer   sk-one  ",), id="spaces-around-the-key"),
    pytest.param(("Bearer sk-twö".encode(),), id="utf8-key"),
    pytest.param(("bearer  sk-twö".encode(),), id="utf8-key-lower-case-two-spaces"),
    pytest.param((b"Bearer sk-one", b"Bearer wrong"), id="the-first-header-is-the-one-that-counts"),
])
def test_accepted_headers(values: tuple[bytes, ...]) -> None:
    assert check(GUARD, *values) is None


@pytest.mark.parametrize(("values", "message"), [
    pytest.param((b"Bearer sk-two",), "Incorrect API key", id="another-key"),
    pytest.param((b"Bearer sk-on",), "Incorrect API key", id="a-prefix-of-a-key"),
    pytest.param((b"Basic sk-one",), "Missing API key", id="not-bearer"),
    pytest.param((b"Bearer ",), "Missing API key", id="bearer-without-a-key"),
    pytest.param((), "Missing API key", id="no-header"),
])
def test_refused_headers(values: tuple[bytes, ...], message: str) -> None:
    error = check(GUARD, *values)
    assert isinstance(error, Unauthorized) and message in error.message


def test_no_keys_configured_means_open() -> None:
    assert check(KeyGuard([])) is None
    assert check(KeyGuard([]), b"Bearer anything") is None


def test_two_roles() -> None:
    guard = KeyGuard(["sk-inf"], ["sk-adm", "sk-adm2"])
    inf, adm = b"Bearer sk-inf", b"bearer  sk-adm2 "
    # /v1: either role.
    assert guard.judge(inf, INFERENCE) is None
    assert guard.judge(adm, INFERENCE) is None
    # The admin API: an admin key only; an inference key is 403, no or a wrong key 401.
    assert guard.judge(adm, ADMIN) is None
    assert guard.judge(b"Bearer sk-adm", ADMIN) is None
    refused = guard.judge(inf, ADMIN)
    assert isinstance(refused, Forbidden) and refused.status == 403
    assert refused.body()["error"]["type"] == "permission_error"
    assert "MODELHOST_ADMIN_KEYS" in refused.message
    for raw in (None, b"Bearer nope", b"Basic sk-adm"):
        error = guard.judge(raw, ADMIN)
        assert isinstance(error, Unauthorized), raw
    # A route for anyone.
    assert guard.judge(None, MISSING) is None
    # The 401 says how to authenticate; the 403 does not ask for another try.
    assert (b"www-authenticate", b"Bearer") in guard.refusal(Unauthorized("x")).headers
    assert all(name != b"www-authenticate"
               for name, _ in guard.refusal(Forbidden("x")).headers)


def test_inference_keys_without_an_admin_key_close_the_admin_api() -> None:
    guard = KeyGuard(["sk-inf"])
    for raw in (None, b"Bearer sk-inf", b"Bearer other"):
        error = guard.judge(raw, ADMIN)
        assert isinstance(error, Forbidden), raw
        assert "MODELHOST_ADMIN_KEYS" in error.message
    assert guard.judge(b"Bearer sk-inf", INFERENCE) is None


def test_admin_keys_alone_guard_v1_too() -> None:
    guard = KeyGuard([], ["sk-adm"])
    assert not guard.open
    assert isinstance(guard.judge(None, INFERENCE), Unauthorized)
    assert guard.judge(b"Bearer sk-adm", INFERENCE) is None


def test_a_key_in_both_lists_has_both_roles() -> None:
    guard = KeyGuard(["same"], ["same"])
    assert guard.role(b"Bearer same") == INFERENCE | ADMIN
    assert guard.judge(b"Bearer same", ADMIN) is None


# Prefixes err on the side of a key: /v1x and /api/adminx ask for one too.
@pytest.mark.parametrize(("path", "role"), [
    *((path, INFERENCE) for path in ("/v1/chat/completions", "/v1/models", "/v1x")),
    *((path, ADMIN) for path in ("/api/admin/models", "/api/adminx", "/metrics")),
    *((path, MISSING) for path in ("/health", "/ready", "/docs", "/openapi.json", "/",
                                   "/api/other")),
], ids=lambda value: value if isinstance(value, str) else ROLE_NAMES.get(value, str(value)))
def test_route_roles(path: str, role: int) -> None:
    assert route_role(path) == role


def test_many_keys() -> None:
    """Thousands of keys of both roles: each is recognised with its role, and no other."""
    inference = [f"sk-inf-{i:05d}-{'x' * (i % 40)}" for i in range(2000)]
    admin = [f"sk-adm-{i:05d}" for i in range(500)]
    guard = KeyGuard(inference, admin)
    for key in inference[::97]:
        assert guard.role(f"Bearer {key}".encode()) == INFERENCE
    for key in admin[::31]:
        assert guard.role(f"Bearer {key}".encode()) == ADMIN
    assert guard.role(b"Bearer sk-inf-00001") == WRONG
    assert guard.role(b"Bearer " + inference[5].encode()[:-1]) == WRONG
