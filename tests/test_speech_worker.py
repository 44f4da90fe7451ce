"""The speech worker (faster-whisper) as a real process with the embedded Whisper tiny.en,
driven with the official `openai` client on speech synthesized by espeak-ng; and its pure parts
(request parsing, subtitle formatting, verbose_json shape) without HTTP.

The word error rate is measured on known sentences. tiny.en is the smallest Whisper (39 M
parameters, about 5.6 % WER on LibriSpeech test-clean) and espeak-ng's formant voice is far from
the speech it learned from, so 5-15 % is its normal range here (measured: 6.9 % on the eight
sentences below, at 150 words per minute, one request each). The bound, 20 %, leaves room for
other CPUs' arithmetic and still fails loudly for anything broken: a wrong sample rate, a
mangled upload, a truncated decode or the wrong model all give 50-100 %.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
from openai.types.audio import (
    Transcription,
    TranscriptionVerbose,
    Translation,
    TranslationVerbose,
)
from starlette.testclient import TestClient

from modelhost.errors import InvalidRequest
from modelhost.workers.apps.speech.app import build_app, transcribe_file
from modelhost.workers.apps.speech.engine import (
    Audio,
    Segment,
    SpeechRequest,
    Transcript,
    Word,
)
from modelhost.workers.apps.speech.formats import (
    format_timestamp,
    render,
    to_srt,
    to_vtt,
    verbose_json,
)
from modelhost.workers.apps.speech.requests import check_supported, parse_request
from modelhost.workers.apps.speech.whisper import embedded_model_path, temperature_schedule
from tests.audio import (
    VOICES,
    concat_wavs,
    encode,
    have_espeak,
    normalize_words,
    silence,
    speak,
    wav_duration,
    word_error_rate,
)
from tests.workerapp import worker_app

SERVED = "whisper-tiny.en"
MAX_WER = 0.20
SPEED = 150  # words per minute: a clear, ordinary pace (espeak's default, 175, is hurried)
SENTENCES = (
    "The weather today is sunny with a light breeze from the west.",
    "Please open the window and let some fresh air into the room.",
    "We need to finish the report before the end of the week.",
    "Can you tell me where the nearest train station is?",
    "My brother lives in a small house near the river.",
    "The children were playing in the garden after school.",
    "She bought fresh bread and milk at the market this morning.",
    "Our team will present the new design to the customer tomorrow.",
)

SRT_CUE = re.compile(r"(\d+)\n(\d{2,}):(\d{2}):(\d{2}),(\d{3}) --> "
                     r"(\d{2,}):(\d{2}):(\d{2}),(\d{3})\n(.+)")
VTT_CUE = re.compile(r"(\d{2,}):(\d{2}):(\d{2})\.(\d{3}) --> "
                     r"(\d{2,}):(\d{2}):(\d{2})\.(\d{3})\n(.+)")


# --------------------------------------------------------------------------- pure parts


def seg(i: int, start: float, end: float, text: str) -> Segment:
    return Segment(id=i, start=start, end=end, text=text)


def test_format_timestamp() -> None:
    assert format_timestamp(0) == "00:00:00,000"
    assert format_timestamp(3.74) == "00:00:03,740"
    assert format_timestamp(3661.5) == "01:01:01,500"
    assert format_timestamp(3661.5, ".") == "01:01:01.500"
    assert format_timestamp(59.9996) == "00:01:00,000"  # rounds into the next minute
    assert format_timestamp(-0.2) == "00:00:00,000"
    assert format_timestamp(100 * 3600 + 1) == "100:00:01,000"


def test_srt_numbers_cues_from_one() -> None:
    srt = to_srt([seg(0, 0.0, 2.5, " Hello there."), seg(1, 2.5, 61.25, " General Kenobi!")])
    assert srt == ("1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
                   "2\n00:00:02,500 --> 00:01:01,250\nGeneral Kenobi!\n\n")


def test_vtt_has_header_and_dotted_timestamps() -> None:
    vtt = to_vtt([seg(0, 0.0, 2.5, " Hello there."), seg(1, 3.0, 4.0, " Bye.")])
    assert vtt == ("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
                   "00:00:03.000 --> 00:00:04.000\nBye.\n\n")


def test_subtitles_stay_well_formed() -> None:
    segments = [seg(0, 1.0, 2.0, " first"), seg(1, 2.0, 2.0, "   "),  # blank: no cue
                seg(2, 0.5, 0.4, " a --> b\nsplit"),  # goes back in time, arrow, newline
                seg(3, 3.0, 4.0, " last")]
    srt = to_srt(segments)
    cues = srt.strip().split("\n\n")
    assert [c.split("\n")[0] for c in cues] == ["1", "2", "3"]
    assert cues[1] == "2\n00:00:01,000 --> 00:00:01,000\na -> b split"
    assert parse_srt(srt)[-1][2] == "last"
    assert [c[2] for c in parse_vtt(to_vtt(segments))] == ["first", "a -> b split", "last"]
    assert to_srt([]) == ""
    assert to_vtt([]) == "WEBVTT\n\n"


def fields(**values: str | list[str]) -> dict[str, list[str]]:
    return {k.replace("__", "[]"): v if isinstance(v, list) else [v] for k, v in values.items()}


def test_parse_request_defaults_and_values() -> None:
    req = parse_request("transcribe", {})
    assert req == SpeechRequest()
    assert req.response_format == "json" and not req.words
    req = parse_request("translate", fields(
        language="EN", prompt="Stella", temperature="0.4", response_format="verbose_json",
        timestamp_granularities__=["word", "segment"], model="whatever", diarize="true"))
    assert (req.task, req.language, req.prompt, req.temperature) == \
        ("translate", "en", "Stella", 0.4)
    assert req.words and req.granularities == {"word", "segment"}
    # Without [] and comma-separated, as some clients send them; a language by name.
    req = parse_request("transcribe", fields(timestamp_granularities="word,segment",
                                             response_format="verbose_json", language="French"))
    assert req.words and req.language == "fr"
    # Words are only computed where they can be shown.
    assert not parse_request("transcribe", fields(timestamp_granularities__="word")).words


@pytest.mark.parametrize(("values", "param"), [
    ({"response_format": "xml"}, "response_format"),
    ({"response_format": "diarized_json"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "1.5"}, "temperature"),
    ({"temperature": "nan"}, "temperature"),
    ({"language": "zz"}, "language"),
    ({"timestamp_granularities__": "char"}, "timestamp_granularities"),
])
def test_parse_request_refuses(values: dict[str, str], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("transcribe", fields(**values))
    assert err.value.param == param and err.value.status == 400


def test_english_only_models_refuse_other_languages_but_translate() -> None:
    check_supported(SpeechRequest(language="en"), multilingual=False, model_name=SERVED)
    check_supported(SpeechRequest(task="translate"), multilingual=False, model_name=SERVED)
    check_supported(SpeechRequest(language="fr"), multilingual=True, model_name="large-v3")
    with pytest.raises(InvalidRequest, match="English-only") as err:
        check_supported(SpeechRequest(language="fr"), multilingual=False, model_name=SERVED)
    assert err.value.param == "language"


def test_temperature_schedule_falls_back_like_whisper() -> None:
    assert temperature_schedule(0.0) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert temperature_schedule(0.5) == (0.5, 0.7, 0.9)
    assert temperature_schedule(1.0) == (1.0,)


TRANSCRIPT = Transcript(task="transcribe", language="en", duration=4.2512, segments=(
    Segment(id=0, start=0.0, end=2.0, text=" Hello there.", tokens=(50363, 15496, 612, 13),
            avg_logprob=-0.2, compression_ratio=0.8, no_speech_prob=0.01,
            words=(Word(" Hello", 0.0, 0.9), Word(" there.", 0.9, 2.0))),
    Segment(id=1, start=2.5, end=4.0, text=" Bye.", words=(Word(" Bye.", 2.5, 4.0),)),
))


def test_render_formats() -> None:
    text_request = SpeechRequest(response_format="text")
    assert render(TRANSCRIPT, text_request) == (b"Hello there. Bye.\n", "text/plain; charset=utf-8")
    body, media_type = render(TRANSCRIPT, SpeechRequest())
    assert media_type == "application/json"
    parsed = Transcription.model_validate_json(body)
    assert parsed.text == "Hello there. Bye."
    assert parsed.usage is not None and parsed.usage.type == "duration"
    assert render(TRANSCRIPT, SpeechRequest(response_format="vtt"))[0].startswith(b"WEBVTT\n")


def test_verbose_json_matches_the_client_types() -> None:
    with_words = verbose_json(TRANSCRIPT, words=True)
    verbose = TranscriptionVerbose.model_validate(with_words)
    assert verbose.language == "english" and verbose.duration == 4.251
    assert [w.word for w in verbose.words or []] == ["Hello", "there.", "Bye."]
    assert verbose.segments is not None and verbose.segments[0].tokens[0] == 50363
    assert verbose.usage is not None and verbose.usage.seconds == 4.251
    assert "words" not in verbose_json(TRANSCRIPT, words=False)
    translated = Transcript(task="translate", language="fr", duration=1.0,
                            segments=TRANSCRIPT.segments)
    translation = TranslationVerbose.model_validate(verbose_json(translated, words=False))
    assert translation.language == "english"


@dataclass
class FakeEngine:
    multilingual: bool = False
    heard: int = 0

    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript:
        self.heard = len(audio)
        return Transcript(task=request.task, language="en", duration=len(audio) / 16000,
                          segments=(seg(0, 0.0, 1.0, " fake"),))


def test_transcribe_file_decodes_then_runs_the_engine(audio_dir: Path) -> None:
    pytest.importorskip("faster_whisper")
    engine = FakeEngine()
    path = audio_dir / "sentence0.wav"
    transcript = transcribe_file(engine, path, SpeechRequest())
    assert abs(engine.heard / 16000 - wav_duration(path)) < 0.01
    assert transcript.text == "fake"
    for name in ("empty.wav", "header-only.wav", "notes.txt"):
        with pytest.raises(InvalidRequest) as err:
            transcribe_file(engine, audio_dir / name, SpeechRequest())
        assert err.value.param == "file"


class BrokenEngine(FakeEngine):
    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript:
        raise RuntimeError("out of memory")


def test_engine_failure_is_a_500_envelope_and_the_app_in_process(audio_dir: Path) -> None:
    pytest.importorskip("faster_whisper")
    wav = (audio_dir / "sentence0.wav").read_bytes()
    app = build_app(FakeEngine(), "fake-whisper")
    with TestClient(app) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "fake-whisper"
        resp = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)},
                         data={"response_format": "text"})
        assert resp.text == "fake\n" and "x-audio-seconds" in resp.headers
        assert http.get("/nowhere").json()["error"]["type"] == "invalid_request_error"
    with TestClient(build_app(BrokenEngine(), "broken"), raise_server_exceptions=False) as http:
        resp = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav)})
        assert resp.status_code == 500
        assert resp.json()["error"]["type"] == "server_error"
        assert "out of memory" in resp.json()["error"]["message"]


def test_word_error_rate() -> None:
    assert normalize_words("It's 5 o'clock, Dr. Smith!") == ["it's", "5", "o'clock", "dr", "smith"]
    assert word_error_rate("The cat sat.", "the cat sat") == 0
    assert word_error_rate("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert word_error_rate("a b c", "a x c d") == pytest.approx(2 / 3)
    assert word_error_rate("", "") == 0
    assert word_error_rate("a b", "") == 1


# --------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sentences one by one, a two-voice recording of all of them, and broken files."""
    if not have_espeak():
        pytest.skip("needs espeak-ng")
    root = tmp_path_factory.mktemp("audio")
    for i, sentence in enumerate(SENTENCES):
        speak(sentence, root / f"sentence{i}.wav", speed=SPEED)
    turns = [speak(s, root / f"turn{i}.wav", voice=VOICES[i % 2], speed=SPEED)
             for i, s in enumerate(SENTENCES)]
    spans = concat_wavs(turns, root / "talk.wav", gap_seconds=1.0, lead_seconds=0.3)
    (root / "talk.spans").write_text("\n".join(f"{a} {b}" for a, b in spans))
    silence(root / "silence.wav", 3.0)
    (root / "empty.wav").write_bytes(b"")
    whole = (root / "talk.wav").read_bytes()
    (root / "header-only.wav").write_bytes(whole[:44])
    # The header still announces the whole: a download or an upload cut short.
    (root / "half.wav").write_bytes(whole[:len(whole) // 2])
    (root / "notes.txt").write_text("This is a text file, not audio.\n" * 20)
    return root


def talk_spans(audio_dir: Path) -> list[tuple[float, float]]:
    lines = (audio_dir / "talk.spans").read_text().splitlines()
    return [(float(a), float(b)) for a, b in (line.split() for line in lines)]


# --------------------------------------------------------------------------- the worker


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m modelhost.workers.apps.speech` as the gateway starts it, on a free port."""
    if importlib.util.find_spec("faster_whisper") is None:
        pytest.skip("needs faster-whisper (pip install 'modelhost[speech]')")
    try:
        model = embedded_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    log = tmp_path_factory.mktemp("speech-worker") / "worker.log"
    with worker_app("speech", "--model", str(model), "--served-name", SERVED,
                    "--device", "cpu", log=log) as app:
        yield app.url


@pytest.fixture(scope="module")
def client(worker: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=worker + "/v1", api_key="unused", max_retries=0,
                       timeout=180) as client:
        yield client


def transcribe(client: openai.OpenAI, path: Path, **kwargs: Any) -> Any:
    with path.open("rb") as f:
        return client.audio.transcriptions.create(model=SERVED, file=f, **kwargs)


def test_models_and_health(worker: str, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models] == [SERVED]
    card = models.data[0].model_dump()
    assert card["multilingual"] is False and card["device"] == "cpu"
    assert card["compute_type"] == "int8"
    assert httpx.get(worker + "/health").json()["status"] == "ok"


def test_known_sentences_word_error_rate(client: openai.OpenAI, audio_dir: Path) -> None:
    errors = words = 0.0
    for i, sentence in enumerate(SENTENCES):
        text = transcribe(client, audio_dir / f"sentence{i}.wav").text
        wer = word_error_rate(sentence, text)
        print(f"WER {wer:5.1%}  {sentence!r} -> {text!r}")
        assert wer <= 0.5, f"{sentence!r} heard as {text!r}"  # no sentence is lost
        n = len(normalize_words(sentence))
        errors += wer * n
        words += n
    total = errors / words
    print(f"tiny.en word error rate over {len(SENTENCES)} espeak-ng sentences "
          f"({int(words)} words): {total:.1%}")
    assert total <= MAX_WER


def test_json_is_the_client_type(client: openai.OpenAI, audio_dir: Path) -> None:
    with (audio_dir / "sentence0.wav").open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=f)  # an alias: the worker serves its one model
    assert raw.headers["content-type"] == "application/json"
    result = Transcription.model_validate_json(raw.content)
    assert word_error_rate(SENTENCES[0], result.text) <= MAX_WER
    assert result.usage is not None and result.usage.type == "duration"
    assert result.usage.seconds == pytest.approx(wav_duration(audio_dir / "sentence0.wav"),
                                                 abs=0.01)


def test_text(client: openai.OpenAI, audio_dir: Path) -> None:
    text = transcribe(client, audio_dir / "sentence1.wav", response_format="text")
    assert isinstance(text, str)
    assert word_error_rate(SENTENCES[1], text) <= MAX_WER
    assert not text.lstrip().startswith("{")


@pytest.mark.parametrize("suffix", [".mp3", ".flac", ".ogg", ".m4a"])
def test_other_formats(client: openai.OpenAI, audio_dir: Path, suffix: str) -> None:
    path = encode(audio_dir / "sentence3.wav", audio_dir / f"sentence3{suffix}")
    assert word_error_rate(SENTENCES[3], transcribe(client, path).text) <= MAX_WER


def parse_srt(srt: str) -> list[tuple[float, float, str]]:
    """Strict: numbered 1..n, one blank line between cues, every cue well formed."""
    assert srt.endswith("\n")
    cues = []
    for n, block in enumerate(srt.strip("\n").split("\n\n"), start=1):
        match = SRT_CUE.fullmatch(block)
        assert match, f"malformed SRT cue: {block!r}"
        g = match.groups()
        assert int(g[0]) == n
        cues.append((_secs(*g[1:5]), _secs(*g[5:9]), g[9]))
    return cues


def parse_vtt(vtt: str) -> list[tuple[float, float, str]]:
    assert vtt.startswith("WEBVTT\n\n")
    body = vtt[len("WEBVTT\n\n"):].strip("\n")
    cues = []
    for block in body.split("\n\n") if body else []:
        match = VTT_CUE.fullmatch(block)
        assert match, f"malformed WebVTT cue: {block!r}"
        g = match.groups()
        cues.append((_secs(*g[0:4]), _secs(*g[4:8]), g[8]))
    return cues


def _secs(h: str, m: str, s: str, ms: str) -> float:
    assert int(m) < 60 and int(s) < 60
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def check_cues(cues: list[tuple[float, float, str]], duration: float) -> None:
    assert len(cues) >= 4  # eight sentences with pauses between them
    for (start, end, _), (next_start, next_end, _) in itertools.pairwise(cues):
        assert start <= next_start and end <= next_end
    for start, end, text in cues:
        assert 0 <= start <= end <= duration + 0.5
        assert text.strip() == text and text
    heard = " ".join(text for _, _, text in cues)
    assert word_error_rate(" ".join(SENTENCES), heard) <= MAX_WER


def test_srt(client: openai.OpenAI, audio_dir: Path) -> None:
    srt = transcribe(client, audio_dir / "talk.wav", response_format="srt")
    check_cues(parse_srt(srt), wav_duration(audio_dir / "talk.wav"))


def test_vtt(client: openai.OpenAI, audio_dir: Path) -> None:
    vtt = transcribe(client, audio_dir / "talk.wav", response_format="vtt")
    check_cues(parse_vtt(vtt), wav_duration(audio_dir / "talk.wav"))


def test_verbose_json_with_words(client: openai.OpenAI, audio_dir: Path) -> None:
    path = audio_dir / "talk.wav"
    duration = wav_duration(path)
    with path.open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model=SERVED, file=f, response_format="verbose_json",
            timestamp_granularities=["word", "segment"])
    assert float(raw.headers["x-audio-seconds"]) == pytest.approx(duration, abs=0.01)
    verbose = TranscriptionVerbose.model_validate_json(raw.content)
    assert verbose.language == "english"
    assert verbose.duration == pytest.approx(duration, abs=0.01)
    print(f"two-voice recording ({duration:.1f} s): WER "
          f"{word_error_rate(' '.join(SENTENCES), verbose.text):.1%}")
    assert word_error_rate(" ".join(SENTENCES), verbose.text) <= MAX_WER
    segments = verbose.segments or []
    assert len(segments) >= 4
    assert [s.id for s in segments] == list(range(len(segments)))
    for s in segments:
        assert 0 <= s.start <= s.end <= duration + 0.5 and s.tokens and s.text.strip()
    words = verbose.words or []
    assert word_error_rate(" ".join(SENTENCES), " ".join(w.word for w in words)) <= MAX_WER
    for w, after in itertools.pairwise(words):
        assert w.start <= w.end <= after.start + 1e-6
    # The words lie where the sentences were spoken (the silences between are 1 s).
    spans = talk_spans(audio_dir)
    inside = [w for w in words
              if any(a - 0.5 <= (w.start + w.end) / 2 <= b + 0.5 for a, b in spans)]
    assert len(inside) >= 0.9 * len(words)


def test_verbose_json_has_no_words_unless_asked(client: openai.OpenAI,
                                                audio_dir: Path) -> None:
    with (audio_dir / "sentence2.wav").open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            model=SERVED, file=f, response_format="verbose_json")
    verbose = TranscriptionVerbose.model_validate_json(raw.content)
    assert verbose.words is None and verbose.segments
    assert word_error_rate(SENTENCES[2], verbose.text) <= MAX_WER


def test_language_prompt_and_temperature(client: openai.OpenAI, audio_dir: Path) -> None:
    path = audio_dir / "sentence4.wav"
    assert word_error_rate(SENTENCES[4], transcribe(client, path, language="en").text) <= 0.3
    prompted = transcribe(client, path, prompt="My brother lives near the river.")
    assert word_error_rate(SENTENCES[4], prompted.text) <= 0.3
    # A temperature above 0 is where whisper's fallback starts: every segment used >= 0.6.
    hot = transcribe(client, path, temperature=0.6, response_format="verbose_json")
    assert hot.segments and all(s.temperature >= 0.6 - 1e-6 for s in hot.segments)


def test_other_language_on_an_english_only_model(client: openai.OpenAI,
                                                 audio_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, audio_dir / "sentence0.wav", language="fr")
    assert err.value.param == "language"
    assert "English-only" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, audio_dir / "sentence0.wav", language="klingon")
    assert err.value.param == "language"


# openai 3 marks translations.create deprecated (OpenAI retires whisper-1); the route stays.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_translation_of_english_is_its_transcript(client: openai.OpenAI,
                                                  audio_dir: Path) -> None:
    """tiny.en has no translate task; it hears only English, whose English text is the
    transcript (whisper-1 also answers English audio with its transcript), so it serves it."""
    path = audio_dir / "sentence5.wav"
    with path.open("rb") as f:
        result = client.audio.translations.create(model=SERVED, file=f)
    assert isinstance(result, Translation)
    assert word_error_rate(SENTENCES[5], result.text) <= MAX_WER
    with path.open("rb") as f:
        raw = client.audio.translations.with_raw_response.create(
            model=SERVED, file=f, response_format="verbose_json")
    verbose = TranslationVerbose.model_validate_json(raw.content)
    assert verbose.language == "english" and verbose.segments
    assert raw.http_response.json()["task"] == "translate"
    assert "x-audio-seconds" in raw.headers


def test_silence_gives_little_or_no_text(client: openai.OpenAI, audio_dir: Path) -> None:
    result = transcribe(client, audio_dir / "silence.wav", response_format="verbose_json")
    assert result.duration == pytest.approx(3.0, abs=0.01)
    assert len(result.text.split()) <= 3


def test_x_audio_seconds(worker: str, audio_dir: Path) -> None:
    path = audio_dir / "sentence6.wav"
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        resp = post(worker, path, response_format=fmt)
        assert resp.status_code == 200, resp.text
        assert float(resp.headers["x-audio-seconds"]) == pytest.approx(wav_duration(path),
                                                                       abs=0.01)


def post(worker: str, path: Path | None, *, endpoint: str = "transcriptions",
         content: bytes | None = None, extra: dict[str, str] | None = None,
         **data: str | list[str]) -> httpx.Response:
    """A raw multipart request, for what the typed client will not send."""
    body = content if content is not None else path.read_bytes() if path else None
    files = {"file": (path.name if path else "audio.wav", body, "audio/wav")} \
        if body is not None else None
    return httpx.post(f"{worker}/v1/audio/{endpoint}",
                      data={"model": SERVED, **data, **(extra or {})},
                      files=files, timeout=180)


def assert_error(resp: httpx.Response, param: str | None) -> dict[str, Any]:
    assert resp.status_code == 400, resp.text
    error = cast(dict[str, Any], resp.json()["error"])
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    return error


def test_empty_file(client: openai.OpenAI, audio_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, audio_dir / "empty.wav")
    assert err.value.param == "file" and err.value.code == "empty_file"


def test_header_only_wav(client: openai.OpenAI, audio_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, audio_dir / "header-only.wav")
    assert err.value.param == "file"


def test_wav_cut_in_half_transcribes_what_is_there(worker: str, audio_dir: Path) -> None:
    resp = post(worker, audio_dir / "half.wav", response_format="verbose_json")
    assert resp.status_code in (200, 400), resp.text  # never a 500
    if resp.status_code == 200:
        verbose = TranscriptionVerbose.model_validate_json(resp.content)
        full = wav_duration(audio_dir / "talk.wav")
        assert verbose.duration == pytest.approx(full / 2, abs=0.05)
        # The first half holds the first four sentences.
        assert talk_spans(audio_dir)[3][1] < full / 2 < talk_spans(audio_dir)[4][0]
        assert word_error_rate(" ".join(SENTENCES[:4]), verbose.text) <= MAX_WER


def test_text_file_is_not_audio(client: openai.OpenAI, audio_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, audio_dir / "notes.txt")
    assert err.value.param == "file"
    # FFmpeg may read text as a video (its `tty` demuxer) or not at all: either way, no audio.
    assert "not audio" in err.value.message
    assert str(audio_dir) not in err.value.message and "/tmp" not in err.value.message


def test_random_bytes_are_not_audio(worker: str) -> None:
    assert_error(post(worker, None, content=bytes(range(256)) * 64), "file")


def test_wrong_response_format(client: openai.OpenAI, audio_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        transcribe(client, audio_dir / "sentence0.wav", response_format=cast(Any, "xml"))
    assert err.value.param == "response_format"


def test_missing_file_and_bad_fields(worker: str, audio_dir: Path) -> None:
    assert_error(post(worker, None), "file")
    resp = httpx.post(f"{worker}/v1/audio/transcriptions", data={"file": "not a file"})
    assert_error(resp, "file")
    path = audio_dir / "sentence0.wav"
    assert_error(post(worker, path, temperature="2"), "temperature")
    assert_error(post(worker, path, extra={"timestamp_granularities[]": "char"}),
                 "timestamp_granularities")
    resp = httpx.post(f"{worker}/v1/audio/transcriptions", json={"model": SERVED})
    assert_error(resp, "file")


def test_fields_the_worker_ignores(worker: str, audio_dir: Path) -> None:
    """`diarize` (the gateway's), `stream` (whisper-1 ignores it), unknown fields; and the
    granularities spelled without brackets, as some clients send them."""
    resp = post(worker, audio_dir / "sentence7.wav", response_format="verbose_json",
                diarize="true", stream="true", chunking_strategy="auto", something="else",
                timestamp_granularities="word")
    assert resp.status_code == 200, resp.text
    verbose = TranscriptionVerbose.model_validate_json(resp.content)
    assert verbose.words


def test_requests_at_once_are_all_served(client: openai.OpenAI, audio_dir: Path) -> None:
    paths = [audio_dir / f"sentence{i}.wav" for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda p: transcribe(client, p).text, paths))
    for sentence, text in zip(SENTENCES, texts, strict=False):
        assert word_error_rate(sentence, text) <= 0.5
