"""A `Transcript` in OpenAI's response formats: json, text, srt, verbose_json, vtt.

Pure functions (no HTTP, no model): `render` gives a response's bytes and media type;
`to_srt` / `to_vtt` / `format_timestamp` are the subtitle formatting, `verbose_json` OpenAI's
TranscriptionVerbose / TranslationVerbose. json and verbose_json bodies carry OpenAI's
`usage: {"type": "duration", "seconds": N}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from modelhost.workers.apps.speech.engine import LANGUAGES, Segment, SpeechRequest, Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

def format_timestamp(seconds: float, decimal: str = ",") -> str:
    """`HH:MM:SS,mmm` (SRT) or, with decimal=".", `HH:MM:SS.mmm` (WebVTT); hours unbounded."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def _cues(segments: Iterable[Segment]) -> list[tuple[float, float, str]]:
    """One cue per segment with text: on one line, never containing the cue arrow, end >= start
    and starts never going back (subtitle players expect both)."""
    cues: list[tuple[float, float, str]] = []
    floor = 0.0
    for seg in segments:
        text = " ".join(seg.text.split()).replace("-->", "->")
        if not text:
            continue
        start = max(seg.start, floor)
        end = max(seg.end, start)
        cues.append((start, end, text))
        floor = start
    return cues


def to_srt(segments: Iterable[Segment]) -> str:
    return "".join(
        f"{i}\n{format_timestamp(start)} --> {format_timestamp(end)}\n{text}\n\n"
        for i, (start, end, text) in enumerate(_cues(segments), start=1))


def to_vtt(segments: Iterable[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{format_timestamp(start, '.')} --> {format_timestamp(end, '.')}\n{text}\n\n"
        for start, end, text in _cues(segments))


def _seconds(value: float) -> float:
    return round(float(value), 3)


def verbose_json(transcript: Transcript, words: bool) -> dict[str, Any]:
    """OpenAI's TranscriptionVerbose / TranslationVerbose (plus `task`, as whisper-1 sends)."""
    body: dict[str, Any] = {
        "task": transcript.task,
        # A translation is in English whatever was spoken.
        "language": "english" if transcript.task == "translate"
        else LANGUAGES.get(transcript.language, transcript.language),
        "duration": _seconds(transcript.duration),
        "text": transcript.text,
        "segments": [{
            "id": s.id, "seek": s.seek, "start": _seconds(s.start), "end": _seconds(s.end),
            "text": s.text, "tokens": list(s.tokens), "temperature": s.temperature,
            "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob,
        } for s in transcript.segments],
    }
    if words:
        body["words"] = [{"word": w.word.strip(), "start": _seconds(w.start),
                          "end": _seconds(w.end)} for w in transcript.words]
    body["usage"] = usage(transcript)
    return body


def usage(transcript: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": _seconds(transcript.duration)}


def render(transcript: Transcript, request: SpeechRequest) -> tuple[bytes, str]:
    """The body of a response and its media type."""
    fmt = request.response_format
    if fmt == "json":
        return _json({"text": transcript.text, "usage": usage(transcript)}), "application/json"
    if fmt == "verbose_json":
        return _json(verbose_json(transcript, request.words)), "application/json"
    if fmt == "text":
        return (transcript.text + "\n").encode(), "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(transcript.segments).encode(), "application/x-subrip; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(transcript.segments).encode(), "text/vtt; charset=utf-8"
    raise ValueError(f"unknown response format {fmt!r}")


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()
