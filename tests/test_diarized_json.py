"""OpenAI's diarized transcripts (`response_format=diarized_json`) through a real gateway with
the built-in models (Whisper tiny.en and resemblyzer, each in its own worker process), driven
by the official `openai` client as a client written for `gpt-4o-transcribe-diarize` drives it.

The meeting: two espeak-ng voices far apart (en-us+m3 at pitch 20, en-us+f3 at pitch 80, as
in test_diarization.py) taking four alternating turns; the known speakers' reference clips
are the same voices saying other sentences.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.audio import TranscriptionDiarized, TranscriptionVerbose
from starlette.testclient import TestClient

from modelhost.diarized_json import (
    MATCH_THRESHOLD,
    chunking_strategy,
    decode_data_url,
    diarized_json,
    known_speaker_names,
    letters,
    match_speakers,
    speaker_labels,
    stream_events,
)
from modelhost.errors import InvalidRequest
from modelhost.workers.apps.diarization.app import build_app
from modelhost.workers.apps.diarization.steps import FloatArray, SpeakerBounds, Turn
from tests.audio import concat_wavs, have_espeak, have_sox, silence, speak, wav_duration
from tests.conftest import Gateway, GatewayFactory, openai_client

pytestmark = pytest.mark.skipif(not (have_espeak() and have_sox()),
                                reason="needs espeak-ng and sox")

MAN, WOMAN = ("en-us+m3", 20), ("en-us+f3", 80)
TURNS = [(MAN, "Good morning everyone, thanks for joining the meeting today."),
         (WOMAN, "Thank you. I have prepared the budget figures for this quarter."),
         (MAN, "Great, please walk us through the main numbers first."),
         (WOMAN, "Sales grew by ten percent and costs stayed about the same.")]
# Each known speaker's reference: the same voice, saying something else.
REFERENCE_TEXT = "This is a short sample of my voice, recorded for the meeting notes."


@dataclass(frozen=True)
class Meeting:
    path: Path
    spans: list[tuple[float, float]]  # the turns, in order: man, woman, man, woman
    man: str  # reference clips as data URLs
    woman: str
    tmp: Path


def data_url(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def meeting(tmp_path_factory: pytest.TempPathFactory) -> Meeting:
    tmp = tmp_path_factory.mktemp("meeting")
    parts = [speak(text, tmp / f"turn{i}.wav", voice=voice, pitch=pitch)
             for i, ((voice, pitch), text) in enumerate(TURNS)]
    out = tmp / "meeting.wav"
    spans = concat_wavs(parts, out, gap_seconds=0.6, lead_seconds=0.3)
    man = speak(REFERENCE_TEXT, tmp / "man.wav", voice=MAN[0], pitch=MAN[1])
    woman = speak(REFERENCE_TEXT, tmp / "woman.wav", voice=WOMAN[0], pitch=WOMAN[1])
    return Meeting(out, spans, data_url(man), data_url(woman), tmp)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory(include_builtin=True)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai_client(gateway, timeout=180) as client:
        yield client


def speaker_at(segments: list[dict[str, Any]], t: float) -> str | None:
    """The speaker of the segment nearest to time `t`."""
    nearest = min(segments, key=lambda s: max(s["start"] - t, t - s["end"], 0.0))
    return str(nearest["speaker"])


def speakers_of_turns(body: dict[str, Any], meeting: Meeting) -> list[str | None]:
    return [speaker_at(body["segments"], (a + b) / 2) for a, b in meeting.spans]


def transcribe(client: openai.OpenAI, meeting: Meeting, **kwargs: Any) -> dict[str, Any]:
    with meeting.path.open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-tiny.en", file=f, response_format="diarized_json", **kwargs)
    body: dict[str, Any] = json.loads(raw.content)
    return body


# ----------------------------------------------------------------------------- the shape


def test_diarized_json_in_openais_shape(client: openai.OpenAI, meeting: Meeting) -> None:
    with meeting.path.open("rb") as f:
        parsed = client.audio.transcriptions.create(
            model="whisper-tiny.en", file=f, response_format="diarized_json",
            chunking_strategy="auto")
    assert isinstance(parsed, TranscriptionDiarized)  # the client's own type for this format
    body = parsed.model_dump(exclude_unset=True)
    print("diarized_json:", json.dumps(body, indent=1))
    assert set(body) == {"task", "duration", "text", "segments", "usage"}
    assert body["task"] == "transcribe"
    assert body["duration"] == pytest.approx(wav_duration(meeting.path), abs=0.05)
    assert body["usage"] == {"type": "duration", "seconds": body["duration"]}
    assert "meeting" in body["text"].lower()
    segments = body["segments"]
    for i, segment in enumerate(segments):
        assert set(segment) == {"type", "id", "start", "end", "text", "speaker"}
        assert segment["type"] == "transcript.text.segment"
        assert segment["id"] == f"seg_{i}"
        assert 0 <= segment["start"] <= segment["end"] <= body["duration"] + 0.05
        assert segment["text"].strip()
    # Time order, two speakers apart, lettered as OpenAI letters them (first heard: A).
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments)
    assert segments[0]["speaker"] == "A"
    assert {s["speaker"] for s in segments} == {"A", "B"}
    assert speakers_of_turns(body, meeting) == ["A", "B", "A", "B"]
    assert "".join(s["text"] for s in segments).split() == body["text"].split()


def test_known_speakers_are_named(client: openai.OpenAI, meeting: Meeting) -> None:
    """Names go by voice, not by order: the first name given is the second voice heard."""
    body = transcribe(client, meeting, known_speaker_names=["bob", "alice"],
                      known_speaker_references=[meeting.woman, meeting.man])
    TranscriptionDiarized.model_validate(body)
    assert speakers_of_turns(body, meeting) == ["alice", "bob", "alice", "bob"]
    assert {s["speaker"] for s in body["segments"]} == {"alice", "bob"}


def test_a_voice_with_no_reference_keeps_a_letter(client: openai.OpenAI,
                                                   meeting: Meeting) -> None:
    body = transcribe(client, meeting, known_speaker_names=["bob"],
                      known_speaker_references=[meeting.woman])
    assert speakers_of_turns(body, meeting) == ["A", "bob", "A", "bob"]


def test_a_reference_of_another_voice_names_no_one(client: openai.OpenAI,
                                                    meeting: Meeting) -> None:
    other = speak(REFERENCE_TEXT, meeting.tmp / "other.wav", voice="en-us+f1", pitch=60)
    body = transcribe(client, meeting, known_speaker_names=["carol"],
                      known_speaker_references=[data_url(other)])
    assert speakers_of_turns(body, meeting) == ["A", "B", "A", "B"]
    # The extension field known_speaker_threshold lowers the bar (here: to anyone).
    body = transcribe(client, meeting, known_speaker_names=["carol"],
                      known_speaker_references=[data_url(other)],
                      extra_body={"known_speaker_threshold": "0"})
    assert "carol" in {s["speaker"] for s in body["segments"]}


def test_streamed_events(client: openai.OpenAI, meeting: Meeting) -> None:
    """stream=true: OpenAI's events for a diarized transcript (each segment's delta and
    segment, then done), parsed by the client's own event types."""
    with meeting.path.open("rb") as f:
        stream = client.audio.transcriptions.create(
            model="whisper-tiny.en", file=f, response_format="diarized_json", stream=True,
            known_speaker_names=["alice"], known_speaker_references=[meeting.man])
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    segments = [e for e in events if e.type == "transcript.text.segment"]
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert kinds[:-1] == ["transcript.text.delta", "transcript.text.segment"] * len(segments)
    assert [d.segment_id for d in deltas] == [s.id for s in segments]
    body = {"segments": [s.model_dump() for s in segments]}
    assert speakers_of_turns(body, meeting) == ["alice", "A", "alice", "A"]
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert done.text.split() == "".join(s.text for s in segments).split()


