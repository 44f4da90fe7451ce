"""The smoke request a rollout sends to a version of a model: does it answer, and how fast.

One small request per task, the cheapest that exercises the model end to end: a one-token
chat or completion, the embedding of one short input, the transcription (or diarization) of
a second of a quiet tone made here (`tone_wav`). It goes through the version's own admission,
like any request (never more requests at a worker than its `max_concurrency`), and through
the gateway's HTTP client to the version's worker, never through the served name: the
version probed may not be the one served yet.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path

from modelhost.config import ModelSpec, Task, UrlSource
from modelhost.registry.model import Model
from modelhost.upstream import Body, Multipart, UpstreamClient

# A smoke answer is small; a larger one is read no further (its status stands).
ANSWER_BYTES = 1024 * 1024
TONE_SECONDS = 1.0
TONE_RATE = 16000


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    seconds: float
    error: str | None = None


class Probe:
    """Smoke requests through `client`, each within `timeout` seconds (queueing included)."""

    def __init__(self, client: UpstreamClient, timeout: float, folder: Path | None = None
                 ) -> None:
        self.client = client
        self.timeout = timeout
        self.folder = folder

    async def run(self, model: Model, wait: bool = True) -> ProbeResult | None:
        """The smoke request of `model`'s task, answered 2xx within the timeout. `wait`:
        queue for a slot like a request; else None at once when no slot is free."""
        started = time.perf_counter()
        if wait:
            try:
                await asyncio.wait_for(model.admission.acquire(), self.timeout)
            except Exception as exc:  # the queue is full, or no slot in time
                return ProbeResult(False, time.perf_counter() - started,
                                   f"no slot for the probe: {exc or type(exc).__name__}")
        elif not model.admission.try_acquire():
            return None
        try:
            left = max(self.timeout - (time.perf_counter() - started), 0.1)
            t0 = time.perf_counter()
            try:
                error = await asyncio.wait_for(self._send(model), left)
            except TimeoutError:
                error = f"no answer within {self.timeout:g} s"
            except OSError as exc:
                error = f"worker unreachable: {exc or type(exc).__name__}"
            return ProbeResult(error is None, time.perf_counter() - t0, error)
        finally:
            model.release()

    async def _send(self, model: Model) -> str | None:
        """Send the smoke request; None when it was answered well, else what went wrong."""
        base = model.ready_upstream()
        if base is None:
            return f"the worker is not ready ({model.state})"
        path, body, headers = smoke_request(model.spec, self.folder)
        try:
            resp = await self.client.request(base, "POST", path, headers, body,
                                             connect_to=model.connect_to)
            try:
                data = await resp.read(ANSWER_BYTES)
            except OSError as exc:
                return f"{path} answer broken: {exc or type(exc).__name__}"
        finally:
            if isinstance(body, Multipart) and body.file_path is not None:
                body.file_path.unlink(missing_ok=True)
        if resp.status >= 400:
            return f"{path} answered {resp.status}: {_message(data)}"
        try:
            json.loads(data)
        except ValueError:
            return f"{path} answered {resp.status} without a JSON body"
        return None


def smoke_request(spec: ModelSpec, folder: Path | None = None
                  ) -> tuple[str, Body, dict[str, str]]:
    """(worker path, body, headers) of the smoke request of `spec`'s task."""
    source = spec.source if isinstance(spec.source, UrlSource) else None
    name = source.model if source is not None and source.model else spec.id
    headers = {"Content-Type": "application/json"}
    if source is not None and source.api_key:
        headers["Authorization"] = f"Bearer {source.api_key}"
    payload: dict[str, object]
    if spec.task is Task.chat:
        payload = {"model": name, "max_tokens": 1,
                   "messages": [{"role": "user", "content": "Say OK."}]}
        return "/chat/completions", json.dumps(payload).encode(), headers
    if spec.task is Task.completion:
        payload = {"model": name, "prompt": "Hello", "max_tokens": 1}
        return "/completions", json.dumps(payload).encode(), headers
    if spec.task is Task.embedding:
        return "/embeddings", json.dumps({"model": name, "input": "ping"}).encode(), headers
    form = Multipart(file_path=tone_wav(folder), filename="probe.wav", file_type="audio/wav")
    form.add("model", name)
    headers["Content-Type"] = form.content_type
    path = "/audio/diarization" if spec.task is Task.diarization else "/audio/transcriptions"
    return path, form, headers


def tone_wav(folder: Path | None = None) -> Path:
    """A second of a quiet 440 Hz tone, 16 kHz mono 16-bit, in a temporary file (the caller
    deletes it)."""
    frames = b"".join(
        struct.pack("<h", int(800 * math.sin(2 * math.pi * 440 * i / TONE_RATE)))
        for i in range(int(TONE_RATE * TONE_SECONDS)))
    with tempfile.NamedTemporaryFile(suffix=".wav", dir=folder, delete=False) as out:
        with wave.open(out, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(TONE_RATE)
            wav.writeframes(frames)
        return Path(out.name)


def _message(data: bytes) -> str:
    """An error answer's message (OpenAI's envelope), else its first bytes."""
    try:
        error = json.loads(data)["error"]
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, KeyError, TypeError):
        return data[:300].decode("utf-8", "replace")
