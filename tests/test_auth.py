"""The API key guard (`modelhost.auth.KeyGuard`): which Authorization headers it accepts, and
the two roles (inference keys call /v1, admin keys the admin API and /v1)."""

from __future__ import annotations

from modelhost.auth import ADMIN, INFERENCE, MISSING, WRONG, KeyGuard, route_role
from modelhost.errors import Forbidden, ModelhostError, Unauthorized


def check(guard: KeyGuard, *values: bytes) -> ModelhostError | None:
    return guard.check([(b"content-type", b"application/json"),
                        *((b"authorization", v) for v in values)])


def test_accepted_and_refused_headers() -> None:
    guard = KeyGuard(["sk-one", "sk-twö"])
    for value in (b"Bearer sk-one", b"bearer sk-one", b"Bearer   sk-one  ",
                  "Bearer sk-twö".encode(), "bearer  sk-twö".encode()):
        assert check(guard, value) is None, value
    for value, message in ((b"Bearer sk-two", "Incorrect API key"),
                           (b"Bearer sk-on", "Incorrect API key"),
                           (b"Basic sk-one", "Missing API key"),
                           (b"Bearer ", "Missing API key")):
        error = check(guard, value)
        assert isinstance(error, Unauthorized) and message in error.message, value
    missing = check(guard)
    assert isinstance(missing, Unauthorized) and "Missing API key" in missing.message
    # The first Authorization header is the one that counts.
    assert check(guard, b"Bearer sk-one", b"Bearer wrong") is None


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


def test_route_roles() -> None:
    assert route_role("/v1/chat/completions") == INFERENCE
    assert route_role("/v1/models") == INFERENCE
    assert route_role("/v1x") == INFERENCE  # prefixes err on the side of a key
    assert route_role("/api/admin/models") == ADMIN
    assert route_role("/api/adminx") == ADMIN
    assert route_role("/metrics") == ADMIN
    for path in ("/health", "/ready", "/docs", "/openapi.json", "/", "/api/other"):
        assert route_role(path) == MISSING, path


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
