"""The relay against a fake OpenAI-compatible worker (a real subprocess): streaming,
pass-through, faults and client disconnects."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.conftest import (
    Gateway,
    GatewayFactory,
    fake_model,
    openai_client,
    started_pids,
    wait_for,
    wait_gone,
)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("events") / "fake.events"


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory, events: Path) -> Gateway:
    return module_gateway_factory([
        fake_model("fake", events, aliases=["fake-alias"], max_restarts=5),
    ])


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai_client(gateway, api_key="unused") as client:
        yield client


def chat(gateway: Gateway, **body: Any) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions",
                      json={"model": "fake", "messages": MESSAGES, **body}, timeout=30)


def test_chat_through_the_official_client(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="fake", messages=MESSAGES)
    completion = ChatCompletion.model_validate_json(raw.content)
    assert completion.choices[0].message.content == "word0 word1 word2"


def test_alias_is_rewritten_to_the_worker_name(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="fake-alias", messages=MESSAGES)
    assert completion.model == "fake"


def test_stream_is_passed_through(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake", messages=MESSAGES, stream=True,
        extra_body={"fake": {"tokens": 4}})
    chunks: list[ChatCompletionChunk] = list(stream)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "word0 word1 word2 word3 "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_are_relayed(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="fake", prompt="x")
    assert completion.choices[0].text == " fake"


def test_slow_first_token_then_chunks_arrive_unbuffered(gateway: Gateway) -> None:
    # Each chunk must reach the client when the worker sends it, not when the stream ends.
    body = {"model": "fake", "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 4, "first_token_delay": 1.0, "gap": 0.4}}
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[0] >= 0.9  # the slow first token is waited for, not timed out
    # Chunks sent 0.4 s apart arrive spread out: a buffering relay delivers them together.
    assert arrivals[3] - arrivals[0] >= 0.9


def test_client_disconnect_cancels_the_upstream(gateway: Gateway, events: Path) -> None:
    before = events.read_text().count("cancelled")
    body = {"model": "fake", "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 200, "gap": 0.05}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=30) as resp:
        got: list[str] = []
        for line in resp.iter_lines():
            if line.startswith("data:"):
                got.append(line)
            if len(got) >= 3:
                break
    # The client went away after 3 chunks; the worker must see its stream cancelled.
    assert wait_for(lambda: events.read_text().count("cancelled") > before, timeout=10)
    # The slot was released: the next request goes through at once.
    assert chat(gateway).status_code == 200


def test_upstream_client_error_keeps_its_status(gateway: Gateway) -> None:
    resp = chat(gateway, fake={"status": 400})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "fake error 400"


def test_upstream_server_error_is_a_502(gateway: Gateway) -> None:
    resp = chat(gateway, fake={"status": 500})
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["type"] == "upstream_error"
    assert "fake error 500" in error["message"]


def test_crash_mid_stream_ends_with_an_error_event_then_recovers(
        gateway: Gateway, client: openai.OpenAI, events: Path) -> None:
    pids = started_pids(events)
    body = {"model": "fake", "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 5, "crash_after": 2}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=30) as resp:
        assert resp.status_code == 200
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert len(data) == 3
    last = json.loads(data[-1])
    assert last["error"]["type"] == "upstream_error"
    assert "mid-stream" in last["error"]["message"]
    # The official client raises on that final error event.
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(
            model="fake", messages=MESSAGES, stream=True,
            extra_body={"fake": {"tokens": 5, "crash_after": 1}}))
    # The worker is restarted and the next request succeeds.
    assert chat(gateway).status_code == 200
    assert len(started_pids(events)) >= len(pids) + 2


def test_worker_killed_between_requests(gateway: Gateway, events: Path) -> None:
    assert chat(gateway).status_code == 200
    pid = started_pids(events)[-1]
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    resp = chat(gateway)
    assert resp.status_code == 200, resp.text
    assert started_pids(events)[-1] != pid
    assert gateway.model("fake")["state"] == "ready"
