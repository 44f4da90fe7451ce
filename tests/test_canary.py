"""NVIDIA Canary in the speech worker, as far as it can be tested without NeMo or a GPU: the
engine choice, the worker's clean exit without NeMo (a real process), model resolution, the
prompt NeMo is given, the conversion of NeMo-shaped hypotheses into segments and words and
their rendering (srt, vtt, verbose_json), chunking, and the language check (400).

`CanaryEngine` itself runs here around a stand-in with NeMo's `transcribe` signature: what the
real NeMo call returns is NOT exercised here. The `real` tests at the end do, through a worker
process on the real model; they run only when asked for, on a machine with NeMo and an NVIDIA
GPU (see the command there).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai.types.audio import TranscriptionVerbose, TranslationVerbose
from starlette.testclient import TestClient

from modelhost.errors import InvalidRequest
from modelhost.workers.apps.audio_input import decode_capped
from modelhost.workers.apps.speech.app import build_app, choose_engine, decode_audio_file
from modelhost.workers.apps.speech.canary import (
    FRAME_SECONDS,
    NEMO_MISSING,
    CanaryEngine,
    ModelRef,
    check_languages,
    first_hypothesis,
    hypothesis_segments,
    hypothesis_text,
    hypothesis_words,
    is_canary_model,
    parse_languages,
    prompt_kwargs,
    prompt_languages,
    resolve_canary_model,
    resolve_compute_type,
    resolve_device,
    split_points,
    to_transcript,
    write_wav,
)
from modelhost.workers.apps.speech.engine import (
    SAMPLE_RATE,
    Audio,
    LanguageLimited,
    Segment,
    SpeechRequest,
    Transcript,
    engine_languages,
)
from modelhost.workers.apps.speech.formats import render, to_srt, to_vtt, verbose_json
from modelhost.workers.apps.speech.requests import check_supported
from modelhost.workers.process import free_port
from tests.audio import concat_wavs, have_espeak, speak, wav_duration, word_error_rate
from tests.workerapp import worker_app, worker_argv

# --------------------------------------------------------------------------- NeMo stand-ins


@dataclass
class Hypothesis:
    """The attributes of NeMo's `nemo.collections.asr.parts.utils.rnnt_utils.Hypothesis` that
    the worker reads: the text, and the timestamp dict `transcribe(timestamps=True)` fills."""

    text: str
    timestamp: dict[str, Any] = field(default_factory=dict)
    score: float = 0.0


def stamp(word: str, start: float, end: float, frames: float = FRAME_SECONDS,
          key: str = "word") -> dict[str, Any]:
    """An entry as NeMo's process_aed_timestamp_outputs writes it: frames and seconds."""
    return {key: word, "start_offset": round(start / frames), "end_offset": round(end / frames),
            "start": start, "end": end}


# What canary-1b-flash answers for "Hello there. General Kenobi!" with timestamps=True.
HELLO = Hypothesis(
    text="Hello there. General Kenobi!",
    timestamp={
        "word": [stamp("Hello", 0.24, 0.64), stamp("there.", 0.72, 1.2),
                 stamp("General", 2.0, 2.56), stamp("Kenobi!", 2.64, 3.36)],
        "segment": [stamp("Hello there.", 0.24, 1.2, key="segment"),
                    stamp("General Kenobi!", 2.0, 3.36, key="segment")],
        "char": [],
    })


# --------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("model", [
    "nvidia/canary-1b-flash", "nvidia/canary-180m-flash", "x.nemo", "/models/Canary.NEMO",
    "/cache/models--nvidia--canary-1b-flash/snapshots/0123abcd",
])
def test_auto_picks_canary(model: str) -> None:
    assert is_canary_model(model)
    assert choose_engine("auto", model) == "canary"
    assert choose_engine("whisper", model) == "whisper"  # the flag wins


@pytest.mark.parametrize("model", [None, "whisper-tiny.en", "large-v3",
                                   "Systran/faster-whisper-small", "/models/whisper"])
def test_auto_picks_whisper(model: str | None) -> None:
    assert not is_canary_model(model)
    assert choose_engine("auto", model) == "whisper"
    assert choose_engine("canary", model) == "canary"


