"""A small HTTP/1.1 load generator on asyncio: raw protocols, the httptools parser, keep-alive
connections, no client library in the way.

Open-loop runs send each request at its scheduled arrival time, whether or not earlier ones
have finished (a new connection is opened when none is idle), so a slow server shows up as
latency and errors rather than as a lower request rate. Each request records when it was due,
when it actually left (the generator's own lag) and when its answer was complete.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Target:
    """Where an arm's requests go: always a loopback address."""

    name: str
    port: int
    key: str | None = None
    host: str = "127.0.0.1"
    path: str = "/v1/chat/completions"

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK:
            raise ValueError(f"benchmarks only target loopback, not {self.host}")

    def request(self, body: bytes) -> bytes:
        head = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", "Accept: */*",
                f"Content-Length: {len(body)}"]
        if self.key:
            head.append(f"Authorization: Bearer {self.key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class StreamTrace:
    """Arrival times of the server-sent events of one streamed answer."""

    __slots__ = ("_tail", "chunks", "done", "times")

    def __init__(self, keep: bool = False) -> None:
        self.times: list[float] = []
        self.done = False
        self.chunks: list[bytes] | None = [] if keep else None
        self._tail = b""

    def feed(self, data: bytes, now: float) -> None:
        if self.chunks is not None:
            self.chunks.append(data)
        joined = self._tail + data
        # `data:` opens every event; the tail (4 bytes) catches a prefix split in two.
        count = joined.count(b"data:") - self._tail.count(b"data:")
        if count:
            self.times.extend([now] * count)
        if not self.done and b"[DONE]" in joined:
            self.done = True
        self._tail = joined[-5:]


Done = Callable[[BaseException | None], None]


class _Conn(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[_Conn], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_done: Done | None = None
        self.trace: StreamTrace | None = None
        self.status = 0
        self.nbytes = 0
        self.keep_alive = True
        self.closed = False

    def begin(self, trace: StreamTrace | None, on_done: Done) -> None:
        self.on_done = on_done
        self.trace = trace
        self.status = 0
        self.nbytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionResetError("connection closed by the server"))
        self.on_lost(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.nbytes += len(body)
        if self.trace is not None:
            self.trace.feed(body, time.perf_counter())

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._complete(None)

    def fail(self, exc: BaseException) -> None:
        self.close()
        self._complete(exc)

    def timeout(self) -> None:
        self.fail(TimeoutError("no complete answer in time"))

    def _complete(self, exc: BaseException | None) -> None:
        done, self.on_done = self.on_done, None
        self.trace = None
        if done is not None:
            done(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


@dataclass
class Reply:
    status: int
    nbytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


class Client:
    """Keep-alive connections to one target; a new one whenever none is idle (up to
    `max_conns`, beyond which requests wait for a free connection, their wait counted).

    `start` is the hot path: no task, no future, a callback when the answer is complete.
    """

    def __init__(self, target: Target, max_conns: int = 8000) -> None:
        self.target = target
        self.max_conns = max_conns
        self.idle: list[_Conn] = []
        self.open = 0
        self.peak_open = 0
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    def _lost(self, conn: _Conn) -> None:
        self.open -= 1
        self._hand_over(None)  # a waiter may open a connection now

    def _hand_over(self, conn: _Conn | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _idle(self) -> _Conn | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, conn: _Conn) -> None:
        if conn.closed or not conn.keep_alive:
            conn.close()
        elif not self._hand_over(conn):
            self.idle.append(conn)

    async def _acquire(self) -> _Conn:
        loop = asyncio.get_running_loop()
        while True:
            conn = self._idle()
            if conn is not None:
                return conn
            if self.open < self.max_conns:
                self.open += 1
                self.peak_open = max(self.peak_open, self.open)
                try:
                    _, proto = await loop.create_connection(
                        lambda: _Conn(self._lost), self.target.host, self.target.port)
                except OSError:
                    self.open -= 1
                    raise
                return proto
            waiter: asyncio.Future[_Conn | None] = loop.create_future()
            self._waiters.append(waiter)
            handed = await waiter
            if handed is not None and not handed.closed:
                return handed

    def start(self, request: bytes, timeout: float, on_reply: Callable[[Reply], None],
              trace: StreamTrace | None = None) -> None:
        """Send `request` now (on an idle connection, or once one is open); `on_reply` is
        called with the outcome."""
        conn = self._idle()
        if conn is not None:
            self._issue(conn, request, timeout, on_reply, trace)
            return
        task = asyncio.get_running_loop().create_task(
            self._start_slow(request, timeout, on_reply, trace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_slow(self, request: bytes, timeout: float,
                          on_reply: Callable[[Reply], None], trace: StreamTrace | None) -> None:
        try:
            conn = await asyncio.wait_for(self._acquire(), timeout)
        except (OSError, TimeoutError) as exc:
            on_reply(Reply(0, 0, f"connect: {type(exc).__name__}"))
            return
        self._issue(conn, request, timeout, on_reply, trace)

    def _issue(self, conn: _Conn, request: bytes, timeout: float,
               on_reply: Callable[[Reply], None], trace: StreamTrace | None) -> None:
        handle = asyncio.get_running_loop().call_later(timeout, conn.timeout)

        def done(exc: BaseException | None) -> None:
            handle.cancel()
            reply = Reply(conn.status, conn.nbytes, type(exc).__name__ if exc else None)
            self._release(conn)
            on_reply(reply)

        conn.begin(trace, done)
        assert conn.transport is not None
        conn.transport.write(request)

    async def send(self, request: bytes, timeout: float,
                   trace: StreamTrace | None = None) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def deliver(reply: Reply) -> None:
            if not future.done():
                future.set_result(reply)

        self.start(request, timeout, deliver, trace)
        return await future

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


# -- open loop ---------------------------------------------------------------------------

@dataclass
class OpenLoopResult:
    rate: float
    duration: float
    sent: int = 0  # recorded requests (due after the warm-up)
    total: int = 0  # all requests, warm-up included
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: list[float] = field(default_factory=list)  # answer complete - request sent (s)
    sched_latency: list[float] = field(default_factory=list)  # answer complete - due time (s)
    lag: list[float] = field(default_factory=list)  # request sent - due time (s)
    elapsed: float = 0.0  # from the first due time to the last answer
    peak_conns: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def arrival_times(rate: float, duration: float, seed: int, poisson: bool = True) -> list[float]:
    """Offsets (s) of the requests of an open-loop run: Poisson arrivals, or evenly spaced."""
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        if t >= duration:
            return times
        times.append(t)


async def open_loop(client: Client, body: bytes, rate: float, duration: float, *,
                    warmup: float = 0.0, seed: int = 1, timeout: float = 5.0,
                    poisson: bool = True) -> OpenLoopResult:
    """Send requests at `rate` per second for `warmup + duration` seconds and wait for every
    answer; only those due after the warm-up are recorded."""
    request = client.target.request(body)
    result = OpenLoopResult(rate=rate, duration=duration)
    loop = asyncio.get_running_loop()
    all_answered: asyncio.Future[None] = loop.create_future()
    outstanding = 0
    scheduled = False

    def fire(due: float, recorded: bool) -> None:
        nonlocal outstanding
        sent = time.perf_counter()

        def answered(reply: Reply) -> None:
            nonlocal outstanding
            done = time.perf_counter()
            outstanding -= 1
            if recorded:
                result.lag.append(sent - due)
                if reply.ok:
                    result.ok += 1
                    result.latency.append(done - sent)
                    result.sched_latency.append(done - due)
                else:
                    kind = reply.error or f"HTTP {reply.status}"
                    result.errors[kind] = result.errors.get(kind, 0) + 1
            if scheduled and outstanding == 0 and not all_answered.done():
                all_answered.set_result(None)

        outstanding += 1
        client.start(request, timeout, answered)

    start = time.perf_counter() + 0.02
    for offset in arrival_times(rate, warmup + duration, seed, poisson):
        due = start + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        recorded = offset >= warmup
        result.sent += recorded
        result.total += 1
        fire(due, recorded)
    scheduled = True
    if outstanding:
        await all_answered
    result.elapsed = time.perf_counter() - start - warmup
    result.peak_conns = client.peak_open
    return result


async def closed_loop_max(client: Client, body: bytes, concurrency: int, duration: float,
                          timeout: float = 5.0) -> tuple[float, int]:
    """Highest throughput with `concurrency` requests always in flight: (req/s, errors)."""
    request = client.target.request(body)
    deadline = time.perf_counter() + duration
    counts = [0, 0]

    async def worker() -> None:
        while time.perf_counter() < deadline:
            reply = await client.send(request, timeout)
            counts[0 if reply.ok else 1] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts[0] / (time.perf_counter() - start), counts[1]


# -- streams -----------------------------------------------------------------------------

@dataclass
class StreamResult:
    ok: bool
    error: str | None
    ttft: float | None  # first event - request sent (s)
    total: float  # last byte - request sent (s)
    events: int
    gaps: list[float]  # between consecutive events (s)
    started: float


async def one_stream(client: Client, request: bytes, timeout: float) -> StreamResult:
    trace = StreamTrace()
    sent = time.perf_counter()
    reply = await client.send(request, timeout, trace)
    end = time.perf_counter()
    times = trace.times
    ttft = times[0] - sent if times else None
    gaps = [b - a for a, b in itertools.pairwise(times)]
    error = reply.error if reply.error else (None if reply.ok else f"HTTP {reply.status}")
    if error is None and not trace.done:
        error = "no [DONE]"
    return StreamResult(ok=error is None, error=error, ttft=ttft, total=end - sent,
                        events=len(times), gaps=gaps, started=sent)


async def closed_loop_streams(client: Client, body: bytes, concurrency: int, duration: float,
                              timeout: float = 30.0) -> list[StreamResult]:
    """`concurrency` clients, each streaming one answer after another for `duration` s."""
    request = client.target.request(body)
    deadline = time.perf_counter() + duration
    results: list[StreamResult] = []

    async def worker() -> None:
        while time.perf_counter() < deadline:
            results.append(await one_stream(client, request, timeout))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def concurrent_streams(client: Client, body: bytes, count: int, spread: float,
                             timeout: float, during: Callable[[], None] | None = None,
                             at: float = 0.0) -> list[StreamResult]:
    """Open `count` streams spread evenly over `spread` seconds; `during` is called once,
    `at` seconds after the last one opened (to sample the server while all are open)."""
    request = client.target.request(body)
    tasks: list[asyncio.Task[StreamResult]] = []
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    for i in range(count):
        delay = start + spread * i / max(count, 1) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one_stream(client, request, timeout)))
    if during is not None:
        await asyncio.sleep(at)
        during()
    return list(await asyncio.gather(*tasks))


async def settle(client: Client, body: bytes, limit: float = 15.0,
                 quick_enough: float = 0.05) -> float:
    """After an overload: wait until one request is answered quickly again (s waited)."""
    request = client.target.request(body)
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        sent = time.perf_counter()
        reply = await client.send(request, limit)
        if reply.ok and time.perf_counter() - sent < quick_enough:
            break
        await asyncio.sleep(0.1)
    return time.perf_counter() - start
