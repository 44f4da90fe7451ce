"""Placement and eviction, table-driven over GPU layouts from a laptop to an 8 x H200 DGX."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from modelhost.gpu.placement import (
    COMPUTE_BUFFER,
    CUDA_CONTEXT,
    DEFAULT_CONTEXT,
    GIB,
    KIB,
    MIB,
    SAFETY_MARGIN,
    Demand,
    GpuState,
    Placement,
    PlacementError,
    Resident,
    check_tensor_parallel,
    estimate_bytes_per_gpu,
    place,
)

NO_DRIVER = "no NVIDIA driver (NVML library not found)"


def gib(x: float) -> int:
    return int(x * GIB)


def layout(total: float, *free: float) -> list[GpuState]:
    """GPUs of `total` GiB each, with these free GiB, indexed from 0."""
    return [GpuState(i, gib(total), gib(f)) for i, f in enumerate(free)]


def idle(model: str, gpus: tuple[int, ...], size: float, last_used: float) -> Resident:
    return Resident(model, gpus, gib(size), busy=False, last_used=last_used)


def busy(model: str, gpus: tuple[int, ...], size: float, last_used: float) -> Resident:
    return Resident(model, gpus, gib(size), busy=True, last_used=last_used)


def count(n: int, need: float, model: str = "x") -> Demand:
    return Demand(model, pinned=None, count=n, bytes_per_gpu=gib(need))


def pinned(gpus: tuple[int, ...], need: float, model: str = "x") -> Demand:
    return Demand(model, pinned=gpus, count=0, bytes_per_gpu=gib(need))


H100 = 80.0
H200 = 141.0  # a DGX H200: 8 x 141 GB


@dataclass
class Case:
    id: str
    gpus: list[GpuState]
    demand: Demand
    residents: list[Resident] = field(default_factory=list)
    expect: Placement | None = None
    error: tuple[str, ...] = ()


PLACED = [
    # -- CPU ---------------------------------------------------------------------------
    Case("cpu-count0-no-gpu", [], count(0, 0), expect=Placement((), ())),
    Case("cpu-count0-with-gpus-never-evicts", layout(H100, 0),
         count(0, 5), [idle("a", (0,), 80, 1)], expect=Placement((), ())),
    Case("cpu-pinned-empty-list", layout(H100, 70), pinned((), 5), expect=Placement((), ())),
    # -- one GPU -----------------------------------------------------------------------
    Case("1gpu-count-fits", layout(24, 20), count(1, 6), expect=Placement((0,))),
    Case("1gpu-count-exactly-fits", layout(24, 6), count(1, 6), expect=Placement((0,))),
    Case("1gpu-count-evicts-idle", layout(24, 2),
         count(1, 6), [idle("a", (0,), 20, 1)], expect=Placement((0,), ("a",))),
    Case("1gpu-pinned-fits", layout(H100, 70), pinned((0,), 40), expect=Placement((0,))),
    # -- two GPUs ----------------------------------------------------------------------
    Case("2gpu-count-picks-freest", layout(H100, 30, 60), count(1, 20),
         expect=Placement((1,))),
    Case("2gpu-count-tie-lowest-index", layout(H100, 60, 60), count(1, 20),
         expect=Placement((0,))),
    Case("2gpu-count-both", layout(H100, 60, 50), count(2, 20), expect=Placement((0, 1))),
    Case("2gpu-pinned-second", layout(H100, 79, 30), pinned((1,), 20),
         expect=Placement((1,))),
    Case("2gpu-pinned-order-kept", layout(H100, 79, 79), pinned((1, 0), 20),
         expect=Placement((1, 0))),
    Case("2gpu-count-prefers-no-eviction-over-freest", layout(H100, 21, 10),
         count(1, 20), [idle("a", (1,), 60, 1)], expect=Placement((0,))),
    Case("2gpu-pinned-needs-eviction-lru-first", layout(H100, 10, 79),
         pinned((0,), 30), [idle("new", (0,), 30, 50), idle("old", (0,), 30, 10)],
         expect=Placement((0,), ("old",))),
    Case("2gpu-pinned-evicts-two-in-lru-order", layout(H100, 5, 79),
         pinned((0,), 40),
         [idle("c", (0,), 20, 30), idle("a", (0,), 20, 10), idle("b", (0,), 20, 20),
          idle("d", (0,), 14, 40)],
         expect=Placement((0,), ("a", "b"))),
    Case("2gpu-pinned-never-touches-other-gpus", layout(H100, 5, 5),
         pinned((0,), 30), [idle("older", (1,), 70, 1), idle("mine", (0,), 70, 9)],
         expect=Placement((0,), ("mine",))),
    Case("2gpu-busy-lru-skipped", layout(H100, 5, 79),
         pinned((0,), 30), [busy("lru", (0,), 30, 1), idle("newer", (0,), 30, 9)],
         expect=Placement((0,), ("newer",))),
    Case("2gpu-spares-small-lru-when-bigger-alone-is-enough", layout(H100, 5, 79),
         pinned((0,), 30), [idle("small", (0,), 5, 1), idle("big", (0,), 40, 2)],
         expect=Placement((0,), ("big",))),
    Case("2gpu-evicts-tp2-resident", layout(H100, 5, 5),
         count(2, 30), [idle("tp2", (0, 1), 70, 1)], expect=Placement((0, 1), ("tp2",))),
    # -- four GPUs ---------------------------------------------------------------------
    Case("4gpu-count2-freest", layout(H100, 10, 70, 50, 70), count(2, 20),
         expect=Placement((1, 3))),
    Case("4gpu-count2-lru-eviction-order", layout(H100, 1, 1, 1, 1),
         count(2, 30),
         [idle("a", (0,), 75, 40), idle("b", (1,), 75, 10), idle("c", (2,), 75, 30),
          idle("d", (3,), 75, 20)],
         expect=Placement((1, 3), ("b", "d"))),
    Case("4gpu-count1-free-gpu-beats-evicting-the-lru", layout(H100, 1, 1, 79, 79),
         count(1, 18), [idle("a", (0,), 40, 1)], expect=Placement((2,))),
    Case("4gpu-count1-one-newer-eviction-beats-two-older", layout(H100, 1, 1, 0, 0),
         count(1, 30),
         [idle("s1", (0,), 20, 1), idle("s2", (0,), 20, 2), idle("big", (1,), 60, 9),
          busy("b2", (2,), 79, 3), busy("b3", (3,), 79, 3)],
         expect=Placement((1,), ("big",))),
    Case("4gpu-count2-multi-gpu-resident-frees-both", layout(H100, 10, 10, 10, 10),
         count(2, 40),
         [idle("tp2", (0, 1), 60, 5), idle("s", (2,), 60, 1), idle("t", (3,), 60, 9)],
         expect=Placement((0, 1), ("tp2",))),
    Case("4gpu-count2-equal-evictions-lru-wins", layout(H100, 10, 10, 10, 10),
         count(2, 40),
         [idle("tp2-new", (0, 1), 60, 9), idle("tp2-old", (2, 3), 60, 1)],
         expect=Placement((2, 3), ("tp2-old",))),
    Case("4gpu-count2-busy-lru-not-evicted", layout(H100, 10, 10, 10, 10),
         count(2, 40),
         [busy("lru", (0, 1), 60, 1), idle("x1", (2,), 60, 5), idle("x2", (3,), 60, 6)],
         expect=Placement((2, 3), ("x1", "x2"))),
    Case("4gpu-pinned-pair-partly-free", layout(H100, 79, 2, 79, 79),
         pinned((0, 1), 40), [idle("a", (1,), 70, 3), idle("b", (2,), 70, 1)],
         expect=Placement((0, 1), ("a",))),
    # -- a DGX: 8 x H200 ---------------------------------------------------------------
    Case("dgx-count1-empty", layout(H200, *[140] * 8), count(1, 126.9),
         expect=Placement((0,))),
    Case("dgx-count4-freest", layout(H200, 100, 140, 90, 139, 140, 20, 141, 138),
         count(4, 100), expect=Placement((1, 3, 4, 6))),
    Case("dgx-count8-all", layout(H200, *[140] * 8), count(8, 126.9),
         expect=Placement(tuple(range(8)))),
    Case("dgx-count4-beside-busy-tp4", layout(H200, 14, 14, 14, 14, 4, 4, 4, 4),
         count(4, 126.9),
         [busy("llama-405b", (0, 1, 2, 3), 126.9, 1), idle("q1", (4, 5), 136, 2),
          idle("q2", (6,), 136, 3), idle("q3", (7,), 136, 4)],
         expect=Placement((4, 5, 6, 7), ("q1", "q2", "q3"))),
    Case("dgx-count2-only-as-many-as-needed", layout(H200, *[4] * 8),
         count(2, 100),
         [idle(f"m{i}", (i,), 136, 10 + i) for i in range(8)],
         expect=Placement((0, 1), ("m0", "m1"))),
    Case("dgx-count2-lru-order-not-index-order", layout(H200, *[4] * 8),
         count(2, 100),
         [idle(f"m{i}", (i,), 136, 100 - i) for i in range(8)],
         expect=Placement((6, 7), ("m7", "m6"))),
    Case("dgx-pinned-tp2-evicts-tp4-resident", layout(H200, 10, 10, 10, 10, 140, 140, 140, 140),
         pinned((2, 3), 126.9), [idle("tp4", (0, 1, 2, 3), 130, 1)],
         expect=Placement((2, 3), ("tp4",))),
    Case("dgx-pinned-skips-unhelpful-lru", layout(H200, *[10] * 8),
         pinned((5,), 100),
         [idle("elsewhere", (4,), 130, 1), idle("on5-a", (5,), 50, 2),
          idle("on5-b", (5,), 60, 3), idle("on5-c", (5,), 60, 4)],
         expect=Placement((5,), ("on5-a", "on5-b"))),
]


REFUSED = [
    Case("cpu-only-pinned", [], pinned((0,), 5),
         error=("model 'x' is pinned to GPUs [0]", "no NVIDIA GPU", NO_DRIVER)),
    Case("cpu-only-count", [], count(2, 5),
         error=("model 'x' needs 2 GPU(s)", "no NVIDIA GPU", NO_DRIVER)),
    Case("pinned-missing-gpu", layout(H100, 70, 70), pinned((3,), 5),
         error=("GPU 3 does not exist (this machine has GPUs 0-1)",)),
    Case("pinned-missing-gpus", layout(H100, 70), pinned((0, 2, 3), 5),
         error=("GPUs 2, 3 do not exist (this machine has GPU 0)",)),
    Case("pinned-larger-than-gpu", layout(H100, 80, 80), pinned((1,), 90),
         error=("needs 90.0 GiB", "GPU 1 has in all (80.0 GiB)")),
    Case("pinned-blocked-by-busy", layout(H100, 5, 79),
         pinned((0,), 30), [busy("a", (0,), 75, 1), idle("b", (1,), 10, 0)],
         error=("model 'x' needs 30.0 GiB on each of GPUs [0]",
                "GPU 0 has 5.0 GiB free of 80.0 GiB (busy 'a' 75.0 GiB);",
                "'a' is busy", "unloading idle models would not free enough")),
    Case("pinned-busy-and-idle-not-enough", layout(H100, 5, 79),
         pinned((0,), 30), [busy("a", (0,), 50, 9), idle("b", (0,), 20, 1)],
         error=("busy 'a' 50.0 GiB, idle 'b' 20.0 GiB", "'a' is busy")),
    Case("pinned-blocked-by-other-process", layout(H100, 10, 79), pinned((0,), 30),
         error=("GPU 0 has 10.0 GiB free of 80.0 GiB (other processes 70.0 GiB)",)),
    Case("count-more-than-machine", layout(H100, 70, 70), count(4, 5),
         error=("needs 4 GPU(s) but this machine has 2 (GPUs 0-1)",)),
    Case("count-larger-than-any-gpu", layout(24, 20, 20), count(1, 30),
         error=("needs 30.0 GiB on each of 1 GPU(s)", "largest has 24.0 GiB")),
    Case("count-nothing-fits-names-busy", layout(H100, 5, 5),
         count(1, 30), [busy("a", (0,), 75, 1), busy("b", (1,), 75, 2)],
         error=("needs 30.0 GiB on each of 1 GPU(s)", "GPU 0 has 5.0 GiB free",
                "busy 'a' 75.0 GiB", "busy 'b' 75.0 GiB", "('a', 'b' are busy",
                "unloading idle models would not free enough")),
    Case("dgx-count8-blocked-by-one-busy", layout(H200, *[4] * 8),
         count(8, 100),
         [idle(f"m{i}", (i,), 137, i) for i in range(7)] + [busy("hot", (7,), 137, 0)],
         error=("GPU 7 has 4.0 GiB free of 141.0 GiB (busy 'hot' 137.0 GiB)",
                "'hot' is busy")),
    Case("dgx-count2-tp4-busy-and-singles-busy", layout(H200, *[4] * 8),
         count(2, 100),
         [busy("tp4", (0, 1, 2, 3), 137, 1)] + [busy(f"s{i}", (i,), 137, 2)
                                                for i in range(4, 7)]
         + [idle("lonely", (7,), 137, 3)],
         error=("idle 'lonely' 137.0 GiB", "'s4', 's5', 's6', 'tp4' are busy")),
]


@pytest.mark.parametrize("case", PLACED, ids=[c.id for c in PLACED])
def test_place(case: Case) -> None:
    got = place(case.demand, case.gpus, case.residents, no_gpu_reason=NO_DRIVER)
    assert got == case.expect
    _check_invariants(case.demand, case.gpus, case.residents, got)


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_refuse(case: Case) -> None:
    with pytest.raises(PlacementError) as caught:
        place(case.demand, case.gpus, case.residents, no_gpu_reason=NO_DRIVER)
    for text in case.error:
        assert text in caught.value.message, caught.value.message
    assert str(caught.value) == caught.value.message


def test_no_gpu_reason_defaults() -> None:
    with pytest.raises(PlacementError, match=r"no NVIDIA GPU \(none found\)"):
        place(pinned((0,), 1), [], [])


def test_model_already_resident_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="already loaded"):
        place(count(1, 1), layout(H100, 70), [idle("x", (0,), 5, 1)])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"count": -1}, "count"),
    ({"bytes_per_gpu": -1}, "bytes_per_gpu"),
    ({"pinned": (1, 1)}, "distinct"),
], ids=["negative-count", "negative-bytes", "duplicate-pins"])
def test_demand_validation(kwargs: dict[str, Any], match: str) -> None:
    fields: dict[str, Any] = {"model_id": "x", "pinned": None, "count": 1, "bytes_per_gpu": 1}
    with pytest.raises(ValueError, match=match):
        Demand(**{**fields, **kwargs})


# -- invariants over many random layouts -------------------------------------------------


def _free_after(gpus: list[GpuState], evicted: list[Resident]) -> dict[int, int]:
    free = {g.index: g.memory_free for g in gpus}
    total = {g.index: g.memory_total for g in gpus}
    for r in evicted:
        for i in r.gpus:
            free[i] = min(free[i] + r.bytes_per_gpu, total[i])
    return free


def _check_invariants(demand: Demand, gpus: list[GpuState], residents: list[Resident],
                      got: Placement) -> None:
    n = len(demand.pinned) if demand.pinned is not None else demand.count
    assert len(got.gpus) == n
    if demand.pinned is not None:
        assert got.gpus == demand.pinned
    by_id = {r.model_id: r for r in residents}
    evicted = [by_id[m] for m in got.evict]
    assert not any(r.busy for r in evicted), "a busy model was evicted"
    assert [r.last_used for r in evicted] == sorted(r.last_used for r in evicted)
    free = _free_after(gpus, evicted)
    assert all(free[i] >= demand.bytes_per_gpu for i in got.gpus)
    for spared in evicted:  # nothing evicted that was not needed
        rest = [r for r in evicted if r is not spared]
        after = _free_after(gpus, rest)
        assert not all(after[i] >= demand.bytes_per_gpu for i in got.gpus)


def _random_machine(rng: random.Random) -> tuple[list[GpuState], list[Resident]]:
    n = rng.choice([1, 2, 4, 8])
    total = rng.choice([24, H100, H200])
    free = {i: gib(total) - gib(rng.uniform(0.3, 1.5)) for i in range(n)}
    residents = []
    for k in range(rng.randint(0, 2 * n)):
        width = rng.choice([1, 1, 1, 2, 4])
        if width > n:
            width = 1
        start = rng.randrange(0, n - width + 1)
        placed = tuple(range(start, start + width))
        size = gib(rng.uniform(2, total / 2))
        if any(free[i] < size for i in placed):
            continue
        for i in placed:
            free[i] -= size
        residents.append(Resident(f"m{k}", placed, size, busy=rng.random() < 0.3,
                                  last_used=rng.uniform(0, 1000)))
    gpus = [GpuState(i, gib(total), free[i]) for i in range(n)]
    return gpus, residents


@pytest.mark.parametrize("seed", range(8))
def test_random_layouts_keep_the_rules(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        gpus, residents = _random_machine(rng)
        n = len(gpus)
        if rng.random() < 0.4:
            pins = tuple(sorted(rng.sample(range(n), rng.randint(1, n))))
            demand = Demand("new", pinned=pins, count=0,
                            bytes_per_gpu=gib(rng.uniform(1, gpus[0].memory_total / GIB)))
        else:
            demand = Demand("new", pinned=None, count=rng.randint(1, n),
                            bytes_per_gpu=gib(rng.uniform(1, gpus[0].memory_total / GIB)))
        idle_ones = [r for r in residents if not r.busy]
        try:
            got = place(demand, gpus, residents)
        except PlacementError:
            # Refused only when no allowed set of GPUs fits even with every idle model gone.
            free = _free_after(gpus, idle_ones)
            sets = [demand.pinned] if demand.pinned is not None else \
                list(itertools.combinations(range(n), demand.count))
            assert not any(all(free[i] >= demand.bytes_per_gpu for i in s) for s in sets)
            continue
        _check_invariants(demand, gpus, residents, got)
        if demand.pinned is not None:
            touched = {m for m in got.evict}
            assert all(set(r.gpus) & set(demand.pinned) for r in residents
                       if r.model_id in touched)


# -- estimates ---------------------------------------------------------------------------


def test_vllm_reserves_its_fraction_of_each_gpu_whatever_the_weights() -> None:
    small = estimate_bytes_per_gpu("vllm", gib(1), {}, gib(80), 1)
    large = estimate_bytes_per_gpu("vllm", gib(60), {}, gib(80), 1)
    assert small == large == int(0.9 * gib(80))
    assert estimate_bytes_per_gpu("vllm", gib(100), {}, gib(80), 2) == int(0.9 * gib(80))


@pytest.mark.parametrize(("args", "expected"), [
    ({"gpu_memory_utilization": 0.5}, 0.5),
    ({"gpu-memory-utilization": 0.75}, 0.75),
    ({"gpu_memory_utilization": "0.6"}, 0.6),
    ({"max_model_len": 8192}, 0.9),
], ids=["snake", "kebab", "string", "default"])
def test_vllm_fraction(args: dict[str, Any], expected: float) -> None:
    assert estimate_bytes_per_gpu("vllm", gib(10), args, gib(141), 4) == \
        int(expected * gib(141))


@pytest.mark.parametrize(("weights", "args", "n", "match"), [
    (gib(140), {}, 1, r"weights need 140.0 GiB on each of 1 GPU.*0.9 of 80.0 GiB = 72.0 GiB"),
    (gib(70), {"gpu_memory_utilization": 0.5}, 1, "gpu_memory_utilization 0.5"),
    (gib(10), {"gpu_memory_utilization": 1.5}, 1, r"must be in \(0, 1\]"),
    (gib(10), {"gpu_memory_utilization": 0}, 1, r"must be in \(0, 1\]"),
    (gib(10), {"gpu_memory_utilization": "lots"}, 1, "must be a number"),
    (gib(10), {"gpu_memory_utilization": True}, 1, "must be a number"),
], ids=["weights-too-large", "fraction-too-small", "fraction-above-1", "fraction-0",
        "not-a-number", "boolean"])
def test_vllm_refusals(weights: int, args: dict[str, Any], n: int, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        estimate_bytes_per_gpu("vllm", weights, args, gib(80), n)


def test_vllm_weights_split_over_tensor_parallel_gpus() -> None:
    # 140 GiB of weights do not fit one H100, but do over 4 (35 GiB each of 72 GiB).
    assert estimate_bytes_per_gpu("vllm", gib(140), {"tensor_parallel_size": 4}, gib(80), 4) \
        == int(0.9 * gib(80))


def _llama(weights: int, ctx: int = DEFAULT_CONTEXT, fraction: float = 1.0,
           share: float = 1.0, kv: int | None = None) -> int:
    if kv is None:
        kv = int(64 * KIB * math.sqrt(weights / GIB))
    return math.ceil(fraction * (weights + kv * ctx) * share * (1 + SAFETY_MARGIN)) \
        + COMPUTE_BUFFER + CUDA_CONTEXT


W8B = gib(4.6)  # Llama-3.1-8B Q4_K_M


@pytest.mark.parametrize(("args", "n_gpus", "kwargs", "expected"), [
    ({}, 1, {}, _llama(W8B)),
    ({"n_gpu_layers": -1}, 1, {}, _llama(W8B)),
    ({"n_gpu_layers": 0}, 1, {}, CUDA_CONTEXT),
    ({"n_gpu_layers": 16}, 1, {"n_layers": 32}, _llama(W8B, fraction=0.5)),
    ({"n_gpu_layers": 16, "n_layers": 32}, 1, {}, _llama(W8B, fraction=0.5)),
    ({"n_gpu_layers": 99}, 1, {"n_layers": 32}, _llama(W8B)),
    ({"n_gpu_layers": 16}, 1, {}, _llama(W8B)),
    ({"n_ctx": 8192}, 1, {}, _llama(W8B, ctx=8192)),
    ({"n_ctx": 0}, 1, {}, _llama(W8B, ctx=32768)),
    ({"n_ctx": 8192}, 1, {"kv_bytes_per_token": 128 * KIB},
     _llama(W8B, ctx=8192, kv=128 * KIB)),
    ({}, 2, {}, _llama(W8B, share=0.5)),
    ({"tensor_split": [3, 1]}, 2, {}, _llama(W8B, share=0.75)),
    ({"tensor_split": "1,1,2"}, 3, {}, _llama(W8B, share=0.5)),
    ({"tensor_split": [1]}, 2, {}, _llama(W8B)),
    ({"split_mode": 0}, 2, {}, _llama(W8B)),
    ({"n-gpu-layers": 8, "n-ctx": 4096}, 1, {"n_layers": 32},
     _llama(W8B, ctx=4096, fraction=0.25)),
], ids=["all-layers-default", "all-layers-minus-1", "no-layers", "half-by-hint",
        "half-by-engine-arg", "more-than-all", "positive-without-layer-count", "n-ctx-8k",
        "n-ctx-0-model-default", "exact-kv", "even-split", "tensor-split", "split-string",
        "split-short", "split-mode-none", "kebab-keys"])
def test_llamacpp_estimate(args: dict[str, Any], n_gpus: int, kwargs: dict[str, Any],
                           expected: int) -> None:
    assert estimate_bytes_per_gpu("llamacpp", W8B, args, gib(80), n_gpus, **kwargs) == expected


def test_llamacpp_sizes_are_plausible() -> None:
    # SmolLM2-135M Q8_0 (the embedded model) needs about a GiB on a GPU, CUDA included.
    smol = estimate_bytes_per_gpu("llamacpp", 145 * 1000**2, {}, gib(80), 1)
    assert 800 * MIB < smol < 1.2 * GIB
    # Llama-3.1-8B Q4_K_M with an 8k context: 5-7 GiB.
    assert gib(5) < estimate_bytes_per_gpu("llamacpp", W8B, {"n_ctx": 8192}, gib(80), 1) \
        < gib(7.5)
    # Llama-3.1-70B Q4_K_M over two GPUs: about half of 40 GiB each, plus its cache.
    per_gpu = estimate_bytes_per_gpu("llamacpp", gib(40), {"n_ctx": 8192}, gib(80), 2)
    assert gib(22) < per_gpu < gib(27)
    # A bigger context costs more.
    assert estimate_bytes_per_gpu("llamacpp", W8B, {"n_ctx": 32768}, gib(80), 1) > \
        estimate_bytes_per_gpu("llamacpp", W8B, {"n_ctx": 4096}, gib(80), 1)


@pytest.mark.parametrize(("backend", "n_gpus", "expected"), [
    ("remote", 2, 0),
    ("vllm", 0, 0),
    ("llamacpp", 0, 0),
    ("command", 2, math.ceil(gib(10) / 2 * (1 + SAFETY_MARGIN)) + CUDA_CONTEXT),
], ids=["remote", "vllm-cpu", "llamacpp-cpu", "command-floor"])
def test_other_estimates(backend: str, n_gpus: int, expected: int) -> None:
    assert estimate_bytes_per_gpu(backend, gib(10), {}, gib(80), n_gpus) == expected


@pytest.mark.parametrize(("args", "match"), [
    ({"tensor_split": ["a", "b"]}, "tensor_split must list numbers"),
    ({"n_layers": 0, "n_gpu_layers": 3}, "n_layers must be a positive integer"),
    ({"n_ctx": "big"}, "n_ctx must be a number"),
], ids=["split", "n-layers", "n-ctx"])
def test_llamacpp_bad_arguments(args: dict[str, Any], match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        estimate_bytes_per_gpu("llamacpp", gib(4), args, gib(80), 2)


def test_estimate_then_place_on_a_dgx() -> None:
    """vLLM at 0.9 on H200s needs 126.9 GiB per GPU: it goes beside, not onto, a busy
    tensor-parallel model, evicting the idle one in its way."""
    need = estimate_bytes_per_gpu("vllm", gib(65), {"tensor_parallel_size": 2}, gib(H200), 2)
    gpus = layout(H200, 10, 10, 140, 140, 140, 10, 140, 140)
    residents = [busy("a", (0, 1), 130, 1), idle("b", (5,), 130, 2)]
    # Five GPUs fit as they are: the freest pair, lowest indices.
    assert place(Demand("y", None, 2, need), gpus, residents).gpus == (2, 3)
    got = place(Demand("y", (4, 5), 0, need), gpus, residents)
    assert got == Placement((4, 5), ("b",))


# -- tensor parallel ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "n_gpus", "expected"), [
    ({}, 1, 1),
    ({}, 4, 4),
    ({"tensor_parallel_size": 2}, 2, 2),
    ({"tensor-parallel-size": 8}, 8, 8),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, 4, 2),
    ({"pipeline_parallel_size": 2}, 8, 4),
    ({}, 0, 1),
    ({"tensor_parallel_size": 1}, 0, 1),
], ids=["default-1", "default-4", "tp2", "kebab-tp8", "tp2-pp2", "pp-only", "cpu",
        "cpu-tp1"])
def test_tensor_parallel_agrees(args: dict[str, Any], n_gpus: int, expected: int) -> None:
    assert check_tensor_parallel(args, n_gpus) == expected


@pytest.mark.parametrize(("args", "n_gpus", "match"), [
    ({"tensor_parallel_size": 4}, 2, "tensor_parallel_size=4 needs 4 GPU.*given 2 GPU"),
    ({"tensor-parallel-size": 1}, 2, "they must agree"),
    ({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, 2,
     r"tensor_parallel_size=2 \* pipeline_parallel_size=2 needs 4"),
    ({"pipeline_parallel_size": 3}, 4, "does not divide the 4 GPU"),
    ({"tensor_parallel_size": 2}, 0, "model has none"),
    ({"tensor_parallel_size": 0}, 2, "positive integer"),
    ({"tensor_parallel_size": True}, 1, "positive integer"),
    ({"tensor_parallel_size": "2"}, 2, "positive integer"),
], ids=["tp-more", "tp-fewer", "tp-pp", "pp-indivisible", "cpu", "zero", "bool", "string"])
def test_tensor_parallel_disagrees(args: dict[str, Any], n_gpus: int, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        check_tensor_parallel(args, n_gpus)