def test_a_folder_holding_a_nemo_file_is_canary(tmp_path: Path) -> None:
    folder = tmp_path / "snapshot"
    folder.mkdir()
    assert choose_engine("auto", str(folder)) == "whisper"
    (folder / "model.nemo").write_bytes(b"")
    assert choose_engine("auto", str(folder)) == "canary"
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine("vosk", str(folder))


# --------------------------------------------------------------------------- the worker


def run_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = worker_argv("speech", free_port(), "--served-name", "canary", *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.skipif(importlib.util.find_spec("nemo") is not None, reason="NeMo is installed")
@pytest.mark.parametrize("args", [
    ("--model", "nvidia/canary-1b-flash"),
    ("--model", "/nowhere/canary-180m-flash.nemo", "--device", "cuda"),
    ("--engine", "canary", "--model", "some-model"),
])
def test_worker_without_nemo_exits_1_with_the_message(args: tuple[str, ...]) -> None:
    done = run_worker(*args)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert NEMO_MISSING in output
    assert "Traceback" not in output


def test_worker_with_whisper_engine_does_not_ask_for_nemo(tmp_path: Path) -> None:
    """`--engine whisper` on a canary-looking name goes to faster-whisper (and fails there,
    offline, as any unknown Whisper name does): no NeMo message."""
    done = run_worker("--engine", "whisper", "--model", str(tmp_path / "canary-missing"))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert NEMO_MISSING not in output and "Traceback" not in output
    assert "cannot load the speech model" in output


# --------------------------------------------------------------------------- resolution


def test_resolve_model_paths(tmp_path: Path) -> None:
    nemo = tmp_path / "canary-180m-flash.nemo"
    nemo.write_bytes(b"x")
    assert resolve_canary_model(str(nemo)) == ModelRef("file", str(nemo))
    assert resolve_canary_model(str(tmp_path)) == ModelRef("file", str(nemo))
    (tmp_path / "other.nemo").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"several \.nemo files"):
        resolve_canary_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.nemo file"):
        resolve_canary_model(str(empty))
    for missing in (str(tmp_path / "gone.nemo"), "./gone", "gone.nemo"):
        with pytest.raises(FileNotFoundError, match="no such"):
            resolve_canary_model(missing)


def test_resolve_hub_names_online_and_offline(tmp_path: Path) -> None:
    name = "nvidia/canary-1b-flash"
    assert resolve_canary_model(name, offline=False) == ModelRef("hub", name)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_canary_model(name, offline=True, cache_dir=tmp_path)
    # The Hugging Face cache's layout: refs/main names the snapshot holding the file.
    repo = tmp_path / "models--nvidia--canary-1b-flash"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "canary-1b-flash.nemo").write_bytes(b"x")
    ref = resolve_canary_model(name, offline=True, cache_dir=tmp_path)
    assert ref == ModelRef("file", str(snapshot / "canary-1b-flash.nemo"))


def test_options() -> None:
    assert parse_languages("en, DE,es,fr,en") == ("en", "de", "es", "fr")
    assert parse_languages(["fr"]) == ("fr",)
    for bad in ("xx", " , "):
        with pytest.raises(ValueError, match="language"):
            parse_languages(bad)
    assert check_languages("en,de", "de") == (("en", "de"), "de")
    with pytest.raises(ValueError, match="default-language"):
        check_languages("en,de", "fr")
    assert resolve_device("auto", True) == "cuda"
    assert resolve_device("auto", False) == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_device("cuda", False)
    assert resolve_compute_type("auto", "cuda") == "float32"
    assert resolve_compute_type("bfloat16", "cuda") == "bfloat16"
    with pytest.raises(ValueError, match="needs --device cuda"):
        resolve_compute_type("float16", "cpu")
    with pytest.raises(ValueError, match="int8"):
        resolve_compute_type("int8", "cuda")


# --------------------------------------------------------------------------- prompts


def test_transcription_keeps_the_language_translation_is_into_english() -> None:
    assert prompt_languages(SpeechRequest(language="de"), "en") == ("de", "de")
    assert prompt_languages(SpeechRequest(), "fr") == ("fr", "fr")
    assert prompt_languages(SpeechRequest(task="translate", language="es"), "en") == ("es", "en")
    assert prompt_languages(SpeechRequest(task="translate"), "en") == ("en", "en")


