"""The audio duration cap (settings.max_audio_seconds, `--max-audio-seconds` of the worker
apps): a FLAC of hours of silence (about 1 MB on disk, GB once decoded) is refused with a 413
before it is decoded, so the worker's memory stays flat; audio under the cap is served.

The real built-in models answer, through a real gateway: whisper-tiny.en (speech) and
resemblyzer (diarization). The worker app's peak resident memory is read from /proc (VmHWM);
its process is found under the admin API card's `worker.pid` (the shim that supervises it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from modelhost.workers.apps.audio_input import (
    AudioTooLong,
    NoAudioStream,
    cap_argument,
    count_seconds,
    decode_capped,
    header_seconds,
    probe_seconds,
)
from tests.audio import (
    concat_wavs,
    flac_with_total_samples,
    have_espeak,
    have_sox,
    silence,
    silent_flac,
    speak,
    wav_duration,
)
from tests.conftest import Gateway, GatewayFactory

pytestmark = pytest.mark.skipif(not have_sox(), reason="needs sox (apt install sox)")

FIVE_HOURS = 5 * 3600
RATE = 16_000
MB = 1024 * 1024


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """5 h of silence three ways (an honest header, a header that does not say, a header that
    says 1 s), and 10 min of silence for the decoder's own tests."""
    tmp = tmp_path_factory.mktemp("audio")
    five = silent_flac(tmp / "five-hours.flac", FIVE_HOURS)
    ten = silent_flac(tmp / "ten-minutes.flac", 600)
    return {
        "five": five,
        "five_unknown": flac_with_total_samples(five, tmp / "five-unknown.flac", 0),
        "five_lying": flac_with_total_samples(five, tmp / "five-lying.flac", RATE),
        "ten": ten,
        "ten_unknown": flac_with_total_samples(ten, tmp / "ten-unknown.flac", 0),
        "ten_lying": flac_with_total_samples(ten, tmp / "ten-lying.flac", RATE),
    }


def test_five_hours_of_flac_is_small(files: dict[str, Path]) -> None:
    assert files["five"].stat().st_size < 5 * MB
    assert probe_seconds(files["five"]) == FIVE_HOURS
    assert probe_seconds(files["five_unknown"]) is None
    assert probe_seconds(files["five_lying"]) == 1.0


# --------------------------------------------------------------------------- the decoder


def test_header_refuses_before_decoding(files: dict[str, Path]) -> None:
    with pytest.raises(AudioTooLong) as caught:
        decode_capped(files["five"], 4 * 3600)
    assert caught.value.seconds == FIVE_HOURS
    assert caught.value.message == "audio of 18000 s exceeds the limit of 14400 s"


def test_no_header_counts_then_stops_at_the_cap(files: dict[str, Path]) -> None:
    with pytest.raises(AudioTooLong) as caught:
        decode_capped(files["ten_unknown"], 300)
    assert caught.value.seconds is None
    assert caught.value.message == "audio of more than 300 s exceeds the limit of 300 s"
    assert count_seconds(files["ten_unknown"], 3600) == pytest.approx(600, abs=0.5)
    audio = decode_capped(files["ten_unknown"], 601)
    assert audio.dtype == np.float32 and audio.shape == (600 * RATE,)


def test_a_lying_header_is_caught_while_decoding(files: dict[str, Path]) -> None:
    with pytest.raises(AudioTooLong, match="more than 300 s"):
        decode_capped(files["ten_lying"], 300)


def test_under_the_cap_or_without_one(files: dict[str, Path], tmp_path: Path) -> None:
    for cap in (601.0, math.inf, None):
        assert decode_capped(files["ten"], cap).shape == (600 * RATE,)
    wav = silence(tmp_path / "s.wav", 2.0)
    assert decode_capped(wav, 2.0).shape == (2 * RATE,)  # exactly the cap is fine
    with pytest.raises(AudioTooLong, match=r"audio of 2 s exceeds the limit of 1\.5 s"):
        decode_capped(wav, 1.5)


def test_samples_are_scaled_like_faster_whisper(tmp_path: Path) -> None:
    if not have_espeak():
        pytest.skip("needs espeak-ng")
    fw_audio = pytest.importorskip("faster_whisper.audio")

    wav = speak("One two three.", tmp_path / "a.wav")
    ours = decode_capped(wav, 60)
    theirs = fw_audio.decode_audio(str(wav))
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-6


