"""Audio uploads through the gateway: relayed byte for byte, bounded, spooled to disk, and
refused with clear 4xx errors (a fake speech worker, a real process, answers)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from tests.conftest import Gateway, fake_model

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("gw"), [
        fake_model("speech", task="transcription", aliases=["whisper-1"]),
        fake_model("chat"),
    ], env={"MODELHOST_MAX_UPLOAD_BYTES": str(LIMIT)})
    yield gw
    gw.stop()


Files = dict[str, tuple[str, bytes] | tuple[str, bytes, str]]


def post(gw: Gateway, files: Files | None = None,
         data: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(gw.url + "/v1/audio/transcriptions", files=files, data=data, timeout=60)


def test_upload_is_relayed_byte_for_byte(gateway: Gateway) -> None:
    audio = os.urandom(300_000)
    request = httpx.Request("POST", gateway.url + "/v1/audio/transcriptions",
                            files={"file": ("a.wav", audio, "audio/wav")},
                            data={"model": "whisper-1", "response_format": "json"})
    sent = request.read()
    with httpx.Client(timeout=60) as client:
        resp = client.send(request)
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    assert echo["sha256"] == hashlib.sha256(sent).hexdigest()
    assert echo["content_type"] == request.headers["content-type"]
    card = httpx.get(gateway.url + "/api/admin/models/speech").json()
    assert card["usage"]["audio_seconds"] == 1.5


def test_official_client(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    result = client.audio.transcriptions.create(model="speech",
                                                file=("a.wav", io.BytesIO(b"RIFF....")))
    assert result.text == "fake transcript"


@pytest.mark.parametrize(("files", "data", "param"), [
    (None, {"model": "speech"}, "file"),
    ({"file": ("a.wav", b"", "audio/wav")}, {"model": "speech"}, "file"),
    ({"file": ("a.wav", b"x", "audio/wav")}, {}, "model"),
    ({"file": ("a.wav", b"x", "audio/wav")}, {"model": "chat"}, "model"),
    ({"file": ("a.wav", b"x", "audio/wav")}, {"model": "speech", "response_format": "mp3"},
     "response_format"),
])
def test_bad_uploads_are_400(gateway: Gateway, files: Files | None,
                             data: dict[str, str], param: str) -> None:
    resp = post(gateway, files=files or {"other": ("x", b"1")}, data=data)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_not_multipart_is_400(gateway: Gateway) -> None:
    resp = httpx.post(gateway.url + "/v1/audio/transcriptions", json={"model": "speech"})
    assert resp.status_code == 400
    assert "multipart" in resp.json()["error"]["message"]


def test_unknown_model_is_404(gateway: Gateway) -> None:
    resp = post(gateway, files={"file": ("a.wav", b"x")}, data={"model": "nope"})
    assert resp.status_code == 404


def test_oversized_upload_is_413_with_memory_flat(gateway: Gateway) -> None:
    gateway_process = psutil.Process(gateway.proc.pid)
    before = gateway_process.memory_info().rss
    declared = post(gateway, files={"file": ("a.wav", b"x" * (LIMIT + 1))},
                    data={"model": "speech"})
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nspeech\r\n'
               b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n')
        for _ in range(200):  # 200 MiB offered
            yield b"\0" * (1024 * 1024)

    try:
        resp = httpx.post(gateway.url + "/v1/audio/transcriptions", content=chunks(),
                          headers={"Content-Type": "multipart/form-data; boundary=b"},
                          timeout=60)
        assert resp.status_code == 413
    except httpx.HTTPError:
        pass  # the gateway may close the connection once it has answered 413
    after = gateway_process.memory_info().rss
    assert after - before < 30 * 1024 * 1024
    assert post(gateway, files={"file": ("a.wav", b"ok")}, data={"model": "speech"}
                ).status_code == 200