def test_prompt_kwargs() -> None:
    # Canary Flash (prompt format canary2): the languages say the task; strings, not bools
    # (NeMo maps "yes" to <|pnc|>, a bool True to <|nopnc|>).
    assert prompt_kwargs("de", "en", True, "canary2") == {
        "source_lang": "de", "target_lang": "en", "pnc": "yes", "timestamps": True}
    assert "timestamps" not in prompt_kwargs("en", "en", False, "canary2")
    # The first Canary (prompt format canary): a task slot, no timestamps.
    assert prompt_kwargs("fr", "en", True, "canary") == {
        "source_lang": "fr", "target_lang": "en", "pnc": "yes", "task": "s2t_translation"}
    assert prompt_kwargs("fr", "fr", True, "canary")["task"] == "asr"


# --------------------------------------------------------------------------- hypotheses


def test_segments_and_words_from_a_hypothesis() -> None:
    segments = hypothesis_segments(HELLO, duration=4.0)
    assert [(s.id, s.start, s.end, s.text) for s in segments] == [
        (0, 0.24, 1.2, " Hello there."), (1, 2.0, 3.36, " General Kenobi!")]
    assert [[(w.word, w.start, w.end) for w in s.words] for s in segments] == [
        [(" Hello", 0.24, 0.64), (" there.", 0.72, 1.2)],
        [(" General", 2.0, 2.56), (" Kenobi!", 2.64, 3.36)]]
    transcript = to_transcript([(0.0, 4.0, HELLO)], task="transcribe", language="en",
                               duration=4.0)
    assert transcript.text == "Hello there. General Kenobi!"
    assert [w.word.strip() for w in transcript.words] == ["Hello", "there.", "General",
                                                          "Kenobi!"]


def test_frame_offsets_when_seconds_are_missing() -> None:
    """Older NeMo gives only encoder frames: 80 ms each for Canary (or the model's own)."""
    hyp = Hypothesis("Guten Tag.", {
        "word": [{"word": "Guten", "start_offset": 5, "end_offset": 9},
                 {"word": "Tag.", "start_offset": 10, "end_offset": 15}],
        "segment": [{"segment": "Guten Tag.", "start_offset": 5, "end_offset": 15}]})
    (segment,) = hypothesis_segments(hyp, duration=2.0)
    assert (segment.start, segment.end) == pytest.approx((0.4, 1.2))
    assert [w.end for w in segment.words] == pytest.approx([0.72, 1.2])
    (segment,) = hypothesis_segments(hyp, duration=2.0, frame_seconds=0.04)
    assert (segment.start, segment.end) == pytest.approx((0.2, 0.6))


def test_words_alone_are_cut_into_sentences() -> None:
    hyp = Hypothesis(HELLO.text, {"word": HELLO.timestamp["word"], "segment": []})
    segments = hypothesis_segments(hyp, duration=4.0)
    assert [(s.start, s.end, s.text) for s in segments] == [
        (0.24, 1.2, " Hello there."), (2.0, 3.36, " General Kenobi!")]
    assert len(segments[1].words) == 2
    unfinished = Hypothesis("no stop here", {"word": [stamp("no", 0, 0.2), stamp("stop", 0.3, 0.5),
                                                      stamp("here", 0.6, 0.9)]})
    (only,) = hypothesis_segments(unfinished, duration=1.0)
    assert (only.text, only.end) == (" no stop here", 0.9)


def test_no_timestamps_is_one_segment_spanning_the_chunk() -> None:
    """canary-1b (or --no-timestamps): the text, over the chunk; nothing for silence."""
    (segment,) = hypothesis_segments(Hypothesis("Bonjour à tous."), offset=30.0, duration=12.5,
                                     first_id=4)
    assert (segment.id, segment.start, segment.end, segment.text) == \
        (4, 30.0, 42.5, " Bonjour à tous.")
    assert segment.words == ()
    assert hypothesis_segments(Hypothesis("   "), duration=3.0) == []
    assert hypothesis_segments(None, duration=3.0) == []
    # Timestamp tokens NeMo failed to parse never reach the text.
    assert hypothesis_text(Hypothesis("<|3|>Hola<|9|> <|10|>amigos<|20|>")) == "Hola amigos"
    assert hypothesis_text("plain string") == "plain string"


