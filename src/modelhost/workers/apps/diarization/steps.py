"""The pure steps of speaker diarization (numpy and scipy, no model, no HTTP): the turns every
engine answers, the resemblyzer pipeline's voice-activity masks, windows, clustering and
smoothing (engines.py runs them; its docstring says the rule each step follows), and RTTM.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
DEFAULT_MAX_SPEAKERS = 8

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class SpeakerBounds:
    """How many speakers to find: exactly `num`, or between `low` and `high`."""

    num: int | None = None
    low: int = 1
    high: int = DEFAULT_MAX_SPEAKERS


@dataclass(frozen=True)
class Turn:
    speaker: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def mask_to_regions(mask: BoolArray, frame: int) -> list[tuple[int, int]]:
    """Runs of True in a per-frame mask → (start, end) sample indices."""
    padded = np.concatenate(([False], mask.astype(bool), [False]))
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a) * frame, int(b) * frame) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def smooth_vad(flags: BoolArray, average: int = 8, dilation: int = 7) -> BoolArray:
    """resemblyzer's VAD smoothing (moving average, round, binary dilation), kept as a mask."""
    if not len(flags):
        return flags.astype(bool)
    x = flags.astype(np.float64)
    padded = np.concatenate((np.zeros((average - 1) // 2), x, np.zeros(average // 2)))
    csum = np.cumsum(padded)
    csum[average:] = csum[average:] - csum[:-average]
    mask = np.round(csum[average - 1:] / average).astype(bool)
    half = dilation // 2
    out = np.zeros_like(mask)
    for shift in range(-half, dilation - half):
        if shift >= 0:
            out[shift:] |= mask[:len(mask) - shift]
        else:
            out[:shift] |= mask[-shift:]
    return out


def trim_regions(regions: list[tuple[int, int]], flags: BoolArray,
                 frame: int) -> list[tuple[int, int]]:
    """(start, end) frame regions → sample regions trimmed to their first and last True flag
    (regions with no True flag are dropped)."""
    out: list[tuple[int, int]] = []
    for a, b in regions:
        voiced = np.flatnonzero(flags[a:b])
        if len(voiced):
            out.append(((a + int(voiced[0])) * frame, (a + int(voiced[-1]) + 1) * frame))
    return out


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Window starts covering [0, length): every `step`, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def _hierarchy() -> Any:
    # scipy ships no type information: this module's narrow wrappers below are typed.
    return importlib.import_module("scipy.cluster.hierarchy")


def _cut(tree: Any, value: float, criterion: str) -> IntArray:
    labels = _hierarchy().fcluster(tree, t=value, criterion=criterion)
    return np.asarray(labels, dtype=np.int64) - 1


def _compact(labels: IntArray) -> IntArray:
    _, inverse = np.unique(labels, return_inverse=True)
    return np.asarray(inverse, dtype=np.int64).reshape(-1)


def cluster_embeddings(embeddings: FloatArray, bounds: SpeakerBounds,
                       threshold: float, refine: int = 5) -> IntArray:
    """One speaker label per embedding (0..k-1); the rule is step 4 of engines.py's docstring."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    x = embeddings.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    tree = _hierarchy().linkage(x, method="average", metric="cosine")
    if bounds.num is not None:
        k = bounds.num
    else:
        cut = _cut(tree, threshold, "distance")
        sizes = np.bincount(cut)
        significant = int(np.sum(sizes >= max(2, math.ceil(0.05 * n))))
        k = min(max(significant, 1, bounds.low), bounds.high)
    k = max(1, min(k, n))
    labels = _compact(_cut(tree, k, "maxclust"))
    for _ in range(refine):
        count = int(labels.max()) + 1
        centroids = np.stack([x[labels == c].mean(axis=0) for c in range(count)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        moved = np.asarray(np.argmax(x @ centroids.T, axis=1), dtype=np.int64)
        if len(np.unique(moved)) < count or np.array_equal(moved, labels):
            break  # never let a pass empty a cluster
        labels = moved
    return labels


def majority_filter(labels: IntArray, width: int) -> IntArray:
    """Each label becomes the most common one among its `width` neighbours (ties keep it)."""
    if width <= 1 or len(labels) < 3:
        return labels.copy()
    half = width // 2
    out = labels.copy()
    for i in range(len(labels)):
        votes = np.bincount(labels[max(0, i - half):i + half + 1])
        best = int(np.argmax(votes))
        if votes[best] > votes[labels[i]]:
            out[i] = best
    return out


def absorb_short_runs(runs: list[list[int]], min_length: int) -> list[list[int]]:
    """`runs` = [[label, start, end], ...] of one region, end-to-end. A run shorter than
    `min_length` takes the label of its longer neighbour; equal neighbours' runs then merge."""
    runs = [list(r) for r in runs]
    while len(runs) > 1:
        lengths = [r[2] - r[1] for r in runs]
        i = int(np.argmin(lengths))
        if lengths[i] >= min_length:
            break
        left = runs[i - 1] if i > 0 else None
        right = runs[i + 1] if i + 1 < len(runs) else None
        if left is None or (right is not None and right[2] - right[1] > left[2] - left[1]):
            assert right is not None
            right[1] = runs[i][1]
        else:
            left[2] = runs[i][2]
        del runs[i]
        merged: list[list[int]] = []
        for r in runs:
            if merged and merged[-1][0] == r[0]:
                merged[-1][2] = r[2]
            else:
                merged.append(r)
        runs = merged
    return runs


def finalize_turns(turns: Sequence[Turn], merge_gap: float, min_turn: float) -> list[Turn]:
    """Merge same-speaker neighbours closer than `merge_gap`, drop turns under `min_turn`,
    renumber speakers by first appearance (0, 1, ...)."""
    merged: list[Turn] = []
    for turn in sorted(turns, key=lambda t: t.start):
        if merged and merged[-1].speaker == turn.speaker and \
                turn.start - merged[-1].end <= merge_gap:
            merged[-1] = Turn(turn.speaker, merged[-1].start, max(merged[-1].end, turn.end))
        else:
            merged.append(turn)
    kept = [t for t in merged if t.duration >= min_turn]
    # Dropping a short turn may leave two turns of one speaker side by side: merge again.
    final: list[Turn] = []
    for turn in kept:
        if final and final[-1].speaker == turn.speaker and \
                turn.start - final[-1].end <= merge_gap:
            final[-1] = Turn(turn.speaker, final[-1].start, turn.end)
        else:
            final.append(turn)
    order: dict[int, int] = {}
    for turn in final:
        order.setdefault(turn.speaker, len(order))
    return [Turn(order[t.speaker], t.start, t.end) for t in final]


def speaker_name(index: int) -> str:
    return f"SPEAKER_{index:02d}"


def to_rttm(turns: Sequence[Turn], file_id: str) -> str:
    """NIST RTTM: one `SPEAKER file 1 start duration <NA> <NA> name <NA> <NA>` line a turn."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in file_id) or "audio"
    return "".join(f"SPEAKER {safe} 1 {t.start:.3f} {t.duration:.3f} <NA> <NA> "
                   f"{speaker_name(t.speaker)} <NA> <NA>\n" for t in turns)
