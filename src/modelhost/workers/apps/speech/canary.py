"""NVIDIA Canary (a NeMo multitask encoder-decoder) behind the speech worker's OpenAI routes.

    python -m modelhost.workers.apps.speech --engine canary --model nvidia/canary-1b-flash \\
        --port N [--device auto|cpu|cuda] [--compute-type auto|float32|bfloat16|float16]
        [--languages en,de,es,fr] [--default-language en] [--chunk-seconds 30] [--no-timestamps]
        [--max-audio-seconds 14400]

`--model` is a `.nemo` file, a folder holding one (what the gateway's Hub cache gives for
`source: {hf: nvidia/canary-1b-flash}`), or a Hub name for NeMo's `from_pretrained`; with
HF_HUB_OFFLINE set a Hub name is looked up in the Hugging Face cache only. `--engine auto`
(the default) picks Canary for a `.nemo` path, a name containing "canary", or a folder with a
`.nemo` file in it (`is_canary_model`).

NeMo is an optional, heavy dependency (`pip install 'nemo_toolkit[asr]'`, PyTorch included)
that is useful only with an NVIDIA GPU: every NeMo and torch call lives in `CanaryEngine` and is
imported lazily through importlib, so this module imports (and type-checks) without them, and
the worker exits at start with `NEMO_MISSING` when they are absent.

What Canary does differently from Whisper, and how the worker maps it:

* It does not detect the language: `source_lang` is the request's `language`, else
  `--default-language` (en). Only `--languages` (Canary Flash: en, de, es, fr) are accepted;
  others are a 400 on `language` (`requests.check_supported`, through `languages`).
* A transcription is `target_lang == source_lang`; a translation (the OpenAI route's contract is
  English text) is `target_lang = "en"`. Punctuation and capitals are always asked for.
* `prompt` and `temperature` have no Canary equivalent and are ignored (decoding is the model's
  own, greedy for the Flash models).
* Timestamps (Flash and later) come as `hypothesis.timestamp["word" | "segment"]` entries with
  `start` / `end` seconds, or only `start_offset` / `end_offset` encoder frames (window stride x
  subsampling: 80 ms for Canary). `to_transcript` turns them into the worker's segments and
  words (a pure function: the tests feed it NeMo-shaped objects); a model that gives none
  (canary-1b) answers one segment per chunk, spanning it.
* Canary Flash is trained on utterances of up to 40 s: longer audio is cut into chunks of at
  most `--chunk-seconds` (30), each at its quietest 100 ms in the last 5 s (`split_points`),
  and the chunks' timestamps are shifted to where each chunk starts.
* Uploads are decoded by the speech worker (`app.decode_audio_file`), under its
  `--max-audio-seconds` cap (the gateway passes settings.max_audio_seconds): longer audio is a
  413 before it is decoded, so NeMo never sees more than the cap (audio_input.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import tempfile
import threading
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelhost.workers.apps.speech.engine import (
    LANGUAGES,
    SAMPLE_RATE,
    Audio,
    Segment,
    SpeechRequest,
    Task,
    Transcript,
    Word,
)

log = logging.getLogger("modelhost.speech.canary")

NEMO_MISSING = ("NVIDIA Canary needs NeMo: pip install 'nemo_toolkit[asr]' (and an NVIDIA GPU "
                "for useful speed)")
CANARY_LANGUAGES = ("en", "de", "es", "fr")
# NeMo's AED timestamps are encoder frames: a 10 ms window stride x 8 (FastConformer's
# subsampling). Read from the model when it says; this is Canary's.
FRAME_SECONDS = 0.08
CHUNK_SECONDS = 30.0
SPLIT_SEARCH_SECONDS = 5.0
SENTENCE_END = (".", "?", "!")  # where NeMo ends a timestamp segment
COMPUTE_TYPES = ("float32", "bfloat16", "float16")
_TIMESTAMP_TOKEN = re.compile(r"<\|\d+\|>")
_OFFLINE_VALUES = frozenset({"1", "on", "yes", "true"})


class NemoMissing(RuntimeError):
    """NeMo (nemo_toolkit[asr]) is not installed in this environment."""

    def __init__(self) -> None:
        super().__init__(NEMO_MISSING)


# --------------------------------------------------------------------------- choosing


def nemo_installed() -> bool:
    return importlib.util.find_spec("nemo") is not None


def is_canary_model(model: str | None) -> bool:
    """A `.nemo` file, a name or path mentioning "canary", or a folder holding a `.nemo`."""
    if not model:
        return False
    if model.lower().endswith(".nemo") or "canary" in model.lower():
        return True
    path = Path(model).expanduser()
    return path.is_dir() and any(path.glob("*.nemo"))


@dataclass(frozen=True)
class ModelRef:
    """What NeMo loads: a `.nemo` file (`restore_from`) or a Hub name (`from_pretrained`)."""

    kind: Literal["file", "hub"]
    value: str


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


def _nemo_in(folder: Path, label: str) -> Path:
    found = sorted(folder.glob("*.nemo"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{label}: no .nemo file in this folder")
    raise ValueError(f"{label}: several .nemo files ({', '.join(p.name for p in found)}); "
                     "point --model at one of them")


def cached_hub_model(repo: str, cache_dir: Path | None = None) -> Path:
    """The `.nemo` file of a Hub repository already in the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(repo, local_files_only=True, cache_dir=cache_dir)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set (download it "
            "first, or give --model a .nemo file)") from None
    return _nemo_in(Path(snapshot), repo)