def test_timestamps_are_clamped_and_shifted_by_the_chunk() -> None:
    hyp = Hypothesis("late words", {"word": [stamp("late", -0.1, 0.5), stamp("words", 9.0, 12.0)],
                                    "segment": [stamp("late words", -0.1, 12.0, key="segment")]})
    (segment,) = hypothesis_segments(hyp, offset=60.0, duration=10.0)
    assert (segment.start, segment.end) == (60.0, 70.0)
    assert [(w.start, w.end) for w in segment.words] == [(60.0, 60.5), (69.0, 70.0)]
    broken = Hypothesis("x", {"word": [{"word": "x"}, {"start": 1.0, "end": 2.0}]})
    assert hypothesis_words(broken) == []


def test_words_go_by_time_when_the_counts_disagree() -> None:
    hyp = Hypothesis("a b c", {
        "word": [stamp("a", 0.0, 0.4), stamp("b", 0.5, 0.9), stamp("c", 2.0, 2.4)],
        "segment": [stamp("a b c d", 0.0, 1.0, key="segment"),
                    stamp("e", 1.9, 2.5, key="segment")]})
    segments = hypothesis_segments(hyp, duration=3.0)
    assert [[w.word.strip() for w in s.words] for s in segments] == [["a", "b"], ["c"]]


def test_first_hypothesis_of_every_return_shape() -> None:
    assert first_hypothesis([HELLO]) is HELLO                # NeMo 2.x
    assert first_hypothesis(([HELLO], None)) is HELLO        # NeMo 1.x: (best, all)
    assert first_hypothesis([[HELLO, Hypothesis("b")]]) is HELLO  # beams
    assert first_hypothesis([]) is None
    assert first_hypothesis(()) is None


def test_chunks_are_renumbered_and_shifted() -> None:
    parts = [(0.0, 28.0, HELLO), (28.0, 2.0, Hypothesis("Bye.", {"word": [stamp("Bye.", 0.1,
                                                                                   0.6)]}))]
    transcript = to_transcript(parts, task="transcribe", language="en", duration=30.0)
    assert [s.id for s in transcript.segments] == [0, 1, 2]
    assert (transcript.segments[2].start, transcript.segments[2].end) == \
        pytest.approx((28.1, 28.6))
    assert transcript.text == "Hello there. General Kenobi! Bye."


# --------------------------------------------------------------------------- rendering


def test_srt_vtt_and_verbose_json_from_a_canary_transcript() -> None:
    transcript = to_transcript([(0.0, 4.0, HELLO)], task="transcribe", language="de",
                               duration=4.0)
    assert to_srt(transcript.segments) == (
        "1\n00:00:00,240 --> 00:00:01,200\nHello there.\n\n"
        "2\n00:00:02,000 --> 00:00:03,360\nGeneral Kenobi!\n\n")
    assert to_vtt(transcript.segments) == (
        "WEBVTT\n\n00:00:00.240 --> 00:00:01.200\nHello there.\n\n"
        "00:00:02.000 --> 00:00:03.360\nGeneral Kenobi!\n\n")
    body, media_type = render(transcript, SpeechRequest(response_format="srt"))
    assert media_type.startswith("application/x-subrip") and body.startswith(b"1\n00:00:00,240")
    verbose = TranscriptionVerbose.model_validate(verbose_json(transcript, words=True))
    assert verbose.language == "german" and verbose.duration == 4.0
    assert verbose.text == "Hello there. General Kenobi!"
    assert [(w.word, w.start, w.end) for w in verbose.words or []] == [
        ("Hello", 0.24, 0.64), ("there.", 0.72, 1.2), ("General", 2.0, 2.56),
        ("Kenobi!", 2.64, 3.36)]
    assert [s.text for s in verbose.segments or []] == [" Hello there.", " General Kenobi!"]
    translated = to_transcript([(0.0, 4.0, HELLO)], task="translate", language="de",
                               duration=4.0)
    assert TranslationVerbose.model_validate(verbose_json(translated, words=False)).language \
        == "english"


# --------------------------------------------------------------------------- audio