def test_chunking_strategy_is_accepted(client: openai.OpenAI, gateway: Gateway,
                                       meeting: Meeting) -> None:
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
           "silence_duration_ms": 200}
    body = transcribe(client, meeting, chunking_strategy=vad)  # as chunking_strategy[...] fields
    assert speakers_of_turns(body, meeting) == ["A", "B", "A", "B"]
    with meeting.path.open("rb") as f:  # as JSON text (a hand-made form)
        resp = httpx.post(gateway.url + "/v1/audio/transcriptions", timeout=180,
                          files={"file": ("meeting.wav", f, "audio/wav")},
                          data={"model": "whisper-tiny.en", "response_format": "json",
                                "chunking_strategy": json.dumps(vad)})
    assert resp.status_code == 200, resp.text
    assert "meeting" in resp.json()["text"].lower()


# ----------------------------------------------------------------------------- refusals


def _post(gateway: Gateway, meeting: Meeting, fields: list[tuple[str, str]],
          path: str = "/v1/audio/transcriptions") -> httpx.Response:
    data: dict[str, list[str]] = {"model": ["whisper-tiny.en"],
                                  "response_format": ["diarized_json"]}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    with meeting.path.open("rb") as f:
        return httpx.post(gateway.url + path, timeout=180,
                          files={"file": ("meeting.wav", f, "audio/wav")}, data=data)