def resolve_canary_model(model: str, offline: bool | None = None,
                         cache_dir: Path | None = None) -> ModelRef:
    path = Path(model).expanduser()
    if path.is_file():
        return ModelRef("file", str(path))
    if path.is_dir():
        return ModelRef("file", str(_nemo_in(path, model)))
    if path.is_absolute() or model.startswith((".", "~")) or model.lower().endswith(".nemo"):
        raise FileNotFoundError(f"{model}: no such .nemo file or folder")
    if hub_offline() if offline is None else offline:
        return ModelRef("file", str(cached_hub_model(model, cache_dir)))
    return ModelRef("hub", model)


def parse_languages(value: str | Sequence[str]) -> tuple[str, ...]:
    """`en,de,es,fr` (or a list) to Whisper codes, in order, each once; ValueError when bad."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for part in parts:
        code = part.strip().lower()
        if not code:
            continue
        if code not in LANGUAGES:
            raise ValueError(f"unknown language code '{part.strip()}'")
        if code not in out:
            out.append(code)
    if not out:
        raise ValueError("no language given")
    return tuple(out)


def check_languages(languages: str | Sequence[str], default: str) -> tuple[tuple[str, ...], str]:
    """(`--languages`, `--default-language`), checked: the default must be one of them."""
    heard = parse_languages(languages)
    first = parse_languages(default)[0]
    if first not in heard:
        raise ValueError(f"--default-language {first} is not one of --languages "
                         f"{','.join(heard)}")
    return heard, first


def resolve_device(device: str, cuda_available: bool) -> str:
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise RuntimeError("--device cuda, but PyTorch sees no CUDA GPU")
    return device


def resolve_compute_type(compute_type: str, device: str) -> str:
    """auto is float32 (what NeMo runs by default); bfloat16 / float16 autocast on a GPU."""
    if compute_type in ("auto", "default"):
        return "float32"
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"--compute-type {compute_type}: Canary runs "
                         f"{', '.join(COMPUTE_TYPES)} (or auto)")
    if compute_type != "float32" and device != "cuda":
        raise ValueError(f"--compute-type {compute_type} needs --device cuda")
    return compute_type


# --------------------------------------------------------------------------- prompts


def prompt_languages(request: SpeechRequest, default: str) -> tuple[str, str]:
    """(source_lang, target_lang): translation is into English; transcription keeps it."""
    source = request.language or default
    return source, "en" if request.task == "translate" else source


def prompt_kwargs(source: str, target: str, timestamps: bool,
                  prompt_format: str) -> dict[str, Any]:
    """Keyword arguments of NeMo's `transcribe` for one request. The `canary2` prompt (Flash,
    1b-v2) infers the task from the languages and takes `timestamps`; the first Canary's
    `canary` prompt names the task and has no timestamps. Slot values are strings: NeMo maps
    "yes" to `<|pnc|>`, and would map a bool True to `<|nopnc|>`."""
    kwargs: dict[str, Any] = {"source_lang": source, "target_lang": target, "pnc": "yes"}
    if prompt_format == "canary":
        kwargs["task"] = "asr" if source == target else "s2t_translation"
    elif timestamps:
        kwargs["timestamps"] = True
    return kwargs


# --------------------------------------------------------------------------- hypotheses


def first_hypothesis(result: Any) -> Any:
    """The best hypothesis of the one file sent, whichever shape this NeMo returns: a list of
    Hypothesis (2.x), a (best, all) tuple (1.x), or lists of beams; None when empty."""
    if isinstance(result, tuple):
        result = result[0] if result else None
    while isinstance(result, list):
        result = result[0] if result else None
    return result


def hypothesis_text(hyp: Any) -> str:
    text = hyp if isinstance(hyp, str) else getattr(hyp, "text", "")
    return " ".join(_TIMESTAMP_TOKEN.sub(" ", str(text or "")).split())


def _stamps(hyp: Any, kind: str) -> list[Mapping[str, Any]]:
    timestamp = getattr(hyp, "timestamp", None)
    if not isinstance(timestamp, Mapping):
        return []
    entries = timestamp.get(kind)
    if not isinstance(entries, list | tuple):
        return []
    return [e for e in entries if isinstance(e, Mapping)]


def _time(entry: Mapping[str, Any], key: str, frame_seconds: float) -> float | None:
    """`start` / `end` in seconds, else `start_offset` / `end_offset` in encoder frames."""
    value = entry.get(key)
    if value is None and entry.get(f"{key}_offset") is not None:
        value = float(entry[f"{key}_offset"]) * frame_seconds
    if value is None:
        return None
    seconds = float(value)
    return seconds if np.isfinite(seconds) else None


def _span(entry: Mapping[str, Any], frame_seconds: float, offset: float,
          duration: float) -> tuple[float, float] | None:
    start, end = _time(entry, "start", frame_seconds), _time(entry, "end", frame_seconds)
    if start is None or end is None:
        return None
    start = min(max(start, 0.0), duration)
    end = min(max(end, start), duration)
    return offset + start, offset + end


def hypothesis_words(hyp: Any, *, offset: float = 0.0, duration: float = float("inf"),
                     frame_seconds: float = FRAME_SECONDS) -> list[Word]:
    """The hypothesis' word timestamps as the worker's words (" word", Whisper's spacing),
    within [0, duration] of the chunk and shifted by `offset`; entries without a time or a
    word are left out."""
    words: list[Word] = []
    for entry in _stamps(hyp, "word"):
        text = " ".join(str(entry.get("word") or "").split())
        span = _span(entry, frame_seconds, offset, duration)
        if text and span is not None:
            words.append(Word(word=" " + text, start=span[0], end=span[1]))
    return words


def _segment(index: int, start: float, end: float, text: str,
             words: Sequence[Word]) -> Segment:
    return Segment(id=index, start=start, end=end, text=" " + " ".join(text.split()),
                   words=tuple(words))


def _sentences(words: Sequence[Word], first_id: int) -> list[Segment]:
    """Words grouped into sentences, as NeMo cuts its segments (after . ? !)."""
    segments: list[Segment] = []
    group: list[Word] = []
    for i, word in enumerate(words):
        group.append(word)
        if word.word.strip().endswith(SENTENCE_END) or i == len(words) - 1:
            segments.append(_segment(first_id + len(segments), group[0].start, group[-1].end,
                                     " ".join(w.word.strip() for w in group), group))
            group = []
    return segments


def _words_by_time(words: Sequence[Word], spans: Sequence[tuple[float, float]]
                   ) -> list[list[Word]]:
    """Each word to the first segment (in order) whose end is not before the word's middle."""
    out: list[list[Word]] = [[] for _ in spans]
    k = 0
    for word in words:
        middle = (word.start + word.end) / 2
        while k < len(spans) - 1 and middle > spans[k][1] + 1e-6:
            k += 1
        out[k].append(word)
    return out


def hypothesis_segments(hyp: Any, *, offset: float = 0.0, duration: float,
                        frame_seconds: float = FRAME_SECONDS, first_id: int = 0
                        ) -> list[Segment]:
    """One chunk's hypothesis (NeMo's Hypothesis, or anything with its `text` and `timestamp`
    attributes) as the worker's segments, numbered from `first_id`, shifted by `offset`.

    NeMo's segment entries ({"segment", "start", "end", ...}) become segments, given their
    words (by count: NeMo joins a segment's words with spaces; by time if the counts
    disagree); word entries alone are grouped into sentences; a hypothesis without timestamps
    is one segment spanning the chunk."""
    if hyp is None:
        return []
    words = hypothesis_words(hyp, offset=offset, duration=duration, frame_seconds=frame_seconds)
    raw: list[tuple[str, float, float]] = []
    for entry in _stamps(hyp, "segment"):
        text = " ".join(str(entry.get("segment") or "").split())
        span = _span(entry, frame_seconds, offset, duration)
        if text and span is not None:
            raw.append((text, *span))
    if raw:
        counts = [len(text.split()) for text, _, _ in raw]
        if sum(counts) == len(words):
            groups, k = [], 0
            for n in counts:
                groups.append(words[k:k + n])
                k += n
        else:
            groups = _words_by_time(words, [(s, e) for _, s, e in raw])
        return [_segment(first_id + i, start, end, text, group)
                for i, ((text, start, end), group) in enumerate(zip(raw, groups, strict=True))]
    if words:
        return _sentences(words, first_id)
    text = hypothesis_text(hyp)
    return [_segment(first_id, offset, offset + duration, text, ())] if text else []


def to_transcript(parts: Sequence[tuple[float, float, Any]], *, task: Task, language: str,
                  duration: float, frame_seconds: float = FRAME_SECONDS) -> Transcript:
    """The hypotheses of a file's chunks, each as (chunk start s, chunk length s, hypothesis),
    as one transcript."""
    segments: list[Segment] = []
    for offset, length, hyp in parts:
        segments += hypothesis_segments(hyp, offset=offset, duration=length,
                                        frame_seconds=frame_seconds, first_id=len(segments))
    return Transcript(task=task, language=language, duration=duration,
                      segments=tuple(segments))


# --------------------------------------------------------------------------- audio


def split_points(audio: Audio, max_seconds: float = CHUNK_SECONDS,
                 search_seconds: float = SPLIT_SEARCH_SECONDS,
                 rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """Sample ranges of at most `max_seconds` covering `audio` end to end, each cut in the
    middle of the quietest 100 ms of its last `search_seconds` (0: one range)."""
    total = int(audio.shape[0])
    limit = int(max_seconds * rate)
    if max_seconds <= 0 or total <= limit:
        return [(0, total)]
    frame = max(1, rate // 10)
    search = max(frame, min(int(search_seconds * rate), limit - frame))
    bounds: list[tuple[int, int]] = []
    start = 0
    while total - start > limit:
        lo = start + limit - search
        n = search // frame
        window = audio[lo:lo + n * frame].astype(np.float64).reshape(n, frame)
        cut = lo + int(np.argmin((window ** 2).mean(axis=1))) * frame + frame // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, total))
    return bounds


def write_wav(path: Path, audio: Audio, rate: int = SAMPLE_RATE) -> Path:
    """16-bit mono PCM WAV, the input every NeMo version reads."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


# --------------------------------------------------------------------------- NeMo


def _nemo_asr() -> Any:
    try:
        return importlib.import_module("nemo.collections.asr")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "nemo":
            raise NemoMissing() from None
        raise


def _frame_seconds(model: Any) -> float:
    try:
        stride = float(model.cfg.preprocessor.window_stride)
        factor = int(model.encoder.subsampling_factor)
    except Exception:  # another layout: Canary's default
        return FRAME_SECONDS
    return stride * factor if stride > 0 and factor > 0 else FRAME_SECONDS


class CanaryEngine:
    """A loaded NeMo Canary model (`CanaryEngine.load`) as a speech engine; torch and NeMo stay
    inside this class. Requests are served one at a time (NeMo's `transcribe` reconfigures the
    model while it runs). The constructor wraps a model already loaded (or a test's stand-in
    with NeMo's `transcribe`)."""

    def __init__(self, nemo_model: Any, *, path: str = "", device: str = "cpu",
                 compute_type: str = "float32", languages: str | Sequence[str] = CANARY_LANGUAGES,
                 default_language: str = "en", chunk_seconds: float = CHUNK_SECONDS,
                 timestamps: bool = True, torch: Any = None) -> None:
        self._languages, self.default_language = check_languages(languages, default_language)
        self._model = nemo_model
        self._torch = torch
        self.path = path
        self.device = device
        self.compute_type = compute_type
        self.chunk_seconds = chunk_seconds
        self.timestamps = timestamps
        self.frame_seconds = _frame_seconds(nemo_model)
        self.prompt_format = str(getattr(nemo_model, "prompt_format", "") or "")
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, device: str = "auto", compute_type: str = "auto",
             threads: int = 0, languages: str | Sequence[str] = CANARY_LANGUAGES,
             default_language: str = "en", chunk_seconds: float = CHUNK_SECONDS,
             timestamps: bool = True) -> CanaryEngine:
        """`ASRModel.restore_from` (a .nemo file) or `.from_pretrained` (a Hub name), on the
        GPU CUDA_VISIBLE_DEVICES leaves as index 0, or on the CPU. NemoMissing without NeMo."""
        check_languages(languages, default_language)  # before minutes of loading
        nemo_asr = _nemo_asr()
        torch = importlib.import_module("torch")
        ref = resolve_canary_model(model)
        device = resolve_device(device, bool(torch.cuda.is_available()))
        compute_type = resolve_compute_type(compute_type, device)
        if threads > 0:
            torch.set_num_threads(threads)
        if device == "cuda":
            # CUDA_VISIBLE_DEVICES (set by the gateway) makes the pinned GPU index 0 here.
            torch.cuda.set_device(0)
        location = torch.device("cuda:0" if device == "cuda" else "cpu")
        models = nemo_asr.models.ASRModel
        if ref.kind == "file":
            loaded = models.restore_from(ref.value, map_location=location)
        else:
            loaded = models.from_pretrained(model_name=ref.value, map_location=location)
        loaded.eval()
        return cls(loaded, path=ref.value, device=device, compute_type=compute_type,
                   languages=languages, default_language=default_language,
                   chunk_seconds=chunk_seconds, timestamps=timestamps, torch=torch)

    @property
    def multilingual(self) -> bool:
        return len(self._languages) > 1

    @property
    def languages(self) -> tuple[str, ...]:
        return self._languages

    def transcribe(self, audio: Audio, request: SpeechRequest) -> Transcript:
        source, target = prompt_languages(request, self.default_language)
        parts: list[tuple[float, float, Any]] = []
        with self._lock, tempfile.TemporaryDirectory(prefix="modelhost-canary-") as tmp:
            for i, (a, b) in enumerate(split_points(audio, self.chunk_seconds)):
                wav = write_wav(Path(tmp) / f"chunk{i}.wav", audio[a:b])
                parts.append((a / SAMPLE_RATE, (b - a) / SAMPLE_RATE,
                              self._run(wav, source, target)))
        return to_transcript(parts, task=request.task, language=source,
                             duration=audio.shape[0] / SAMPLE_RATE,
                             frame_seconds=self.frame_seconds)

    def _run(self, wav: Path, source: str, target: str) -> Any:
        try:
            return self._call(wav, prompt_kwargs(source, target, self.timestamps,
                                                 self.prompt_format))
        except (TypeError, ValueError, KeyError, AssertionError) as refused:
            if not self.timestamps:
                raise
            # A checkpoint whose prompt has no timestamp slot? If it answers without them,
            # it is served without them from now on; if not, the first error was the real one.
            try:
                hyp = self._call(wav, prompt_kwargs(source, target, False, self.prompt_format))
            except Exception:
                raise refused from None
            log.warning("the model failed with timestamps (%s) and not without: serving it "
                        "without timestamps (one segment per chunk)", refused)
            self.timestamps = False
            return hyp

    def _call(self, wav: Path, kwargs: dict[str, Any]) -> Any:
        with self._autocast():
            result = self._model.transcribe([str(wav)], batch_size=1, return_hypotheses=True,
                                            verbose=False, **kwargs)
        return first_hypothesis(result)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device == "cuda" and self.compute_type != "float32" and self._torch is not None:
            ctx: contextlib.AbstractContextManager[Any] = self._torch.autocast(
                "cuda", dtype=getattr(self._torch, self.compute_type))
            return ctx
        return contextlib.nullcontext()

