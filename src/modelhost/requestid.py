"""Request ids: the client's `X-Request-ID` when it is a sane one, else one made here.

An id is returned in the answer's `X-Request-ID`, passed to the worker in the same header, and
put on the log lines about the request. A client's id is taken only when it is 1 to 128 of
`A-Z a-z 0-9 . _ : -` (it goes into headers and logs: nothing else is echoed); otherwise, or
when there is none, the id is this process's random prefix and a counter, which costs a
fraction of a microsecond (it is made for every request) and is unique across restarts.
"""

from __future__ import annotations

import itertools
import os
import re

_PREFIX = os.urandom(6).hex().encode()
_COUNTER = itertools.count(1)
_VALID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id(given: bytes | None = None) -> bytes:
    """`given` (a client's X-Request-ID) if it is a sane id, else a new one."""
    if given is not None and _VALID.fullmatch(given):
        return given
    return b"%s-%x" % (_PREFIX, next(_COUNTER))


def from_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request id of a request with these (lower-case) headers."""
    for name, value in headers:
        if name == b"x-request-id":
            return request_id(value)
    return request_id()