def _known(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    return [("known_speaker_names[]", n) for n, _ in pairs] + \
        [("known_speaker_references[]", r) for _, r in pairs]


def test_bad_known_speakers_are_400(gateway: Gateway, meeting: Meeting) -> None:
    man, woman = meeting.man, meeting.woman
    short = data_url(speak("Hi.", meeting.tmp / "short.wav", voice=MAN[0], pitch=MAN[1]))
    long_parts = [speak(f"Sentence number {i} of a reference that goes on for far too long.",
                        meeting.tmp / f"long{i}.wav", voice=MAN[0], pitch=MAN[1])
                  for i in range(4)]
    concat_wavs(long_parts, meeting.tmp / "long.wav", gap_seconds=0.5)
    too_long = data_url(meeting.tmp / "long.wav")
    silent = data_url(silence(meeting.tmp / "silent.wav", 3.0))
    not_audio = "data:audio/wav;base64," + base64.b64encode(b"not audio at all " * 40).decode()
    cases: list[tuple[list[tuple[str, str]], str, str]] = [
        ([("known_speaker_names[]", "alice")], "known_speaker_references", "without"),
        ([("known_speaker_references[]", man)], "known_speaker_names", "without"),
        ([*_known(("alice", man)), ("known_speaker_names[]", "bob")],
         "known_speaker_references", "one reference per name"),
        (_known(*[(f"p{i}", man) for i in range(5)]), "known_speaker_names", "at most 4"),
        (_known(("alice", man), ("alice", woman)), "known_speaker_names", "twice"),
        (_known(("", man)), "known_speaker_names", "empty"),
        (_known(("alice", "https://example.com/alice.wav")), "known_speaker_references",
         "not a data URL"),
        (_known(("alice", "data:audio/wav,abc")), "known_speaker_references", "base64"),
        (_known(("alice", "data:audio/wav;base64,@@@")), "known_speaker_references",
         "not valid base64"),
        (_known(("alice", man), ("bob", not_audio)), "known_speaker_references",
         "known_speaker_references[1]"),
        (_known(("alice", short)), "known_speaker_references", "between 1.2 and 10"),
        (_known(("alice", too_long)), "known_speaker_references", "longer than 10"),
        (_known(("alice", silent)), "known_speaker_references", "no speech"),
        ([*_known(("alice", man)), ("known_speaker_threshold", "2")],
         "known_speaker_threshold", "between 0 and 1"),
    ]
    print("long reference:", wav_duration(meeting.tmp / "long.wav"), "s")
    for fields, param, words in cases:
        resp = _post(gateway, meeting, fields)
        assert resp.status_code == 400, (fields[:2], resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert (error["param"], words in error["message"]) == (param, True), error


@pytest.mark.parametrize("fields", [
    [("chunking_strategy", "sometimes")],
    [("chunking_strategy", '{"type": "client_vad"}')],
    [("chunking_strategy", '["auto"]')],
    [("chunking_strategy[type]", "server_vad"), ("chunking_strategy[threshold]", "2")],
    [("chunking_strategy[type]", "server_vad"), ("chunking_strategy[silence_ms]", "200")],
    [("chunking_strategy[type]", "server_vad"),
     ("chunking_strategy[prefix_padding_ms]", "-5")],
    [("chunking_strategy[threshold]", "0.5")],
])
def test_bad_chunking_strategy_is_400(gateway: Gateway, meeting: Meeting,
                                      fields: list[tuple[str, str]]) -> None:
    resp = _post(gateway, meeting, fields)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "chunking_strategy"


def test_diarized_json_is_for_transcriptions_only(gateway: Gateway,
                                                  meeting: Meeting) -> None:
    resp = _post(gateway, meeting, [], path="/v1/audio/translations")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "response_format"


# ----------------------------------------------------------------------------- diarize=true


def test_diarize_true_still_returns_verbose_json(client: openai.OpenAI,
                                                 meeting: Meeting) -> None:
    with meeting.path.open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-tiny.en", file=f, extra_body={"diarize": "true"})
    body = json.loads(raw.content)
    TranscriptionVerbose.model_validate(body)
    assert body["language"] == "english" and isinstance(body["segments"][0]["id"], int)
    assert speakers_of_turns(body, meeting) == ["SPEAKER_00", "SPEAKER_01"] * 2
    assert [s["speaker"] for s in body["speakers"]] == ["SPEAKER_00", "SPEAKER_01"]
    assert all("speaker" in w for s in body["segments"] for w in s.get("words", []))


# ----------------------------------------------------------------------------- pure parts


def test_letters_and_labels() -> None:
    gen = letters()
    labels = [next(gen) for _ in range(28)]
    assert labels[:3] == ["A", "B", "C"] and labels[25:] == ["Z", "AA", "AB"]
    order = ["SPEAKER_01", "SPEAKER_00", None, "SPEAKER_01", "SPEAKER_02"]
    assert speaker_labels(order, {}) == {"SPEAKER_01": "A", "SPEAKER_00": "B", None: "C",
                                         "SPEAKER_02": "D"}
    # Known names first; unknown voices lettered among themselves, never as a name.
    assert speaker_labels(order, {"SPEAKER_00": "A", "SPEAKER_02": "carol"}) == \
        {"SPEAKER_01": "B", "SPEAKER_00": "A", None: "C", "SPEAKER_02": "carol"}


def test_matching_is_one_to_one_best_first() -> None:
    voices = {"S0": [1.0, 0.0, 0.0], "S1": [0.9, 0.436, 0.0], "S2": [0.0, 0.0, 1.0]}
    refs = [("ann", [1.0, 0.0, 0.0]), ("ben", [0.95, 0.31, 0.0])]
    # S0-ann is the best pair; ben then goes to S1 (0.99), not S0 (0.95, taken).
    assert match_speakers(voices, refs, 0.8) == {"S0": "ann", "S1": "ben"}
    assert match_speakers(voices, refs, 0.999) == {"S0": "ann"}
    assert match_speakers(voices, [("zed", [0.0, 1.0, 0.0])], MATCH_THRESHOLD) == {}


def test_chunking_strategy_forms() -> None:
    assert chunking_strategy({}) is None
    assert chunking_strategy({"chunking_strategy": ["auto"]}) == "auto"
    assert chunking_strategy({"chunking_strategy": ['"auto"']}) == "auto"
    assert chunking_strategy({"chunking_strategy": ['{"type": "server_vad", "threshold": 1}']}) \
        == {"type": "server_vad", "threshold": 1.0}
    assert chunking_strategy({"chunking_strategy[type]": ["server_vad"],
                              "chunking_strategy[prefix_padding_ms]": ["300"]}) == \
        {"type": "server_vad", "prefix_padding_ms": 300}
    for bad in ('{"type": "server_vad", "threshold": true}',
                '{"type": "server_vad", "silence_duration_ms": 2.5}', "{}", "nan"):
        with pytest.raises(InvalidRequest):
            chunking_strategy({"chunking_strategy": [bad]})
    with pytest.raises(InvalidRequest):
        chunking_strategy({"chunking_strategy": ["auto"],
                           "chunking_strategy[type]": ["server_vad"]})


def test_known_speaker_fields() -> None:
    assert known_speaker_names({}, 0) == []
    assert known_speaker_names({"known_speaker_names": ["a", "b"]}, 2) == ["a", "b"]
    assert decode_data_url("data:audio/wav;base64,aGVs\nbG8=", 0) == b"hello"
    assert decode_data_url("DATA:;base64,aGVsbG8=", 0) == b"hello"
    with pytest.raises(InvalidRequest, match=r"known_speaker_references\[3\]"):
        decode_data_url("data:audio/wav;base64,", 3)


def test_diarized_json_from_a_labelled_transcript() -> None:
    labelled = {"task": "transcribe", "language": "english", "duration": 5.0004,
                "text": "Hello there. Hi.",
                "segments": [{"id": 0, "start": 0.0, "end": 2.0, "text": " Hello there.",
                              "speaker": "SPEAKER_01", "tokens": [1], "words": []},
                             {"id": 1, "start": 2.5, "end": 3.0, "text": " Hi.",
                              "speaker": "SPEAKER_00"}],
                "usage": {"type": "duration", "seconds": 5.0}, "speakers": []}
    body = diarized_json(labelled, {"SPEAKER_00": "bob"})
    assert body == {
        "task": "transcribe", "duration": 5.0, "text": "Hello there. Hi.",
        "segments": [{"type": "transcript.text.segment", "id": "seg_0", "start": 0.0,
                      "end": 2.0, "text": " Hello there.", "speaker": "A"},
                     {"type": "transcript.text.segment", "id": "seg_1", "start": 2.5,
                      "end": 3.0, "text": " Hi.", "speaker": "bob"}],
        "usage": {"type": "duration", "seconds": 5.0}}
    TranscriptionDiarized.model_validate(body)
    events = stream_events(body).decode().split("\n\n")
    assert events[-1] == ""
    assert [json.loads(e.removeprefix("data: "))["type"] for e in events[:-1]] == [
        "transcript.text.delta", "transcript.text.segment"] * 2 + ["transcript.text.done"]


class TurnsOnly:
    """An engine that diarizes but cannot embed voices (as the pyannote engine)."""

    name = "pyannote"

    def diarize(self, audio: FloatArray, bounds: SpeakerBounds) -> list[Turn]:
        return [Turn(0, 0.0, 1.0)]


def test_an_engine_without_voices_refuses_known_speakers(meeting: Meeting) -> None:
    with TestClient(build_app(TurnsOnly(), "pyannote", 1 << 24)) as http:
        plain = http.post("/v1/audio/diarization", files={"file": meeting.path.read_bytes()})
        assert plain.status_code == 200, plain.text
        for path, data in (("/v1/audio/diarization", {"speaker_embeddings": "true"}),
                           ("/v1/audio/speaker_embedding", {})):
            resp = http.post(path, data=data, files={"file": meeting.path.read_bytes()})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "unsupported_parameter"
            assert "resemblyzer" in resp.json()["error"]["message"]
