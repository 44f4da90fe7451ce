"""OpenAI's diarized transcript (`response_format=diarized_json`): its request fields and its
answer, as pure functions (no I/O); api/audio.py asks the workers and calls them.

The shape is OpenAI's `TranscriptionDiarized` (openai-python `types/audio/
transcription_diarized.py`, `transcription_diarized_segment.py`), what `gpt-4o-transcribe-
diarize` answers:

    {"task": "transcribe", "duration": 13.9, "text": "...",
     "segments": [{"type": "transcript.text.segment", "id": "seg_0", "start": 0.4,
                   "end": 3.5, "text": " Good morning ...", "speaker": "A"}, ...],
     "usage": {"type": "duration", "seconds": 13.9}}

and, with `stream=true`, its server-sent events (`transcription_stream_event.py`): for each
segment a `transcript.text.delta` (with its `segment_id`) and a `transcript.text.segment`, then
one `transcript.text.done` with the whole text.

The rules:

* **Speakers.** Labelled as OpenAI labels them: capital letters in order of first appearance
  in the transcript (`A`, `B`, ..., `Z`, `AA`, ...). With known speakers, a diarized speaker
  whose voice matches a reference takes that reference's name (`match_speakers`); the others
  keep letters, given in order of first appearance among them (the first unknown voice is `A`),
  skipping any letter that is also a known name. Segments with no speaker (the diarizer heard
  no speech at all) are one unknown speaker.
* **Known speakers** (`known_speaker_names[]`, `known_speaker_references[]`, as OpenAI
  defines them): as many names as references, at most MAX_KNOWN_SPEAKERS, names non-empty and
  distinct, each reference a base64 `data:` URL of audio between REFERENCE_MIN_SECONDS and
  REFERENCE_MAX_SECONDS long (OpenAI's documented bound is 2-10 s; its server accepts 1.2 s,
  and so does this). A speaker and a reference match when the cosine similarity of their
  voice embeddings is at least the threshold (MATCH_THRESHOLD; the extension field
  `known_speaker_threshold` changes it per request); pairs are taken best first, one name per
  speaker and one speaker per name.
* **chunking_strategy** is validated as OpenAI defines it (`"auto"`, or an object of type
  `server_vad` with `prefix_padding_ms`, `silence_duration_ms`, `threshold`; sent as JSON text
  or, as the openai client sends it, as `chunking_strategy[type]`, ... fields) and otherwise
  has no effect: the local models cut the audio themselves (Whisper in 30 s windows, the
  diarizer by its own voice activity detection), and OpenAI's 30-second limit without it does
  not apply.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from modelhost.errors import InvalidRequest

MAX_KNOWN_SPEAKERS = 4
REFERENCE_MIN_SECONDS = 1.2
REFERENCE_MAX_SECONDS = 10.0
# Cosine similarity of resemblyzer voices (measured with espeak-ng's voices, as in
# tests/test_diarized_json.py): a diarized speaker and another clip of its voice 0.89-0.94,
# other voices 0.54-0.84 (they are all one synthesizer's; people's voices lie further apart).
MATCH_THRESHOLD = 0.8

NAMES = ("known_speaker_names[]", "known_speaker_names")
REFERENCES = ("known_speaker_references[]", "known_speaker_references")
VAD_FIELDS = {"prefix_padding_ms": int, "silence_duration_ms": int, "threshold": float}

Fields = Mapping[str, Sequence[str]]


def _values(fields: Fields, names: Sequence[str]) -> list[str]:
    return [v for name in names for v in fields.get(name, ())]


def known_speaker_names(fields: Fields, reference_count: int) -> list[str]:
    """The names, checked against the number of references (InvalidRequest when they do not
    go together as OpenAI defines them)."""
    names = _values(fields, NAMES)
    if not names and not reference_count:
        return []
    if not reference_count:
        raise InvalidRequest("known_speaker_names[] was given without "
                             "known_speaker_references[]: send one reference audio clip per "
                             "name.", param="known_speaker_references", code="invalid_value")
    if not names:
        raise InvalidRequest("known_speaker_references[] was given without "
                             "known_speaker_names[]: send one name per reference audio clip.",
                             param="known_speaker_names", code="invalid_value")
    if len(names) != reference_count:
        raise InvalidRequest(f"{len(names)} known_speaker_names[] and {reference_count} "
                             "known_speaker_references[] were given: send one reference per "
                             "name.", param="known_speaker_references", code="invalid_value")
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise InvalidRequest(f"{len(names)} known speakers were given; at most "
                             f"{MAX_KNOWN_SPEAKERS} are supported.",
                             param="known_speaker_names", code="invalid_value")
    for i, name in enumerate(names):
        if not name.strip():
            raise InvalidRequest(f"known_speaker_names[{i}] is empty.",
                                 param="known_speaker_names", code="invalid_value")
        if name in names[:i]:
            raise InvalidRequest(f"known_speaker_names[{i}] ('{name[:40]}') is given twice: "
                                 "names must be distinct.", param="known_speaker_names",
                                 code="invalid_value")
    return names


def reference_count(fields: Fields) -> int:
    return len(_values(fields, REFERENCES))


def decode_data_url(value: str, index: int) -> bytes:
    """The bytes of a base64 `data:` URL (`data:audio/wav;base64,...`); InvalidRequest when it
    is not one."""
    where = f"known_speaker_references[{index}]"
    text = value.strip()
    if not text[:5].lower() == "data:":
        raise InvalidRequest(f"{where} is not a data URL: send the audio clip itself, as "
                             "'data:audio/wav;base64,...'.", param="known_speaker_references",
                             code="invalid_value")
    head, comma, payload = text.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise InvalidRequest(f"{where} is not a base64 data URL ('data:<type>;base64,"
                             "<data>').", param="known_speaker_references",
                             code="invalid_value")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where} is not valid base64.",
                             param="known_speaker_references", code="invalid_value") from None
    if not data:
        raise InvalidRequest(f"{where} holds no data.", param="known_speaker_references",
                             code="invalid_value")
    return data


def known_speaker_threshold(fields: Fields) -> float:
    values = fields.get("known_speaker_threshold")
    if not values or not values[-1].strip():
        return MATCH_THRESHOLD
    raw = values[-1].strip()
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise InvalidRequest(f"known_speaker_threshold must be a number between 0 and 1, got "
                             f"'{raw[:40]}'.", param="known_speaker_threshold",
                             code="invalid_value")
    return value


def _chunking_error(detail: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid chunking_strategy: {detail}. Expected 'auto' or an object "
                          "{\"type\": \"server_vad\", \"prefix_padding_ms\": int, "
                          "\"silence_duration_ms\": int, \"threshold\": number between 0 and "
                          "1}.", param="chunking_strategy", code="invalid_value")


def chunking_strategy(fields: Fields) -> str | dict[str, Any] | None:
    """The request's chunking_strategy, checked: None, "auto", or a server_vad object."""
    raw: Any = None
    whole = fields.get("chunking_strategy")
    prefix = "chunking_strategy["
    nested = {name[len(prefix):-1]: values[-1] for name, values in fields.items()
              if name.startswith(prefix) and name.endswith("]") and values}
    if whole and nested:
        raise _chunking_error("given both whole and as chunking_strategy[...] fields")
    if whole:
        text = whole[-1].strip()
        if text in ("", "null"):
            return None
        if text == "auto":
            return "auto"
        try:
            raw = json.loads(text)
        except ValueError:
            raise _chunking_error(f"'{text[:40]}'") from None
        if raw == "auto":
            return "auto"
        if not isinstance(raw, dict):
            raise _chunking_error(f"'{text[:40]}'")
    elif nested:
        raw = dict(nested)
    else:
        return None
    if raw.get("type") != "server_vad":
        raise _chunking_error(f"type must be 'server_vad', not {json.dumps(raw.get('type'))}")
    out: dict[str, Any] = {"type": "server_vad"}
    for key, value in raw.items():
        if key == "type":
            continue
        kind = VAD_FIELDS.get(key)
        if kind is None:
            raise _chunking_error(f"unknown field '{key[:40]}'")
        out[key] = _vad_value(key, value, kind)
    return out


