"""OpenAI's audio form fields to a `SpeechRequest`, and the check that the served model can do
what was asked; InvalidRequest (400, in the OpenAI error shape) when not.

The `model` field is ignored (the worker serves one model; the gateway routes by it), and so
are `stream`, `include[]`, `chunking_strategy` and `diarize` (the gateway diarizes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from modelhost.errors import InvalidRequest
from modelhost.workers.apps.speech.engine import LANGUAGES, SpeechRequest, Task
from modelhost.workers.apps.speech.formats import RESPONSE_FORMATS

GRANULARITIES = ("word", "segment")
_LANGUAGE_BY_NAME = {name: code for code, name in LANGUAGES.items()}


def _last(fields: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    value = values[-1].strip()
    return value or None


def parse_language(value: str) -> str:
    code = value.strip().lower()
    if code in LANGUAGES:
        return code
    if code in _LANGUAGE_BY_NAME:
        return _LANGUAGE_BY_NAME[code]
    raise InvalidRequest(
        f"Invalid language '{value}'. Language parameter must be specified in ISO-639-1 "
        "format (for example 'en' or 'fr').", param="language", code="invalid_language")


def parse_request(task: Task, fields: Mapping[str, Sequence[str]]) -> SpeechRequest:
    """OpenAI's form fields (every value of each) to a request; InvalidRequest when bad."""
    response_format = _last(fields, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"Invalid value '{response_format}' for 'response_format': expected one of "
            f"{', '.join(RESPONSE_FORMATS)}.", param="response_format", code="invalid_value")
    temperature = 0.0
    raw = _last(fields, "temperature")
    if raw is not None:
        try:
            temperature = float(raw)
        except ValueError:
            temperature = math.nan
        if not 0.0 <= temperature <= 1.0:  # also refuses nan
            raise InvalidRequest(
                f"Invalid value '{raw}' for 'temperature': expected a number between 0 and 1.",
                param="temperature", code="invalid_value")
    raw_language = _last(fields, "language")
    language = parse_language(raw_language) if raw_language else None
    granularities: set[str] = set()
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        for value in fields.get(name, ()):
            for part in value.split(","):
                part = part.strip()
                if not part:
                    continue
                if part not in GRANULARITIES:
                    raise InvalidRequest(
                        f"Invalid value '{part}' for 'timestamp_granularities[]': expected "
                        "'word' or 'segment'.", param="timestamp_granularities",
                        code="invalid_value")
                granularities.add(part)
    return SpeechRequest(task=task, language=language, prompt=_last(fields, "prompt"),
                         temperature=temperature, response_format=response_format,
                         granularities=frozenset(granularities or {"segment"}))


def check_supported(request: SpeechRequest, multilingual: bool, model_name: str,
                    languages: Sequence[str] | None = None) -> None:
    """English-only models (`*.en`) hear English only: another language is refused (the
    client asked for something the model cannot do). A translation is served: its contract is
    "the English text of what was said", and what an English-only model hears is English.
    A model that hears a fixed set of `languages` (Canary: en, de, es, fr) refuses the rest."""
    if languages is not None and request.language is not None \
            and request.language not in languages:
        raise InvalidRequest(
            f"Model '{model_name}' hears {', '.join(languages)} only and cannot transcribe "
            f"{LANGUAGES.get(request.language, request.language)} ('{request.language}'); "
            f"send audio in one of those languages (`language` {' / '.join(languages)}), or "
            "use a Whisper model.", param="language", code="unsupported_language")
    if not multilingual and request.language not in (None, "en"):
        raise InvalidRequest(
            f"Model '{model_name}' is English-only and cannot transcribe "
            f"{LANGUAGES.get(request.language or '', request.language)} "
            f"('{request.language}'); send English audio (language 'en' or none), or use a "
            "multilingual Whisper model.", param="language", code="unsupported_language")
