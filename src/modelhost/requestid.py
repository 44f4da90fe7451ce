"""Request ids: the client's `X-Request-ID` when it is a sane one, else one made here.

An id is returned in the answer's `X-Request-ID`, passed to the worker in the same header, and
put on the log lines about the request. A client's id is taken only when it is 1 to 128 of
`A-Z a-z 0-9 . _ : -` (it goes into headers and logs: nothing else is echoed); otherwise, or
when there is none, one is made: in the form of a UUID (8-4-4-4-12 hex digits), from this
process's random prefix and a counter, which costs a fraction of a microsecond (it is made for
every request) and is unique across restarts.

Workers get a UUID: llama-cpp-python's server answers an empty 400 to an `X-Request-ID` that is
not one (its request-id middleware parses the header as a UUID). A made id is one already; a
client's id that is not is sent as the UUID derived from it (`uuid5`, the same id always giving
the same UUID, so a worker's log line can be traced back to the client's id).
"""

from __future__ import annotations

import itertools
import os
import re
import uuid

_PREFIX = os.urandom(8).hex()
_PREFIX_DASHED = f"{_PREFIX[:8]}-{_PREFIX[8:12]}-{_PREFIX[12:16]}".encode()
_COUNTER = itertools.count(1)
_VALID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_UUID = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NAMESPACE = uuid.UUID("6f1d1c0e-7a34-5b2e-9c1d-2f6b8e4a9d10")


def request_id(given: bytes | None = None) -> bytes:
    """`given` (a client's X-Request-ID) if it is a sane id, else a new one."""
    if given is not None and _VALID.fullmatch(given):
        return given
    count = next(_COUNTER)
    return b"%s-%04x-%012x" % (_PREFIX_DASHED, (count >> 48) & 0xFFFF, count & 0xFFFFFFFFFFFF)


def from_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request id of a request with these (lower-case) headers."""
    for name, value in headers:
        if name == b"x-request-id":
            return request_id(value)
    return request_id()


def for_worker(rid: bytes) -> bytes:
    """The id a worker is sent for the request `rid`: itself when a UUID, else its UUID."""
    if _UUID.fullmatch(rid):
        return rid
    return str(uuid.uuid5(_NAMESPACE, rid.decode("latin-1"))).encode()
