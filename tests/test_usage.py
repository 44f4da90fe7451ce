"""Usage by key and model (issue 15): counted per request from what the answers report,
flushed to the state database once a second, read back from /api/admin/usage and
`modelhost usage`; against a real gateway and fake workers, on the wire path and the ASGI
path; a gateway killed with SIGKILL keeps what it had flushed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.auth import key_id
from modelhost.db.store import Store
from modelhost.persistence import Persistence
from modelhost.serving.stream import UsageScan, answer_tokens
from modelhost.usage import Ledger
from tests.conftest import Gateway, GatewayFactory, fake_model, wait_for
from tests.test_db import store, url  # noqa: F401 (fixtures: both backends)

KEY_A = "sk-usage-a-5b2c7d9e1f3a4b6c"
KEY_B = "sk-usage-b-8e1d4c7b2a5f9e3d"
ADMIN = "sk-usage-admin-0f9e8d7c6b5a4938"
ENV = {"OPENAI_API_KEYS": f"{KEY_A},{KEY_B}", "MODELHOST_ADMIN_KEYS": ADMIN}
HI = [{"role": "user", "content": "hi"}]
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "audio_seconds",
            "embedding_inputs")


def models(tmp: Path) -> list[dict[str, Any]]:
    return [fake_model("chat", tmp / "chat.events"),
            fake_model("emb", None, task="embedding"),
            fake_model("stt", None, task="transcription")]


def post(gw: Gateway, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30)


def stream(gw: Gateway, key: str, body: dict[str, Any]) -> bytes:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200
        return b"".join(resp.iter_raw())


def usage(gw: Gateway, **params: str) -> httpx.Response:
    return httpx.get(gw.url + "/api/admin/usage", params=params, timeout=10,
                     headers={"Authorization": f"Bearer {ADMIN}"})


def table(gw: Gateway, **params: str) -> dict[tuple[str, str], dict[str, Any]]:
    resp = usage(gw, **params)
    assert resp.status_code == 200, resp.text
    return {(row["key_id"], row["model"]): {c: row[c] for c in COUNTERS}
            for row in resp.json()["data"]}


def row(requests: int = 0, prompt: int = 0, completion: int = 0, audio: float = 0.0,
        inputs: int = 0) -> dict[str, Any]:
    return dict(zip(COUNTERS, (requests, prompt, completion, audio, inputs), strict=True))


def use_everything(gw: Gateway) -> dict[tuple[str, str], dict[str, Any]]:
    """Requests of both keys on every route; what they should be counted as."""
    a, b = key_id(KEY_A), key_id(KEY_B)
    for tokens in (3, 5):
        resp = post(gw, KEY_A, "/v1/chat/completions",
                    {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                     "fake": {"tokens": tokens}})
        assert resp.status_code == 200, resp.text
    # A worker's error is not usage.
    resp = post(gw, KEY_A, "/v1/chat/completions",
                {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                 "fake": {"status": 400}})
    assert resp.status_code == 400
    assert post(gw, KEY_B, "/v1/completions", {"model": "chat", "prompt": "x"}
                ).status_code == 200
    # A second Authorization header is not whose usage it is: the first, that the gate
    # judged, is.
    resp = httpx.post(gw.url + "/v1/completions", json={"model": "chat", "prompt": "x"},
                      headers=[("Authorization", f"Bearer {KEY_B}"),
                               ("Authorization", "Bearer sk-someone-else")], timeout=30)
    assert resp.status_code == 200, resp.text
    # A stream whose client did not ask for usage: counted, and no usage chunk for it.
    raw = stream(gw, KEY_A, {"model": "chat", "messages": HI, "stream": True,
                             "fake": {"tokens": 4}})
    assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(b"data: ") == 6  # four words, the finish, [DONE]
    # One that asked gets it, whole.
    raw = stream(gw, KEY_B, {"model": "chat", "messages": HI, "stream": True,
                             "stream_options": {"include_usage": True}, "fake": {"tokens": 2}})
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    resp = post(gw, KEY_B, "/v1/embeddings", {"model": "emb", "input": ["a", "b", "c"]})
    assert resp.status_code == 200, resp.text
    assert post(gw, KEY_B, "/v1/embeddings", {"model": "emb", "input": "one"}
                ).status_code == 200
    # An answer over 256 KiB is relayed as it arrives: its usage is read from its end.
    resp = post(gw, KEY_B, "/v1/embeddings", {"model": "emb", "input": ["a", "b", "c", "d"],
                                               "dimensions": 20_000,
                                               "fake": {"no_header": True}})
    assert resp.status_code == 200 and len(resp.content) > 300_000
    assert resp.json()["usage"]["prompt_tokens"] == 8
    resp = httpx.post(gw.url + "/v1/audio/transcriptions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY_A}"},
                      data={"model": "stt"}, files={"file": ("a.wav", b"RIFF0000", "audio/wav")})
    assert resp.status_code == 200, resp.text
    return {(a, "chat"): row(3, 3, 12),
            (b, "chat"): row(3, 3, 4),
            (b, "emb"): row(3, 16, 0, 0, 8),
            (a, "stt"): row(1, 0, 0, 1.5)}


@pytest.mark.parametrize("path", ["wire", "asgi"])
def test_usage_by_key_and_model(gateway_factory: GatewayFactory, tmp_path: Path,
                                path: str) -> None:
    env = {**ENV, "MODELHOST_ACCESS_LOG": "true" if path == "asgi" else "false"}
    gw = gateway_factory(models(tmp_path), env=env)
    expected = use_everything(gw)
    assert wait_for(lambda: table(gw) == expected, timeout=10), table(gw)
    # The worker was asked for the usage chunk the first client did not ask for.
    asked = [line for line in (tmp_path / "chat.events").read_text().splitlines()
             if line.startswith("stream_options ")]
    assert asked.count('stream_options {"include_usage": true}') == 2

    by_model = usage(gw, group_by="model").json()["data"]
    assert {r["model"]: r["requests"] for r in by_model} == {"chat": 6, "emb": 3, "stt": 1}
    assert "key_id" not in by_model[0]
    daily = usage(gw, group_by="day").json()["data"]
    # (One row, or two when the test ran across midnight or an hour's end.)
    assert sum(r["requests"] for r in daily) == 10 and 1 <= len(daily) <= 2
    assert all(r["start"].endswith("T00:00:00Z") for r in daily)
    hourly = usage(gw, group_by="key,hour", key=key_id(KEY_B)).json()["data"]
    assert {r["key_id"] for r in hourly} == {key_id(KEY_B)} and 1 <= len(hourly) <= 2
    assert sum(r["requests"] for r in hourly) == 6
    assert all(r["start"].endswith(":00:00Z") for r in hourly)
    assert usage(gw, since="2999-01-01").json()["data"] == []
    assert usage(gw, until="2000-01-01T00:00:00Z").json()["data"] == []
    assert table(gw, model="stt") == {(key_id(KEY_A), "stt"): row(1, 0, 0, 1.5)}

    # The keys themselves are nowhere in the database.
    data = tmp_path / "gw0" / "data"
    for file in data.rglob("modelhost.db*"):
        content = file.read_bytes()
        assert KEY_A.encode() not in content and KEY_B.encode() not in content
    assert key_id(KEY_A).encode() in b"".join(f.read_bytes() for f in data.rglob("modelhost.db*"))


def test_usage_refuses_bad_queries_and_other_keys(gateway_factory: GatewayFactory,
                                                  tmp_path: Path) -> None:
    gw = gateway_factory([], env=ENV)
    for params in ({"group_by": "key,secret"}, {"group_by": "hour,day"},
                   {"since": "yesterday"}, {"until": "2026-13-01"}):
        resp = usage(gw, **params)
        assert resp.status_code == 400, params
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] in params
    resp = httpx.get(gw.url + "/api/admin/usage", timeout=10,
                     headers={"Authorization": f"Bearer {KEY_A}"})
    assert resp.status_code == 403
    assert httpx.get(gw.url + "/api/admin/usage", timeout=10).status_code == 401
    assert usage(gw).json() == {"object": "list", "group_by": ["key", "model"], "data": []}


def test_counts_survive_kill_9_and_restart(gateway_factory: GatewayFactory,
                                           tmp_path: Path) -> None:
    env = {**ENV, "MODELHOST_DATA_DIR": str(tmp_path / "shared")}
    gw = gateway_factory(models(tmp_path), env=env)
    expected = use_everything(gw)
    assert wait_for(lambda: table(gw) == expected, timeout=10), table(gw)
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    again = gateway_factory(models(tmp_path), env=env)
    assert table(again) == expected
    # Counting goes on from there; a graceful stop flushes what is left.
    assert post(again, KEY_A, "/v1/completions", {"model": "chat", "prompt": "x"}
                ).status_code == 200
    again.stop()
    third = gateway_factory(models(tmp_path), env=env)
    expected[(key_id(KEY_A), "chat")] = row(4, 4, 13)
    assert table(third) == expected


def test_cli(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory([fake_model("chat")], env=ENV)
    assert post(gw, KEY_A, "/v1/completions", {"model": "chat", "prompt": "x"}
                ).status_code == 200
    assert wait_for(lambda: bool(usage(gw).json()["data"]), timeout=10)
    env = {**os.environ, "MODELHOST_ADMIN_KEY": ADMIN}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "modelhost", "usage", "--url", gw.url,
                               *args], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    data = json.loads(cli("--json", "--since", "2d"))
    assert data == [{"key_id": key_id(KEY_A), "model": "chat", **row(1, 1, 1)}]
    text = cli("--group-by", "model")
    assert text.splitlines()[0].split() == ["MODEL", "REQUESTS", "PROMPT", "COMPLETION",
                                            "AUDIO_S", "EMBED_INPUTS"]
    assert text.splitlines()[1].split() == ["chat", "1", "1", "1", "0.0", "0"]
    done = subprocess.run([sys.executable, "-m", "modelhost", "usage", "--url", gw.url,
                           "--group-by", "nonsense"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "group_by" in done.stderr


# -- without a gateway ----------------------------------------------------------------------------


def test_answer_tokens_reads_only_the_usage_object() -> None:
    body = json.dumps({"data": [{"embedding": [0.1] * 1000}], "model": "m",
                       "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                 "prompt_tokens_details": {"cached_tokens": 1}}}).encode()
    assert answer_tokens(body) == (7, 3)
    assert answer_tokens(b'{"usage": {"prompt_tokens": 2}}') == (2, 0)
    assert answer_tokens(b'{"x": 1}', 5) == (5, 0)
    for bad in (b'{"usage": null}', b'{"usage": {"prompt_tokens": -1, "completion_tokens":'
                b' "9"}}', b'{"usage": {"prompt_tokens": 1e99}}', b'"usage"', b'{"usage": {'):
        assert answer_tokens(bad, 4) == (4, 0)


@pytest.mark.parametrize("drop", [True, False])
def test_stream_scan_finds_split_usage_and_drops_only_it(drop: bool) -> None:
    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    word = event({"choices": [{"delta": {"content": 'say "usage": {"prompt_tokens": 99}'}}]})
    last = event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
    whole = word + word + last + b"data: [DONE]\n\n"
    for step in (1, 2, 5, 13, 64, len(whole)):
        scan = UsageScan(drop)
        out = b"".join(scan.feed(whole[i:i + step]) for i in range(0, len(whole), step))
        out += scan.rest()
        assert out == (whole.replace(last, b"") if drop else whole)
        assert (scan.prompt, scan.completion) == (5, 7)
    # A stream cut inside an event gives what it had; nothing is held past an event's end.
    scan = UsageScan(drop)
    assert scan.feed(word + b"data: {") == word
    assert scan.rest() == b"data: {"


def test_a_stream_without_usage_counts_its_pieces_of_text() -> None:
    """llama-cpp-python's server streams one token an event and no usage: the scan counts
    the events that carried text (either JSON spacing; an empty delta is none), split as
    the chunks come; a usage chunk, when one comes, is what counts instead."""
    events = [b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n',
              b'data: {"choices": [{"delta": {"content": ""}}]}\n\n',
              b'data: {"choices": [{"delta": {"content": "Red"}}]}\n\n',
              b'data: {"choices":[{"delta":{"content":", blue"}}]}\n\n',
              b'data: {"choices": [{"text": " green", "index": 0}]}\n\n',
              b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n',
              b"data: [DONE]\n\n"]
    whole = b"".join(events)
    for step in (1, 7, 40, len(whole)):
        scan = UsageScan(True)
        out = b"".join(scan.feed(whole[i:i + step]) for i in range(0, len(whole), step))
        assert out + scan.rest() == whole
        assert (scan.pieces, scan.completion) == (3, 0)


def test_a_stream_without_event_boundaries_is_not_piled_up() -> None:
    """A broken or hostile server's 64 MiB with no boundary: passed on, never held past
    MAX_HELD (the stream's back-pressure holds, the gateway's memory stays flat)."""
    scan = UsageScan(True)
    piece = b"x" * 65536
    passed = 0
    for _ in range(1024):
        passed += len(scan.feed(piece))
        assert len(scan._held) <= UsageScan.MAX_HELD
    assert passed + len(scan.rest()) == 1024 * len(piece)


def test_a_failed_write_is_kept_for_the_next(tmp_path: Path) -> None:
    asyncio.run(failed_write(tmp_path))


async def failed_write(tmp_path: Path) -> None:
    persistence = Persistence(f"sqlite:///{tmp_path / 'state.db'}")
    opened = await persistence.open()
    try:
        ledger = Ledger(lambda raw: "key-x", persistence)
        ledger.add("key-x", "m", 2, 3, 0.5, 1)
        original = opened.add_usage

        def full(counts: Any) -> int:
            raise OSError("disk full")

        opened.add_usage = full  # type: ignore[method-assign]
        ledger.flush()
        await persistence.now(lambda s: None)
        await asyncio.sleep(0.05)  # the counts come back to the ledger
        opened.add_usage = original  # type: ignore[method-assign]
        ledger.add("key-x", "m", 1, 1)
        await ledger.stop()
        rows = await persistence.now(lambda s: s.usage_sums())
        assert [r.as_dict() for r in rows] == [{"key_id": "key-x", "model": "m", "requests": 2,
                                                "prompt_tokens": 3, "completion_tokens": 4,
                                                "audio_seconds": 0.5, "embedding_inputs": 1}]
    finally:
        await persistence.close()


def test_store_adds_up_and_groups(store: Store) -> None:  # noqa: F811
    hour = 1_796_522_400 // 3600  # 2026-12-06T02:00:00Z
    store.add_usage({("key-a", "m", hour): [2, 10, 20, 1.5, 0],
                     ("key-b", "m", hour + 1): [1, 1, 1, 0.0, 3]})
    store.add_usage({("key-a", "m", hour): [1, 1, 1, 0.5, 0]})  # added to, not replaced
    rows = [r.as_dict() for r in store.usage_sums()]
    assert rows == [
        {"key_id": "key-a", "model": "m", **row(3, 11, 21, 2.0, 0)},
        {"key_id": "key-b", "model": "m", **row(1, 1, 1, 0.0, 3)}]
    by_hour = [r.as_dict() for r in store.usage_sums(group_by=["hour"])]
    assert [r["start"] for r in by_hour] == ["2026-12-06T02:00:00Z", "2026-12-06T03:00:00Z"]
    since = datetime(2026, 12, 6, 3, tzinfo=UTC)
    assert [r.as_dict() for r in store.usage_sums(since=since, group_by=["day"])] == [
        {"start": "2026-12-06T00:00:00Z", **row(1, 1, 1, 0.0, 3)}]
    assert store.usage_sums(key="key-c") == []
    assert [r.as_dict() for r in store.usage_sums(group_by=[])] == [row(4, 12, 22, 2.0, 3)]
    assert store.usage_sums(key="key-c", group_by=[]) == []
    with pytest.raises(ValueError, match="group_by"):
        store.usage_sums(group_by=["hour", "day"])


def test_a_stream_body_with_a_byte_order_mark_is_reencoded(gateway_factory: GatewayFactory,
                                                            tmp_path: Path) -> None:
    gw = gateway_factory(models(tmp_path), env=ENV)
    body = b"\xef\xbb\xbf" + json.dumps({"model": "chat", "messages": HI,
                                        "stream": True}).encode()
    with httpx.stream("POST", gw.url + "/v1/chat/completions", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY_A}",
                               "Content-Type": "application/json"}) as resp:
        assert resp.status_code == 200
        raw = b"".join(resp.iter_raw())
    assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
    assert wait_for(lambda: table(gw) == {(key_id(KEY_A), "chat"): row(1, 1, 3)}, timeout=10)


@pytest.mark.parametrize("given", [
    {"model": "m", "stream": True},
    {"model": "m", "stream": True, "stream_options": None},
    {"model": "m", "stream": True, "stream_options": {"include_usage": False}},
], ids=["absent", "null", "false"])
def test_the_worker_is_asked_for_a_streams_usage_once(given: dict[str, Any]) -> None:
    """Whatever the client wrote, the worker gets one `stream_options` asking for usage (a
    prepended member next to the client's `null` would be a duplicate key, the last one
    winning), and the usage chunk is dropped for the client."""
    from modelhost.serving.call import DROP_USAGE
    from modelhost.serving.endpoint import _stream_usage

    raw = json.dumps(given).encode()
    scan, body = _stream_usage(dict(given), raw)
    assert scan == DROP_USAGE
    pairs = json.loads(body, object_pairs_hook=lambda items: items)
    assert [k for k, _ in pairs].count("stream_options") == 1
    assert json.loads(body)["stream_options"]["include_usage"] is True