def _vad_value(key: str, value: Any, kind: type) -> int | float:
    try:
        number = float(value)  # from JSON a number, from a form field text
    except (TypeError, ValueError):
        raise _chunking_error(f"{key} must be a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise _chunking_error(f"{key} must be a number")
    if kind is int:
        if not number.is_integer() or number < 0:
            raise _chunking_error(f"{key} must be a whole number of milliseconds, 0 or more")
        return int(number)
    if not 0.0 <= number <= 1.0:
        raise _chunking_error(f"{key} must be between 0 and 1")
    return number


# ----------------------------------------------------------------------------- speakers


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def match_speakers(voices: Mapping[str, Sequence[float]],
                   references: Sequence[tuple[str, Sequence[float]]],
                   threshold: float = MATCH_THRESHOLD) -> dict[str, str]:
    """Diarized speaker → known name: the pairs at or above `threshold`, best first, each
    speaker and each name used once."""
    pairs = sorted(((cosine(vector, ref), speaker, name)
                    for speaker, vector in voices.items() for name, ref in references),
                   key=lambda p: -p[0])
    out: dict[str, str] = {}
    for similarity, speaker, name in pairs:
        if similarity < threshold:
            break
        if speaker not in out and name not in out.values():
            out[speaker] = name
    return out


def letters() -> Iterator[str]:
    """A, B, ..., Z, AA, AB, ...: OpenAI's labels for speakers it does not know."""
    n = 0
    while True:
        label, k = "", n
        while True:
            k, r = divmod(k, 26)
            label = chr(ord("A") + r) + label
            if k == 0:
                break
            k -= 1
        yield label
        n += 1


def speaker_labels(order: Sequence[str | None], names: Mapping[str, str]) -> dict[str | None, str]:
    """Each speaker (in order of first appearance) → its label: its known name, else the next
    letter not taken by a name."""
    taken = set(names.values())
    fresh = (label for label in letters() if label not in taken)
    out: dict[str | None, str] = {}
    for speaker in order:
        if speaker in out:
            continue
        known = names.get(speaker) if speaker is not None else None
        out[speaker] = known if known is not None else next(fresh)
    return out


def _seconds(value: Any) -> float:
    try:
        return round(float(value), 3)
    except (TypeError, ValueError):
        return 0.0


def diarized_json(labelled: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """OpenAI's TranscriptionDiarized from a transcript whose segments carry the diarizer's
    speakers (`diarize.assign_speakers`' answer), with known speakers' `names`."""
    segments = [s for s in labelled.get("segments") or [] if isinstance(s, dict)]
    labels = speaker_labels([s.get("speaker") for s in segments], names)
    duration = _seconds(labelled.get("duration"))
    usage = labelled.get("usage")
    if not (isinstance(usage, dict) and usage.get("type") == "duration"):
        usage = {"type": "duration", "seconds": duration}
    return {
        "task": "transcribe",
        "duration": duration,
        "text": str(labelled.get("text") or ""),
        "segments": [{"type": "transcript.text.segment", "id": f"seg_{i}",
                      "start": _seconds(s.get("start")), "end": _seconds(s.get("end")),
                      "text": str(s.get("text") or ""), "speaker": labels[s.get("speaker")]}
                     for i, s in enumerate(segments)],
        "usage": usage,
    }


def stream_events(body: Mapping[str, Any]) -> bytes:
    """The server-sent events OpenAI streams for a diarized transcript: each segment's
    `transcript.text.delta` and `transcript.text.segment`, then `transcript.text.done`."""
    events: list[dict[str, Any]] = []
    for segment in body["segments"]:
        events.append({"type": "transcript.text.delta", "delta": segment["text"],
                       "segment_id": segment["id"]})
        events.append(dict(segment))
    events.append({"type": "transcript.text.done", "text": body["text"]})
    return b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n"
                    for e in events)
