"""How an exchange with a worker fails.

Every failure is an `OSError` (`ConnectionError`, `TimeoutError`, `ssl.SSLError`), so callers
catch one thing; these subclasses say which failure it was where a caller answers each one
differently (the relay's 502, 504 and 499 in `serving/failures.py`):

    ConnectionError
    ├── UpstreamClosed          the worker closed the connection before its answer was complete
    │   └── Abandoned           whoever wanted the answer has gone
    ├── UpstreamProtocolError   the answer was not valid HTTP/1.1
    └── AnswerTooLarge          a body read whole went past its cap
    TimeoutError
    └── UpstreamTimeout         the exchange's deadline, or too long a silence from the worker
"""

from __future__ import annotations


class UpstreamClosed(ConnectionError):
    """The worker closed the connection before its answer was complete."""


class UpstreamProtocolError(ConnectionError):
    """The worker's answer was not valid HTTP/1.1."""


class Abandoned(UpstreamClosed):
    """Whoever wanted the answer has gone (`UpstreamResponse.abandoned`)."""


class AnswerTooLarge(ConnectionError):
    """The answer's body, read whole, went past the cap it was read with."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer exceeds {limit} bytes")
        self.limit = limit


class UpstreamTimeout(TimeoutError):
    """The exchange ran past its deadline (`idle` False) or the worker was silent for too
    long (`idle` True); `seconds` is the limit that was passed."""

    def __init__(self, seconds: float, idle: bool) -> None:
        super().__init__(f"the worker sent nothing for {seconds:g} s" if idle
                         else f"no complete answer within {seconds:g} s")
        self.seconds = seconds
        self.idle = idle
