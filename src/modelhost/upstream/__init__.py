"""A lean HTTP/1.1 client for the relay's hot path: the gateway talking to its workers.

The one HTTP client of the gateway's own calls: the relay's requests to workers and remote
servers, and the probes that say a worker is ready (`UpstreamClient.get_status`). The Hub and
the CLI use httpx2 (what huggingface_hub brings).

    client.py      UpstreamClient: pooling, timeouts (one sweeper for all), retry, probes
    connection.py  a keep-alive connection (asyncio protocol + httptools), the pool, sending
    response.py    UpstreamResponse: an answer as it arrives, read whole or streamed; Listener
    multipart.py   request bodies: bytes, a file, a composed multipart form
    errors.py      the failures, all of them `OSError`s, so callers catch one thing
"""

from modelhost.upstream.client import UpstreamClient
from modelhost.upstream.errors import (
    Abandoned,
    AnswerTooLarge,
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from modelhost.upstream.multipart import Body, Multipart
from modelhost.upstream.response import Listener, UpstreamResponse

__all__ = [
    "Abandoned",
    "AnswerTooLarge",
    "Body",
    "Listener",
    "Multipart",
    "UpstreamClient",
    "UpstreamClosed",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
]