def tone(seconds: float, quiet: list[tuple[float, float]]) -> Audio:
    """A loud 220 Hz tone with silent stretches."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for a, b in quiet:
        audio[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)] = 0.0
    return audio


def test_split_points_cut_in_the_quiet() -> None:
    audio = tone(70.0, quiet=[(27.0, 27.5), (55.2, 55.6)])
    bounds = split_points(audio, max_seconds=30.0, search_seconds=5.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert all(b - a <= 30 * SAMPLE_RATE for a, b in bounds)
    cuts = [a / SAMPLE_RATE for a, _ in bounds[1:]]
    assert 27.0 <= cuts[0] <= 27.5 and 55.2 <= cuts[1] <= 55.6
    assert split_points(audio[:SAMPLE_RATE * 20], max_seconds=30.0) == [(0, SAMPLE_RATE * 20)]
    assert split_points(audio, max_seconds=0) == [(0, len(audio))]
    # Loud everywhere: still cut, never longer than asked.
    loud = split_points(tone(95.0, quiet=[]), max_seconds=30.0)
    assert len(loud) == 4 and all(b - a <= 30 * SAMPLE_RATE for a, b in loud)


def test_written_chunks_decode_back(tmp_path: Path) -> None:
    audio = tone(1.5, quiet=[(0.5, 1.0)])
    path = write_wav(tmp_path / "chunk.wav", audio)
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) \
            == (1, 2, SAMPLE_RATE, len(audio))
    back = decode_capped(path)  # PyAV alone, as faster-whisper's decoder
    assert back.shape == audio.shape and np.abs(back - audio).max() < 1e-3
    assert np.abs(decode_audio_file(path) - audio).max() < 1e-3


# --------------------------------------------------------------------------- the engine


@dataclass
class FakeNemoModel:
    """NeMo's `transcribe` signature over WAV paths; answers each chunk's length in words."""

    prompt_format: str = "canary2"
    refuse_timestamps: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def transcribe(self, audio: list[str], batch_size: int = 4, return_hypotheses: bool = False,
                   verbose: bool = True, **prompt: Any) -> list[Hypothesis]:
        if self.refuse_timestamps and "timestamps" in prompt:
            raise ValueError("Unknown slot 'timestamp'")
        with wave.open(audio[0]) as wav:
            seconds = wav.getnframes() / wav.getframerate()
        self.calls.append({"seconds": seconds, "batch_size": batch_size,
                           "return_hypotheses": return_hypotheses, **prompt})
        text = f"{round(seconds)} seconds."
        if not prompt.get("timestamps"):
            return [Hypothesis(text)]
        return [Hypothesis(text, {"word": [stamp(str(round(seconds)), 0.5, 1.0),
                                           stamp("seconds.", 1.0, 1.5)],
                                  "segment": [stamp(text, 0.5, 1.5, key="segment")]})]


def test_engine_chunks_prompts_and_shifts(tmp_path: Path) -> None:
    model = FakeNemoModel()
    engine = CanaryEngine(model, path="canary.nemo")
    assert isinstance(engine, LanguageLimited) and engine.multilingual
    assert engine_languages(engine) == ("en", "de", "es", "fr")
    audio = tone(70.0, quiet=[(27.0, 27.5), (55.2, 55.6)])
    transcript = engine.transcribe(audio, SpeechRequest(task="translate", language="de"))
    assert [c["seconds"] for c in model.calls] == pytest.approx([27.25, 28.15, 14.6], abs=0.3)
    assert all(c["source_lang"] == "de" and c["target_lang"] == "en" and c["pnc"] == "yes"
               and c["timestamps"] is True and c["return_hypotheses"] and c["batch_size"] == 1
               for c in model.calls)
    assert transcript.task == "translate" and transcript.language == "de"
    assert transcript.duration == pytest.approx(70.0)
    assert [s.id for s in transcript.segments] == [0, 1, 2]
    starts = [s.start for s in transcript.segments]
    assert starts[0] == pytest.approx(0.5)
    assert 27.0 + 0.5 <= starts[1] <= 27.5 + 0.5 and 55.2 + 0.5 <= starts[2] <= 55.6 + 0.5
    assert transcript.text == "27 seconds. 28 seconds. 15 seconds."


def test_engine_drops_timestamps_a_model_refuses() -> None:
    model = FakeNemoModel(refuse_timestamps=True)
    engine = CanaryEngine(model, chunk_seconds=0, default_language="fr")
    transcript = engine.transcribe(tone(3.0, quiet=[]), SpeechRequest())
    assert not engine.timestamps
    assert model.calls[0]["source_lang"] == "fr" and "timestamps" not in model.calls[0]
    (segment,) = transcript.segments
    assert (segment.start, segment.end, segment.text) == (0.0, 3.0, " 3 seconds.")


def test_engine_options_are_checked_before_loading() -> None:
    with pytest.raises(ValueError, match="default-language"):
        CanaryEngine(FakeNemoModel(), languages="en,de", default_language="es")
    with pytest.raises(ValueError, match="default-language"):
        CanaryEngine.load("nvidia/canary-1b-flash", languages="en", default_language="de")


def test_engine_keeps_timestamps_when_the_failure_is_not_theirs() -> None:
    @dataclass
    class Broken(FakeNemoModel):
        def transcribe(self, audio: list[str], batch_size: int = 4,
                       return_hypotheses: bool = False, verbose: bool = True,
                       **prompt: Any) -> list[Hypothesis]:
            raise ValueError("bad audio")

    engine = CanaryEngine(Broken())
    with pytest.raises(ValueError, match="bad audio"):
        engine.transcribe(tone(1.0, quiet=[]), SpeechRequest())
    assert engine.timestamps


# --------------------------------------------------------------------------- languages


def test_canary_languages_are_checked() -> None:
    languages = ("en", "de", "es", "fr")
    for ok in (None, "en", "de", "es", "fr"):
        check_supported(SpeechRequest(language=ok), True, "canary-1b-flash", languages)
        check_supported(SpeechRequest(task="translate", language=ok), True, "canary-1b-flash",
                        languages)
    for task in ("transcribe", "translate"):
        with pytest.raises(InvalidRequest, match="hears en, de, es, fr only") as err:
            check_supported(SpeechRequest(task=task, language="ja"), True, "canary-1b-flash",
                            languages)
        assert (err.value.status, err.value.param, err.value.code) == \
            (400, "language", "unsupported_language")
        assert "japanese" in err.value.message


@dataclass
class FakeCanary:
    """An engine with Canary's languages: the app must refuse the others before decoding."""

    multilingual: bool = True
    languages: tuple[str, ...] = ("en", "de", "es", "fr")
    heard: list[SpeechRequest] = field(default_factory=list)

    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript:
        self.heard.append(request)
        return Transcript(task=request.task, language=request.language or "en",
                          duration=len(audio) / SAMPLE_RATE,
                          segments=(Segment(id=0, start=0.0, end=1.0, text=" Hallo."),))