def test_not_audio(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("hello " * 100)
    av = pytest.importorskip("av")
    # FFmpeg's own error, or no audio stream found: not AudioTooLong.
    with pytest.raises((av.FFmpegError, NoAudioStream)):
        decode_capped(text, 60)


@pytest.mark.parametrize(("text", "cap"), [
    ("14400", 14400.0), ("0.5", 0.5),
    *((none, math.inf) for none in ("0", "none", "inf", "INF")),
], ids=["seconds", "fraction", "0-is-none", "none", "inf", "INF"])
def test_cap_argument(text: str, cap: float) -> None:
    assert cap_argument(text) == cap


@pytest.mark.parametrize("text", ["-3", "nan"])
def test_cap_argument_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        cap_argument(text)


def test_header_seconds_prefers_the_stream() -> None:
    class Stream:
        duration: int | None = 32_000
        time_base: Any = 1 / RATE

    class Container:
        duration: int | None = 5_000_000

    assert header_seconds(Container(), Stream()) == 2.0
    Stream.duration = None
    assert header_seconds(Container(), Stream()) == 5.0
    Container.duration = None
    assert header_seconds(Container(), Stream()) is None


def test_a_file_without_audio(tmp_path: Path) -> None:
    subtitles = tmp_path / "a.srt"  # FFmpeg opens it: one subtitle stream, no audio
    subtitles.write_text("1\n00:00:01,000 --> 00:00:02,000\nHello\n\n")
    with pytest.raises(NoAudioStream):
        decode_capped(subtitles, 60)
    with pytest.raises(NoAudioStream):
        probe_seconds(subtitles)


# --------------------------------------------------------------------------- through a gateway


def worker_app_pid(gw: Gateway, model: str) -> int:
    """The pid of the model's worker app: the admin card's `worker.pid` is the supervising
    shim (modelhost.workers.shim), the app runs under it."""
    shim = psutil.Process(gw.admin_card(model)["worker"]["pid"])
    for proc in shim.children(recursive=True):
        argv = proc.cmdline()
        if "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("modelhost.workers.apps."):
            return proc.pid
    raise AssertionError(f"no worker app under pid {shim.pid}: {shim.cmdline()}")


def peak_rss(gw: Gateway, model: str) -> int:
    """The model's worker app's peak resident memory (VmHWM), in bytes."""
    pid = worker_app_pid(gw, model)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def post_audio(gw: Gateway, route: str, model: str, path: Path,
               **data: str) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(f"{gw.url}/v1/audio/{route}", timeout=300,
                          files={"file": (path.name, f)}, data={"model": model, **data})


def assert_too_long(resp: httpx.Response, words: str) -> None:
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    # The worker's status, message, param and code are passed on by the relay.
    assert error["code"] == "audio_too_long"
    assert error["param"] == "file"
    assert words in error["message"].lower(), error


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have_espeak():
        pytest.skip("needs espeak-ng")
    tmp = tmp_path_factory.mktemp("speech")
    return speak("The quick brown fox jumps over the lazy dog.", tmp / "fox.wav")


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    """The built-in models, the default cap (4 hours)."""
    return module_gateway_factory(include_builtin=True)


ROUTES = [("transcriptions", "whisper-tiny.en"), ("diarization", "resemblyzer")]


@pytest.mark.parametrize(("route", "model"), ROUTES)
def test_hours_of_silence_are_413_and_the_worker_memory_stays_flat(
        gateway: Gateway, files: dict[str, Path], speech_clip: Path, route: str,
        model: str) -> None:
    small = post_audio(gateway, route, model, speech_clip)
    assert small.status_code == 200, small.text
    if route == "transcriptions":
        assert "lazy" in small.json()["text"].lower()
    else:
        assert small.json()["duration"] == pytest.approx(wav_duration(speech_clip), abs=0.05)
    before = peak_rss(gateway, model)
    assert_too_long(post_audio(gateway, route, model, files["five"]),
                    "audio of 18000 s exceeds the limit of 14400 s")
    assert_too_long(post_audio(gateway, route, model, files["five_unknown"]),
                    "audio of more than 14400 s exceeds the limit of 14400 s")
    after = peak_rss(gateway, model)
    # Decoded, 5 h would be 1.1 GB of float32 samples (and more on the way).
    assert after - before < 40 * MB, (before, after)
    again = post_audio(gateway, route, model, speech_clip)  # the worker is still there
    assert again.status_code == 200, again.text


def test_diarized_transcript_of_hours_is_413(gateway: Gateway, files: dict[str, Path]) -> None:
    resp = post_audio(gateway, "transcriptions", "whisper-tiny.en", files["five"],
                      diarize="true")
    assert_too_long(resp, "exceeds the limit of 14400 s")


@pytest.fixture(scope="module")
def thirty_seconds(speech_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("long") / "thirty.wav"
    lead = 30.0 - wav_duration(speech_clip)
    concat_wavs([speech_clip], out, lead_seconds=lead)
    assert wav_duration(out) == pytest.approx(30.0, abs=0.01)
    return out


@pytest.mark.parametrize(("route", "model"), ROUTES)
def test_a_lower_cap_from_the_settings(gateway_factory: GatewayFactory, files: dict[str, Path],
                                       speech_clip: Path, thirty_seconds: Path, route: str,
                                       model: str) -> None:
    gw = gateway_factory(include_builtin=True, env={"MODELHOST_MAX_AUDIO_SECONDS": "20"})
    assert post_audio(gw, route, model, speech_clip).status_code == 200
    before = peak_rss(gw, model)
    assert_too_long(post_audio(gw, route, model, thirty_seconds),
                    "audio of 30 s exceeds the limit of 20 s")
    # A header that says 1 s over 5 hours of frames: decoding stops at 20 s.
    assert_too_long(post_audio(gw, route, model, files["five_lying"]),
                    "audio of more than 20 s exceeds the limit of 20 s")
    assert peak_rss(gw, model) - before < 40 * MB
