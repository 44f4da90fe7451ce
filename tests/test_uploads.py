"""Audio uploads through the gateway: relayed byte for byte, bounded (size, parts, header
bytes per part), spooled to disk, parsed off the event loop, and refused with clear 4xx errors
(a fake speech worker, a real process, answers)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import Gateway, GatewayFactory, fake_model, openai_client

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory([
        fake_model("speech", task="transcription", aliases=["whisper-1"]),
        fake_model("chat"),
    ], env={"MODELHOST_MAX_UPLOAD_BYTES": str(LIMIT)})


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
    card = gateway.admin_card("speech")
    assert card["usage"]["audio_seconds"] == 1.5


def test_official_client(gateway: Gateway) -> None:
    with openai_client(gateway) as client:
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


# --------------------------------------------------------------------------- multipart limits

BOUNDARY = b"bomb"


def _multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A body of (headers, content) parts, closed; headers without their final blank line."""
    body = b"".join(b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
                    for headers, content in parts)
    return body + b"--" + BOUNDARY + b"--\r\n"


def _field(name: str, value: bytes) -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"'.encode(), value


def _file(content: bytes, filename: bytes = b"a.wav") -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"', content


def _post_raw(gw: Gateway, body: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(gw.url + "/v1/audio/transcriptions", content=body, timeout=timeout,
                      headers={"Content-Type": "multipart/form-data; boundary=bomb"})


def _too_large(resp: httpx.Response, words: str) -> None:
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large"
    assert words in error["message"]


def test_parts_are_capped(gateway: Gateway) -> None:
    """64 parts (the default cap) pass; the 65th is a 413."""
    fields = [_field("model", b"speech"), _file(b"RIFF....")]
    fine = fields + [_field(f"extra{i}", b"1") for i in range(62)]
    assert _post_raw(gateway, _multipart(fine)).status_code == 200
    _too_large(_post_raw(gateway, _multipart([*fine, _field("one_more", b"1")])),
               "more than 64 parts")


def test_part_headers_are_capped(gateway: Gateway) -> None:
    """16 KiB of headers in one part (the default cap) pass, in one line or several; more,
    up to a 1 MiB header line, is a 413."""
    long_name = b"a" * 8000 + b".wav"
    headers, content = _file(b"RIFF....", long_name)
    two_lines = headers + b"\r\nX-Padding: " + b"p" * 7000
    ok = _multipart([_field("model", b"speech"), (two_lines, content)])
    assert _post_raw(gateway, ok).status_code == 200
    for size in (17 * 1024, 1 << 20):
        huge = _multipart([_field("model", b"speech"), _file(b"RIFF", b"a" * size)])
        _too_large(_post_raw(gateway, huge), "16384 bytes of headers")
    many_lines = b"\r\n".join([headers] + [b"X-H%d: " % i + b"v" * 1000 for i in range(20)])
    _too_large(_post_raw(gateway, _multipart([_field("model", b"speech"),
                                              (many_lines, content)])),
               "16384 bytes of headers")


def _health_while(gw: Gateway, send: Any) -> tuple[Any, list[float]]:
    """Run `send()` in a thread and ask for /health meanwhile (and at least 5 times): the
    answer of `send`, and how long each /health took."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(send()))
    took: list[float] = []
    with httpx.Client(timeout=10) as client:
        thread.start()
        while thread.is_alive() or len(took) < 5:
            began = time.monotonic()
            assert client.get(gw.url + "/health").status_code == 200
            took.append(time.monotonic() - began)
            time.sleep(0.02)
    thread.join()
    return result[0], took


def _bomb(size: int) -> bytes:
    """Hundreds of thousands of one-byte fields, `size` bytes in all."""
    part = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    return part * (size // len(part) - 1) + b"--" + BOUNDARY + b"--\r\n"


BIG = 25 * 1024 * 1024  # the default upload limit


def test_multipart_bombs_are_413_and_health_keeps_answering(
        gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    gw = gateway_factory([fake_model("speech", task="transcription")],
                         env={"TMPDIR": str(spool)})
    bomb = _bomb(BIG - 4096)
    assert bomb.count(b"--" + BOUNDARY + b"\r\n") > 400_000
    header_bomb = _multipart([_field("model", b"speech"), _file(b"RIFF", b"a" * (1 << 20))])
    for body, words in ((bomb, "more than 64 parts"), (header_bomb, "bytes of headers")):
        began = time.monotonic()
        resp, took = _health_while(gw, lambda body=body: _post_raw(gw, body))
        _too_large(resp, words)
        assert time.monotonic() - began < 30
        assert max(took) < 2, took
    assert list(spool.iterdir()) == []  # nothing spooled is left behind
    assert post(gw, files={"file": ("a.wav", b"RIFF....")},
                data={"model": "speech"}).status_code == 200


def test_a_bomb_parsed_in_full_does_not_stall_the_gateway(
        gateway_factory: GatewayFactory) -> None:
    """With the part cap lifted, the parser works through 25 MiB of tiny parts (seconds of
    CPU): it runs in a worker thread, and /health answers meanwhile."""
    gw = gateway_factory([fake_model("speech", task="transcription")],
                         env={"MODELHOST_MAX_MULTIPART_PARTS": "1000000"})
    resp, took = _health_while(gw, lambda: _post_raw(gw, _bomb(BIG - 4096), timeout=120))
    assert resp.status_code == 400, resp.text  # parsed to the end: it has no `file`
    assert resp.json()["error"]["param"] == "file"
    assert max(took) < 2, took