def test_the_app_answers_400_for_a_language_canary_does_not_hear(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "a.wav", tone(1.0, quiet=[])).read_bytes()
    engine = FakeCanary()
    with TestClient(build_app(engine, "canary-1b-flash")) as http:
        for route in ("transcriptions", "translations"):
            resp = http.post(f"/v1/audio/{route}", files={"file": ("a.wav", wav)},
                             data={"language": "ja"})
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert (error["param"], error["code"]) == ("language", "unsupported_language")
            assert "canary-1b-flash" in error["message"]
        assert engine.heard == []
        resp = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)},
                         data={"language": "German", "response_format": "vtt"})
        assert resp.status_code == 200, resp.text
        assert resp.text == "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nHallo.\n\n"
        assert engine.heard[0].language == "de"


# --------------------------------------------------------------------------- the real thing
#
# Opt-in, for a machine with NeMo and an NVIDIA GPU (skipped everywhere else):
#
#   pip install -e '.[dev,speech]' 'nemo_toolkit[asr]'      # and espeak-ng for the speech
#   MODELHOST_CANARY_MODEL=nvidia/canary-180m-flash pytest tests/test_canary.py -k real -v -s
#
# MODELHOST_CANARY_MODEL is what `--model` gets (a Hub name, fetched unless HF_HUB_OFFLINE is
# set; a .nemo file; or a folder with one); MODELHOST_CANARY_DEVICE is `--device` (cuda), and
# MODELHOST_CANARY_ARGS more flags (e.g. "--compute-type bfloat16").

REAL_MODEL = os.environ.get("MODELHOST_CANARY_MODEL", "")
ENGLISH = (
    "The weather today is sunny with a light breeze from the west.",
    "Please open the window and let some fresh air into the room.",
    "We need to finish the report before the end of the week.",
)


@pytest.fixture(scope="module")
def real_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not REAL_MODEL:
        pytest.skip("set MODELHOST_CANARY_MODEL (e.g. nvidia/canary-180m-flash) on a machine "
                    "with NeMo and an NVIDIA GPU")
    if importlib.util.find_spec("nemo") is None:
        pytest.skip(NEMO_MISSING)
    if not have_espeak():
        pytest.skip("needs espeak-ng")
    log = tmp_path_factory.mktemp("canary-worker") / "worker.log"
    with worker_app("speech", "--model", REAL_MODEL, "--served-name", "canary",
                    "--device", os.environ.get("MODELHOST_CANARY_DEVICE", "cuda"),
                    *os.environ.get("MODELHOST_CANARY_ARGS", "").split(), log=log,
                    ready_seconds=900,  # a first run downloads the model
                    stop_seconds=30) as app:
        yield app.url


