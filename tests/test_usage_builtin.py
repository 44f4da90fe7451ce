"""Usage counted from the embedded models' own answers (issue 15): the embeddings worker's
`usage` and inputs, the speech worker's audio seconds, the llama.cpp chat model's `usage`
(and, for its streams, which carry none, the chunks of text it streamed), a diarized
transcript's two workers; each equal to what the answer reported. (Slow: one gateway with the
built-in models for the module.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.auth import key_id
from tests.audio import have_espeak, silence, speak
from tests.conftest import Gateway, GatewayFactory, wait_for

KEY = "sk-usage-builtin-3c5e7a9b1d2f4e6a"
CHAT_KEY = "sk-usage-builtin-chat-5a7c9e1b3d"
DIARIZE_KEY = "sk-usage-builtin-diarize-7e9a1c3b5d"
ADMIN = "sk-usage-builtin-admin-8b6d4f2a0c9e"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory(include_builtin=True, env={
        "OPENAI_API_KEYS": f"{KEY},{CHAT_KEY},{DIARIZE_KEY}", "MODELHOST_ADMIN_KEYS": ADMIN})


def counted(gw: Gateway, model: str, key: str = KEY) -> dict[str, Any] | None:
    resp = httpx.get(gw.url + "/api/admin/usage", params={"model": model}, timeout=10,
                     headers={"Authorization": f"Bearer {ADMIN}"})
    resp.raise_for_status()
    rows = [row for row in resp.json()["data"] if row["key_id"] == key_id(key)]
    return rows[0] if rows else None


def test_embeddings_usage_is_what_the_answers_reported(gateway: Gateway) -> None:
    prompt = 0
    for given in (["The cat sits on the mat.", "Quarterly revenue grew."], "One more."):
        resp = httpx.post(gateway.url + "/v1/embeddings", headers=HEADERS, timeout=180,
                          json={"model": "all-minilm-l6-v2", "input": given})
        assert resp.status_code == 200, resp.text
        prompt += resp.json()["usage"]["prompt_tokens"]
    assert prompt > 0
    expected = {"key_id": key_id(KEY), "model": "all-minilm-l6-v2", "requests": 2,
                "prompt_tokens": prompt, "completion_tokens": 0, "audio_seconds": 0.0,
                "embedding_inputs": 3}
    assert wait_for(lambda: counted(gateway, "all-minilm-l6-v2") == expected, timeout=10), \
        counted(gateway, "all-minilm-l6-v2")


def test_audio_seconds_are_what_the_worker_reported(gateway: Gateway, tmp_path: Path) -> None:
    wav = silence(tmp_path / "quiet.wav", 2.5)
    if have_espeak():
        wav = speak("Counting the seconds of this sentence.", tmp_path / "speech.wav")
    with wav.open("rb") as f:
        resp = httpx.post(gateway.url + "/v1/audio/transcriptions", headers=HEADERS,
                          timeout=300, data={"model": "whisper-tiny.en"},
                          files={"file": ("a.wav", f, "audio/wav")})
    assert resp.status_code == 200, resp.text
    # What the worker reported (X-Audio-Seconds), as the model's own usage sums it: this is
    # the module's only transcription.
    reported = gateway.admin_card("whisper-tiny.en", ADMIN)["usage"]["audio_seconds"]
    assert reported > 0.5

    def matches() -> bool:
        row = counted(gateway, "whisper-tiny.en")
        return row is not None and row["requests"] == 1 and \
            abs(row["audio_seconds"] - reported) < 1e-6
    assert wait_for(matches, timeout=10), counted(gateway, "whisper-tiny.en")


def test_chat_usage_is_what_llama_cpp_reported(gateway: Gateway) -> None:
    """Non-streamed: the answers' `usage`. Streamed: llama-cpp-python's server sends no usage
    (it ignores `stream_options`), so a stream counts the chunks of text it carried (one
    token each, as it streams) and no prompt tokens; the client gets no usage chunk."""
    headers = {"Authorization": f"Bearer {CHAT_KEY}"}
    body = {"model": "smollm2-135m", "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "Name three colours."}]}
    prompt = completion = 0
    for _ in range(2):
        resp = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, json=body,
                          timeout=300)
        assert resp.status_code == 200, resp.text
        prompt += resp.json()["usage"]["prompt_tokens"]
        completion += resp.json()["usage"]["completion_tokens"]
    assert prompt > 0 and completion > 0
    pieces = 0
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers=headers,
                      json={**body, "stream": True}, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "usage" not in chunk or chunk["usage"] is None, chunk
            if any(choice.get("delta", {}).get("content") for choice in chunk["choices"]):
                pieces += 1
    assert pieces > 0
    expected = {"key_id": key_id(CHAT_KEY), "model": "smollm2-135m", "requests": 3,
                "prompt_tokens": prompt, "completion_tokens": completion + pieces,
                "audio_seconds": 0.0, "embedding_inputs": 0}
    assert wait_for(lambda: counted(gateway, "smollm2-135m", CHAT_KEY) == expected,
                    timeout=10), counted(gateway, "smollm2-135m", CHAT_KEY)


def test_a_diarized_transcript_is_counted_for_both_workers(gateway: Gateway,
                                                          tmp_path: Path) -> None:
    wav = silence(tmp_path / "quiet.wav", 3.0)
    if have_espeak():
        wav = speak("Two workers hear this sentence and both are counted.",
                    tmp_path / "speech.wav")
    with wav.open("rb") as f:
        resp = httpx.post(gateway.url + "/v1/audio/transcriptions", timeout=300,
                          headers={"Authorization": f"Bearer {DIARIZE_KEY}"},
                          data={"model": "whisper-tiny.en", "diarize": "true"},
                          files={"file": ("a.wav", f, "audio/wav")})
    assert resp.status_code == 200, resp.text
    for model in ("whisper-tiny.en", "resemblyzer"):
        def matches(model: str = model) -> bool:
            row = counted(gateway, model, DIARIZE_KEY)
            return row is not None and row["requests"] == 1 and row["audio_seconds"] > 1.0
        assert wait_for(matches, timeout=10), (model, counted(gateway, model, DIARIZE_KEY))
