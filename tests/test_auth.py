"""The API key guard (`modelhost.auth.KeyGuard`): which Authorization headers it accepts."""

from __future__ import annotations

from modelhost.auth import KeyGuard
from modelhost.errors import Unauthorized


def check(guard: KeyGuard, *values: bytes) -> Unauthorized | None:
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