@pytest.fixture(scope="module")
def real_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("canary-audio")
    turns = [speak(s, root / f"en{i}.wav", speed=150) for i, s in enumerate(ENGLISH)]
    concat_wavs(turns, root / "english.wav", gap_seconds=1.0, lead_seconds=0.3)
    # Over 40 s (Canary Flash's longest training utterance): the worker cuts it into chunks.
    concat_wavs(turns * 5, root / "long.wav", gap_seconds=1.0, lead_seconds=0.3)
    speak("Das Wetter ist heute sonnig und warm.", root / "german.wav", voice="de", speed=140)
    return root


GRANULARITIES = "timestamp_granularities[]"


def post_audio(url: str, path: Path, route: str = "transcriptions",
               **data: str | list[str]) -> httpx.Response:
    """A multipart request; `granularities` is sent as OpenAI's timestamp_granularities[]."""
    if "granularities" in data:
        data[GRANULARITIES] = data.pop("granularities")
    return httpx.post(f"{url}/v1/audio/{route}", files={"file": (path.name, path.read_bytes())},
                      data={"model": "canary", **data}, timeout=600)


def test_real_canary_model_card(real_worker: str) -> None:
    card = httpx.get(real_worker + "/v1/models").json()["data"][0]
    assert card["engine"] == "canary" and card["multilingual"] is True
    assert card["device"] == os.environ.get("MODELHOST_CANARY_DEVICE", "cuda")


def test_real_canary_transcribes_with_timestamps(real_worker: str, real_audio: Path) -> None:
    path = real_audio / "english.wav"
    resp = post_audio(real_worker, path, response_format="verbose_json", language="en",
                      granularities=["word", "segment"])
    assert resp.status_code == 200, resp.text
    verbose = TranscriptionVerbose.model_validate_json(resp.content)
    print(verbose.text)
    assert word_error_rate(" ".join(ENGLISH), verbose.text) <= 0.2
    assert verbose.duration == pytest.approx(wav_duration(path), abs=0.01)
    words = verbose.words or []
    assert len(words) >= 0.8 * len(" ".join(ENGLISH).split())
    for w, after in itertools.pairwise(words):
        assert w.start <= w.end <= after.start + 0.2
    assert 0 <= words[0].start < 2.0 and words[-1].end <= verbose.duration + 1e-3
    assert verbose.segments and len(verbose.segments) >= 2
    for fmt, head in (("srt", "1\n00:00:0"), ("vtt", "WEBVTT\n\n00:00:0")):
        resp = post_audio(real_worker, path, response_format=fmt)
        assert resp.status_code == 200 and resp.text.startswith(head), resp.text


def test_real_canary_long_audio_is_chunked(real_worker: str, real_audio: Path) -> None:
    path = real_audio / "long.wav"
    resp = post_audio(real_worker, path, response_format="verbose_json", granularities="word")
    assert resp.status_code == 200, resp.text
    verbose = TranscriptionVerbose.model_validate_json(resp.content)
    assert verbose.duration > 60
    assert word_error_rate(" ".join(ENGLISH * 5), verbose.text) <= 0.25
    words = verbose.words or []
    assert words and words[-1].end > verbose.duration - 10  # the last chunk was heard too


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_real_canary_translates_german(real_worker: str, real_audio: Path) -> None:
    resp = post_audio(real_worker, real_audio / "german.wav", route="translations",
                      language="de", response_format="verbose_json")
    assert resp.status_code == 200, resp.text
    verbose = TranslationVerbose.model_validate_json(resp.content)
    print(verbose.text)
    assert verbose.language == "english" and "weather" in verbose.text.lower()
    resp = post_audio(real_worker, real_audio / "german.wav", language="de")
    assert resp.status_code == 200 and "wetter" in resp.json()["text"].lower(), resp.text


def test_real_canary_refuses_other_languages(real_worker: str, real_audio: Path) -> None:
    resp = post_audio(real_worker, real_audio / "english.wav", language="ja")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "language"

