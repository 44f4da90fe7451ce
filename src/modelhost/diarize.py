"""Diarized transcripts: a verbose_json transcription + diarization turns → speaker labels.

Pure functions, no I/O: the gateway calls them for `diarize=true` on a transcription request,
after it has the transcript (from a speech worker) and the turns (from a diarization worker:
`[{"speaker": "SPEAKER_00", "start": 0.0, "end": 1.2}, ...]`).

The rules (`assign_speakers`):

* **Attribution.** A time span (segment or word) goes to the speaker whose turns overlap it the
  longest (summed over that speaker's turns). A span no turn overlaps (silence, a zero-length
  word, a transcript that runs past the diarization) goes to the nearest turn (smallest gap;
  the earlier turn on a tie). With no turns at all, `speaker` is null.
* **Words.** Words are read from each segment's `words` (faster-whisper's shape) or from the
  top-level `words` (OpenAI's shape with `timestamp_granularities=["word"]`), where a word
  belongs to the segment that holds its midpoint. Every word gets a `speaker` by the rule above.
* **Splitting.** A segment with words is split where the speaker changes between two words,
  but only where both sides are clear: a run of words of one speaker counts when it has at
  least `MIN_SPLIT_WORDS` words *and* spans at least `MIN_SPLIT_SECONDS`; a weaker run (a stray
  word, a short interjection that the diarization can't place reliably) joins its longer
  neighbouring run (and the word keeps its own `speaker`). Each remaining run becomes a segment:
  its text is its words' text, its times are its words' times (the first piece keeps the
  segment's start, the last its end), the decoder statistics (`avg_logprob`, ...) are copied
  and `tokens` emptied (they cannot be split by time). All segments are then renumbered
  (`id` = 0, 1, ...). Unsplit segments keep their text and times; their `speaker` is given by the
  overlap rule.
* **Summary.** `speakers` lists each speaker of the diarization in order of first appearance
  with `speaking_time` (seconds of turns) and `segments` (how many transcript segments it got).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

MIN_SPLIT_WORDS = 2
MIN_SPLIT_SECONDS = 0.5

Turn = tuple[str, float, float]


def _turns(turns: Sequence[Mapping[str, Any]]) -> list[Turn]:
    out: list[Turn] = []
    for turn in turns:
        try:
            start, end = float(turn["start"]), float(turn["end"])
            speaker = str(turn["speaker"])
        except (KeyError, TypeError, ValueError):
            continue  # a malformed turn tells nothing
        if end >= start:
            out.append((speaker, start, end))
    return sorted(out, key=lambda t: (t[1], t[2]))


def speaker_for(start: float, end: float, turns: Sequence[Turn]) -> str | None:
    """The speaker of [start, end]: largest total overlap, else the nearest turn."""
    if not turns:
        return None
    overlap: dict[str, float] = {}
    for speaker, a, b in turns:
        shared = min(end, b) - max(start, a)
        if shared > 0:
            overlap[speaker] = overlap.get(speaker, 0.0) + shared
    if overlap:
        return max(overlap.items(), key=lambda kv: kv[1])[0]  # first of equals: insertion order
    best: tuple[float, str] | None = None
    for speaker, a, b in turns:
        gap = max(a - end, start - b, 0.0)
        if best is None or gap < best[0]:
            best = (gap, speaker)
    assert best is not None
    return best[1]


def _span(item: Mapping[str, Any]) -> tuple[float, float] | None:
    try:
        start, end = float(item["start"]), float(item["end"])
    except (KeyError, TypeError, ValueError):
        return None
    return start, max(start, end)


Run = tuple[str | None, list[dict[str, Any]]]


def _runs(words: list[dict[str, Any]]) -> list[Run]:
    """Consecutive words of one speaker; a weak run joins its longer neighbouring run, whose
    speaker it takes (the words keep their own `speaker`)."""
    runs: list[Run] = []
    for word in words:
        if runs and runs[-1][0] == word.get("speaker"):
            runs[-1][1].append(word)
        else:
            runs.append((word.get("speaker"), [word]))

    def size(run: Run) -> tuple[int, float]:
        return len(run[1]), float(run[1][-1]["end"]) - float(run[1][0]["start"])

    def weak(run: Run) -> bool:
        count, seconds = size(run)
        return count < MIN_SPLIT_WORDS or seconds < MIN_SPLIT_SECONDS

    while len(runs) > 1:
        weakest = [i for i, run in enumerate(runs) if weak(run)]
        if not weakest:
            break
        i = min(weakest, key=lambda k: size(runs[k]))
        left = runs[i - 1] if i > 0 else None
        right = runs[i + 1] if i + 1 < len(runs) else None
        if left is None or (right is not None and size(right) > size(left)):
            assert right is not None
            right[1][:0] = runs[i][1]
        else:
            left[1].extend(runs[i][1])
        del runs[i]
        merged: list[Run] = []
        for run in runs:  # two runs of one speaker may now touch
            if merged and merged[-1][0] == run[0]:
                merged[-1][1].extend(run[1])
            else:
                merged.append(run)
        runs = merged
    return runs


def _join(words: list[dict[str, Any]], like: str) -> str:
    tokens = [str(w.get("word", "")) for w in words]
    if any(t[:1].isspace() for t in tokens):
        text = "".join(tokens)  # faster-whisper's words carry their leading space
    else:
        text = " ".join(t.strip() for t in tokens)
    if like[:1].isspace() and not text[:1].isspace():
        text = " " + text
    return text


def _split(segment: dict[str, Any], words: list[dict[str, Any]],
           nested: bool) -> list[dict[str, Any]]:
    runs = _runs(words)
    if len(runs) < 2:
        return [segment]
    pieces: list[dict[str, Any]] = []
    for k, (speaker, run) in enumerate(runs):
        piece = dict(segment)
        piece["start"] = segment["start"] if k == 0 else run[0]["start"]
        piece["end"] = segment["end"] if k == len(runs) - 1 else run[-1]["end"]
        piece["text"] = _join(run, str(segment.get("text", "")))
        piece["speaker"] = speaker
        if "tokens" in piece:
            piece["tokens"] = []
        if nested:
            piece["words"] = run
        pieces.append(piece)
    return pieces


def assign_speakers(transcript: Mapping[str, Any],
                    turns: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The transcript (OpenAI verbose_json) with `speaker` on every segment and word, segments
    split at clear speaker changes, and a `speakers` summary; the input is not modified."""
    out: dict[str, Any] = copy.deepcopy(dict(transcript))
    clean = _turns(turns)
    segments: list[dict[str, Any]] = [s for s in out.get("segments") or []
                                      if isinstance(s, dict)]
    top_words: list[dict[str, Any]] = [w for w in out.get("words") or [] if isinstance(w, dict)]

    def label(item: dict[str, Any]) -> None:
        span = _span(item)
        item["speaker"] = speaker_for(*span, clean) if span else None

    for word in top_words:
        label(word)
    # Top-level words by segment: the segment holding the word's midpoint (else the nearest).
    by_segment: dict[int, list[dict[str, Any]]] = {}
    spans = [_span(s) for s in segments]
    for word in top_words:
        wspan = _span(word)
        candidates = [(i, sp) for i, sp in enumerate(spans) if sp is not None]
        if wspan is None or not candidates:
            continue
        mid = (wspan[0] + wspan[1]) / 2
        i = min(candidates, key=lambda c: max(c[1][0] - mid, mid - c[1][1], 0.0))[0]
        by_segment.setdefault(i, []).append(word)

    result: list[dict[str, Any]] = []
    for i, segment in enumerate(segments):
        label(segment)
        nested = isinstance(segment.get("words"), list)
        words = [w for w in segment["words"] if isinstance(w, dict)] if nested \
            else by_segment.get(i, [])
        if nested:
            for word in words:
                label(word)
        timed = [w for w in words if _span(w) is not None]
        if clean and _span(segment) is not None and len(timed) == len(words) and timed:
            result.extend(_split(segment, timed, nested))
        else:
            result.append(segment)
    for n, segment in enumerate(result):
        segment["id"] = n
    if "segments" in out:
        out["segments"] = result

    order: dict[str, float] = {}
    for speaker, a, b in clean:
        order[speaker] = order.get(speaker, 0.0) + (b - a)
    counts: dict[str, int] = {}
    for segment in result:
        if segment.get("speaker") is not None:
            counts[segment["speaker"]] = counts.get(segment["speaker"], 0) + 1
    out["speakers"] = [{"speaker": s, "speaking_time": round(t, 3), "segments": counts.get(s, 0)}
                       for s, t in order.items()]
    return out
