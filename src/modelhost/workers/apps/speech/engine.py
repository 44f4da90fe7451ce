"""What a speech engine is given and what it answers: the contract between the speech worker's
HTTP face (app.py) and its engines (whisper.py, canary.py), with no HTTP and no model in it.

An engine takes 16 kHz mono float32 samples and a `SpeechRequest` (what the client asked, as
parsed by requests.py) and answers a `Transcript` (segments, each with its words), which
formats.py renders in OpenAI's response formats. `LANGUAGES` is Whisper's table of languages,
the codes requests and engines speak in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000

Task = Literal["transcribe", "translate"]
Audio = npt.NDArray[np.float32]

# Whisper's languages (ISO-639-1 where one exists), with the names OpenAI answers in
# verbose_json's `language`.
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian",
    "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",
}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float = 1.0


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """What a model heard. `language` is a Whisper code ("en"); `task` is what was asked."""

    task: Task
    language: str
    duration: float
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SpeechRequest:
    task: Task = "transcribe"
    language: str | None = None  # a Whisper code, or None to detect
    prompt: str | None = None
    temperature: float = 0.0
    response_format: str = "json"
    granularities: frozenset[str] = field(default_factory=lambda: frozenset({"segment"}))

    @property
    def words(self) -> bool:
        """Word timestamps are computed only when asked for, and only verbose_json shows them."""
        return "word" in self.granularities and self.response_format == "verbose_json"


# --------------------------------------------------------------------------- engines


class SpeechEngine(Protocol):
    """What the HTTP layer needs from a model: Whisper through faster-whisper, NVIDIA Canary
    through NeMo (canary.py), or a test fake."""

    @property
    def multilingual(self) -> bool: ...

    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript: ...


@runtime_checkable
class LanguageLimited(Protocol):
    """An engine that hears a fixed set of languages (Canary); others are refused with a 400.
    Whisper engines do not have it: they hear Whisper's languages (or English only)."""

    @property
    def languages(self) -> tuple[str, ...]: ...


class LoadedEngine(SpeechEngine, Protocol):
    """A model the worker serves: an engine that also says what it runs on (for the log and
    /v1/models). `whisper.WhisperEngine` and `canary.CanaryEngine`."""

    path: str
    device: str
    compute_type: str


def engine_languages(engine: SpeechEngine) -> tuple[str, ...] | None:
    return engine.languages if isinstance(engine, LanguageLimited) else None
