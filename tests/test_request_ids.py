"""X-Request-ID and Server-Timing on the relayed routes, on the wire path and the ASGI path.

A client's sane X-Request-ID is used (returned, and passed to the worker); anything else (too
long, odd characters, none) gets a new id; every answer, errors included, carries it.
Server-Timing says what the gateway and the worker took."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, fake_model, gateways

TIMING = re.compile(r"gateway;dur=(\d+\.\d{3}), worker;dur=(\d+\.\d{3})")
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", params=["wire", "asgi"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Gateway, Path]]:
    folder = tmp_path_factory.mktemp(request.param)
    events = folder / "events"
    with gateways(folder) as make:
        yield make([fake_model("fake", events),
                    fake_model("speech", task="transcription")], env={
            "MODELHOST_ACCESS_LOG": "true" if request.param == "asgi" else "false"}), events


def chat(gw: Gateway, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers or {}, timeout=30,
                      json={"model": "fake", "messages": MESSAGES, **body})


def worker_saw(events: Path) -> str:
    return [line for line in events.read_text().splitlines()
            if line.startswith("request-id ")][-1].removeprefix("request-id ")


def test_a_clients_id_is_returned_and_passed_to_the_worker(
        gateway: tuple[Gateway, Path]) -> None:
    gw, events = gateway
    given = "0f8e2d4c-1a2b-4c3d-9e8f-123456789abc"
    for _ in range(2):  # the first loads the model (awaited), the next is served at once
        resp = chat(gw, {"X-Request-ID": given})
        assert resp.status_code == 200
        assert resp.headers["x-request-id"] == given
        assert worker_saw(events) == given
        timing = TIMING.fullmatch(resp.headers["server-timing"])
        assert timing is not None, resp.headers["server-timing"]
        assert float(timing[1]) >= 0 and float(timing[2]) > 0


def test_a_clients_id_that_is_no_uuid_reaches_the_worker_as_its_uuid(
        gateway: tuple[Gateway, Path]) -> None:
    """Workers get UUIDs (llama.cpp's server refuses any other X-Request-ID), the same one for
    the same client id."""
    gw, events = gateway
    resp = chat(gw, {"X-Request-ID": "client-42:a.b_c"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "client-42:a.b_c"
    sent = worker_saw(events)
    assert str(uuid.UUID(sent)) == sent
    assert chat(gw, {"X-Request-ID": "client-42:a.b_c"}).status_code == 200
    assert worker_saw(events) == sent


@pytest.mark.parametrize("given", ["x" * 129, "bad id", "a\\b", "é", ""],
                         ids=["too-long", "space", "backslash", "non-ascii", "empty"])
def test_an_odd_id_is_replaced(gateway: tuple[Gateway, Path], given: str) -> None:
    gw, events = gateway
    resp = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      headers=[(b"X-Request-ID", given.encode())],
                      json={"model": "fake", "messages": MESSAGES})
    assert resp.status_code == 200
    made = resp.headers["x-request-id"]
    assert made != given and str(uuid.UUID(made)) == made  # made ids are UUIDs
    assert worker_saw(events) == made


def test_ids_are_made_unique(gateway: tuple[Gateway, Path]) -> None:
    gw, _ = gateway
    ids = {chat(gw).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


def test_errors_and_streams_carry_the_id(gateway: tuple[Gateway, Path]) -> None:
    gw, _ = gateway
    unknown = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                         headers={"X-Request-ID": "e1"},
                         json={"model": "nope", "messages": MESSAGES})
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "e1"
    refused = chat(gw, {"X-Request-ID": "e2"}, fake={"status": 400})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "e2"
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30,
                      headers={"X-Request-ID": "s1"},
                      json={"model": "fake", "messages": MESSAGES, "stream": True}) as stream:
        assert stream.status_code == 200
        assert stream.headers["x-request-id"] == "s1"
        assert "gateway;dur=" in stream.headers["server-timing"]
        assert b"[DONE]" in stream.read()


def test_audio_answers_carry_the_id(gateway: tuple[Gateway, Path]) -> None:
    gw, _ = gateway
    files = {"file": ("a.wav", b"RIFF" + b"\0" * 1000, "audio/wav")}
    resp = httpx.post(gw.url + "/v1/audio/transcriptions", files=files, timeout=30,
                      data={"model": "speech"}, headers={"X-Request-ID": "audio-1"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "audio-1"
    assert TIMING.fullmatch(resp.headers["server-timing"])
    unknown = httpx.post(gw.url + "/v1/audio/transcriptions", files=files, timeout=30,
                         data={"model": "speech", "response_format": "nope"},
                         headers={"X-Request-ID": "audio-2"})
    assert unknown.status_code == 400
