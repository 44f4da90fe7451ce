"""Placement: which GPUs a model loads on, and which idle models must be unloaded first.

Pure functions over plain values: no NVML, no processes, no clock. The scheduler
(`modelhost.gpu.scheduler`) measures (`modelhost.gpu.inventory`), describes what is loaded,
calls `place()` and unloads what the answer names; the model's owner then starts the worker
on the answer's GPUs.

Inputs
------
* `GpuState(index, memory_total, memory_free)`: each GPU as NVML measures it now. Free memory
  is *measured*, so it already accounts for every loaded model and for processes that are not
  modelhost's.
* `Resident(model_id, gpus, bytes_per_gpu, busy, last_used)`: each model modelhost has
  loaded. `bytes_per_gpu` is what unloading it gives back on each of its GPUs: the gateway
  passes the worker's measured usage (`GpuMonitor.memory_used_by` over the worker's process
  group), or its estimate when NVML cannot attribute memory to processes. `busy` means a
  request is running or queued. `last_used` is any monotonic time.
* `Demand(model_id, pinned, count, bytes_per_gpu)`: the model to place. `pinned` is the
  user's `gpus:` list (or None), `count` the `gpu_count` (ignored when pinned), and
  `bytes_per_gpu` what it needs on each GPU (`estimate_bytes_per_gpu`).

The algorithm
-------------
A GPU *fits* the demand when its free memory is at least `bytes_per_gpu`.

1. **CPU.** A demand for no GPU (`count: 0`, `gpus: []`) is placed on the CPU: no GPU, no
   eviction. A demand for GPUs on a machine without any is refused, with the reason NVML gave
   (`no_gpu_reason`).
2. **Pinned** (`gpus: [1, 2]`): exactly those GPUs, in the user's order (it becomes
   `CUDA_VISIBLE_DEVICES`). Every index must exist and be large enough in total. If some of
   them do not fit, idle residents on those GPUs are evicted (step 4); residents elsewhere
   are never touched.
3. **Count** (`gpu_count: N`): if N GPUs fit as they are, take the N with the most free
   memory (ties: lowest index). Otherwise consider every set of N GPUs large enough in
   total and compute, for each, the evictions that would make it fit (step 4); choose the
   set with, in order: the fewest evictions; the least recently used evictees (sets are
   compared on their evictees' `last_used`, oldest first, so LRU wins between equal
   counts); the most free memory once they are gone; the lowest indices. The answer lists
   the GPUs in index order. (A machine has at most 16 GPUs, C(16, 8) = 12,870 sets: an
   exhaustive search is instant and easy to reason about.)
4. **Eviction** for a set of GPUs: walk the idle residents that occupy one of those GPUs,
   least recently used first (ties by id), and evict each one that occupies a GPU of the set
   that still lacks memory, crediting its `bytes_per_gpu` to *all* its GPUs (a
   tensor-parallel model frees all of them, never more than a GPU's total), until every GPU
   of the set fits. Then spare any evictee that turns out not to be needed, trying the most
   recently used first (an old small model evicted before a larger one that alone would have
   been enough stays loaded). Busy residents are never evicted, even when they are the least
   recently used: they are skipped. The answer lists evictions in LRU order.
5. **Refusal.** When no set fits even after evicting every idle resident it may, or an index
   does not exist, or the machine has no GPU, `PlacementError` says what is in the way: for
   each GPU concerned its free and total memory, the models on it (busy or idle, with their
   size) and memory held by processes that are not modelhost's.

Memory estimates (`estimate_bytes_per_gpu`)
-------------------------------------------
* **vLLM** pre-allocates `gpu_memory_utilization` (default 0.9) of each GPU's *total* memory
  on *each* of its GPUs, whatever the size of the weights (weights, activations, CUDA graphs
  and a KV cache filling the rest), and refuses to start when a GPU has less free memory than
  that. So the demand is `gpu_memory_utilization * total`, exactly. The weights must still
  fit in it with room to spare: when `weights / n_gpus` is not below the demand, the model
  cannot run on that many GPUs (a `PlacementError` says so).
* **llama.cpp** allocates what it offloads, per GPU::

      offloaded = fraction * (weights + kv_per_token * n_ctx)
      per_gpu   = offloaded * share * (1 + SAFETY_MARGIN) + COMPUTE_BUFFER + CUDA_CONTEXT

  - `fraction` of the layers on GPUs: `n_gpu_layers` absent or negative means all of them
    (the gateway offloads every layer when a model has GPUs); 0 means none (only the CUDA
    context is on the GPU, the KV cache stays on the CPU); a positive N means N / n_layers
    when the number of layers is known (the `n_layers` argument, from the GGUF metadata, or
    an `n_layers` engine argument), else all of them (an over-estimate, on the safe side).
  - `kv_per_token`: an f16 KV cache holds 2 * layers * kv_heads * head_dim * 2 bytes per
    token. Given by the caller (`kv_bytes_per_token`, from the GGUF metadata) it is exact;
    otherwise it is guessed from the file size as 64 KiB * sqrt(weights in GiB), which
    matches modern grouped-query models: SmolLM2-135M Q8_0 (0.14 GiB) 22.5 KiB true vs 24
    guessed; Llama-3.1-8B Q4_K_M (4.6 GiB) 128 vs 137; Qwen2.5-32B Q4_K_M (18.5 GiB) 256 vs
    275; Llama-3.1-70B Q4_K_M (40 GiB) 320 vs 403. Old models without grouped-query
    attention (Llama-2-7B: 512 KiB per token) are under-estimated: pass the exact figure.
    A flat 0.5 MiB per token would be right only for those, and 20 times too much for a
    small modern model.
  - `n_ctx`: llama-cpp-python's server default is 2048; 0 means the model's training
    context, unknown here, assumed to be `UNKNOWN_CONTEXT` (32,768) tokens.
  - `share`: the largest part of the model one GPU holds: `tensor_split` proportions when
    given, everything on one GPU with `split_mode: 0` (none), else an even split. (Without
    `tensor_split`, llama.cpp splits in proportion to each GPU's free memory: an even split
    is what the placement asks of every GPU.)
  - `SAFETY_MARGIN` (10 %) covers what the formula leaves out: the output layer, buffer
    alignment, allocator fragmentation. `COMPUTE_BUFFER` (256 MiB) is llama.cpp's scratch
    space for a 512-token batch, counted when layers are offloaded; `CUDA_CONTEXT`
    (512 MiB) is what the CUDA runtime and cuBLAS take on every GPU a process touches.
* Any other backend that runs on GPUs (`command`): `weights / n_gpus * (1 + SAFETY_MARGIN) +
  CUDA_CONTEXT`, a floor. `remote` models use no local GPU.

Tensor parallelism (`check_tensor_parallel`): vLLM shards a model over
`tensor_parallel_size * pipeline_parallel_size` GPUs, which must be the number of GPUs the
model is given.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
MIB = 1024**2
KIB = 1024

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
SAFETY_MARGIN = 0.10
CUDA_CONTEXT = 512 * MIB
COMPUTE_BUFFER = 256 * MIB
KV_PER_TOKEN_PER_SQRT_GIB = 64 * KIB
DEFAULT_CONTEXT = 2048  # llama-cpp-python's server default n_ctx
UNKNOWN_CONTEXT = 32768  # assumed for n_ctx: 0 (the model's own, unknown here)
# Memory used on a GPU beyond what modelhost's models account for is named in refusals
# from this size on (an idle GPU shows a few hundred MiB used by the driver itself).
OTHER_PROCESSES_SHOWN = GIB


@dataclass(frozen=True)
class GpuState:
    """One GPU as measured now (bytes)."""

    index: int
    memory_total: int
    memory_free: int


@dataclass(frozen=True)
class Resident:
    """A model modelhost has loaded: unloading it gives back `bytes_per_gpu` on each of
    `gpus`. Never evicted while `busy`."""

    model_id: str
    gpus: tuple[int, ...]
    bytes_per_gpu: int
    busy: bool
    last_used: float


@dataclass(frozen=True)
class Demand:
    """A model to place: on `pinned` GPUs when given, else on `count` GPUs (0: the CPU)."""

    model_id: str
    pinned: tuple[int, ...] | None
    count: int
    bytes_per_gpu: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be 0 or more")
        if self.bytes_per_gpu < 0:
            raise ValueError("bytes_per_gpu must be 0 or more")
        if self.pinned is not None and len(set(self.pinned)) != len(self.pinned):
            raise ValueError("pinned GPUs must be distinct")


@dataclass(frozen=True)
class Placement:
    """Where the model goes (`gpus`, empty for the CPU) and which models to unload first
    (`evict`, least recently used first)."""

    gpus: tuple[int, ...]
    evict: tuple[str, ...] = ()


class PlacementError(Exception):
    """The model cannot be placed; the message says what is in the way."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- placement -------------------------------------------------------------------------


def place(demand: Demand, gpus: Sequence[GpuState], residents: Sequence[Resident] = (),
          no_gpu_reason: str | None = None) -> Placement:
    """Where `demand` goes, given the measured `gpus` and the loaded `residents` (see the
    module's documentation). Raises PlacementError when it cannot be placed; `no_gpu_reason`
    (the GPU monitor's `unavailable_reason`) explains a machine without GPUs."""
    if any(r.model_id == demand.model_id for r in residents):
        raise ValueError(f"model '{demand.model_id}' is already loaded")
    n = len(demand.pinned) if demand.pinned is not None else demand.count
    if n == 0:
        return Placement(gpus=(), evict=())
    if not gpus:
        why = f"this machine has no NVIDIA GPU ({no_gpu_reason or 'none found'})"
        if demand.pinned is not None:
            raise PlacementError(f"model '{demand.model_id}' is pinned to GPUs "
                                 f"{list(demand.pinned)} but {why}")
        raise PlacementError(f"model '{demand.model_id}' needs {n} GPU(s) but {why}")
    by_index = {g.index: g for g in gpus}
    if demand.pinned is not None:
        return _place_pinned(demand, demand.pinned, by_index, residents)
    return _place_count(demand, n, by_index, residents)


def _place_pinned(demand: Demand, pinned: tuple[int, ...], by_index: dict[int, GpuState],
                  residents: Sequence[Resident]) -> Placement:
    missing = [i for i in pinned if i not in by_index]
    if missing:
        what = f"GPU {missing[0]} does not exist" if len(missing) == 1 \
            else f"GPUs {_indices(missing)} do not exist"
        raise PlacementError(f"model '{demand.model_id}' is pinned to GPUs {list(pinned)}: "
                             f"{what} (this machine has {_machine(by_index)})")
    need = demand.bytes_per_gpu
    small = [by_index[i] for i in pinned if by_index[i].memory_total < need]
    if small:
        raise PlacementError(
            f"model '{demand.model_id}' needs {_gib(need)} on each of its GPUs, more than "
            + ", ".join(f"GPU {g.index} has in all ({_gib(g.memory_total)})" for g in small))
    evict = _evictions(need, pinned, by_index, residents)
    if evict is None:
        after = _free_after(by_index, [r for r in residents if not r.busy
                                       and set(r.gpus) & set(pinned)])
        short = [by_index[i] for i in pinned if after[i] < need]
        raise PlacementError(
            f"model '{demand.model_id}' needs {_gib(need)} on each of GPUs {list(pinned)}; "
            + _describe(short, residents) + _tail(short, residents))
    return Placement(gpus=pinned, evict=tuple(r.model_id for r in evict))


def _place_count(demand: Demand, n: int, by_index: dict[int, GpuState],
                 residents: Sequence[Resident]) -> Placement:
    need = demand.bytes_per_gpu
    if n > len(by_index):
        raise PlacementError(f"model '{demand.model_id}' needs {n} GPU(s) but this machine "
                             f"has {len(by_index)} ({_machine(by_index)})")
    ordered = sorted(by_index.values(), key=lambda g: g.index)
    large = [g for g in ordered if g.memory_total >= need]
    if len(large) < n:
        biggest = max(g.memory_total for g in ordered)
        raise PlacementError(
            f"model '{demand.model_id}' needs {_gib(need)} on each of {n} GPU(s) but only "
            f"{len(large)} GPU(s) of this machine have that much memory in all (the largest "
            f"has {_gib(biggest)})")
    fitting = sorted((g for g in large if g.memory_free >= need),
                     key=lambda g: (-g.memory_free, g.index))
    if len(fitting) >= n:
        return Placement(gpus=tuple(sorted(g.index for g in fitting[:n])), evict=())
    best: tuple[tuple[Any, ...], tuple[int, ...], tuple[Resident, ...]] | None = None
    for combo in itertools.combinations(large, n):
        chosen = tuple(g.index for g in combo)
        evict = _evictions(need, chosen, by_index, residents)
        if evict is None:
            continue
        after = _free_after(by_index, evict)
        key = (len(evict), tuple(sorted(r.last_used for r in evict)),
               -sum(after[i] for i in chosen), chosen)
        if best is None or key < best[0]:
            best = (key, chosen, evict)
    if best is None:
        raise PlacementError(
            f"model '{demand.model_id}' needs {_gib(need)} on each of {n} GPU(s); "
            + _describe(large, residents) + _tail(large, residents))
    return Placement(gpus=best[1], evict=tuple(r.model_id for r in best[2]))


def _free_after(by_index: dict[int, GpuState], evicted: Iterable[Resident]) -> dict[int, int]:
    free = {i: g.memory_free for i, g in by_index.items()}
    for resident in evicted:
        for i in resident.gpus:
            if i in free:
                free[i] = min(free[i] + resident.bytes_per_gpu, by_index[i].memory_total)
    return free


def _evictions(need: int, chosen: tuple[int, ...], by_index: dict[int, GpuState],
               residents: Sequence[Resident]) -> tuple[Resident, ...] | None:
    """The idle residents to evict, LRU first, for every GPU of `chosen` to have `need` free
    bytes; None when evicting every idle resident on them would not be enough."""
    targets = set(chosen)

    def fits(evicted: Sequence[Resident]) -> bool:
        free = _free_after(by_index, evicted)
        return all(free[i] >= need for i in chosen)

    if fits(()):
        return ()
    candidates = sorted((r for r in residents if not r.busy and targets & set(r.gpus)),
                        key=lambda r: (r.last_used, r.model_id))
    evicted: list[Resident] = []
    free = _free_after(by_index, ())
    for resident in candidates:
        if not any(free[i] < need for i in resident.gpus if i in targets):
            continue  # it is only on GPUs that already fit: unloading it would not help
        evicted.append(resident)
        free = _free_after(by_index, evicted)
        if all(free[i] >= need for i in chosen):
            break
    else:
        return None
    # Spare the evictees that are not needed after all, most recently used first.
    for resident in reversed(list(evicted)):
        spared = [r for r in evicted if r is not resident]
        if fits(spared):
            evicted = spared
    return tuple(evicted)


# -- messages --------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _indices(indices: Iterable[int]) -> str:
    ordered = sorted(indices)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(map(str, ordered))


def _machine(by_index: Mapping[int, GpuState]) -> str:
    if len(by_index) == 1:
        return f"GPU {next(iter(by_index))}"
    ordered = sorted(by_index)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"GPUs {ordered[0]}-{ordered[-1]}"
    return f"GPUs {', '.join(map(str, ordered))}"


def _describe(gpus: Sequence[GpuState], residents: Sequence[Resident]) -> str:
    parts = []
    for gpu in gpus:
        here = sorted((r for r in residents if gpu.index in r.gpus),
                      key=lambda r: (not r.busy, r.last_used, r.model_id))
        what = [f"{'busy' if r.busy else 'idle'} '{r.model_id}' {_gib(r.bytes_per_gpu)}"
                for r in here]
        other = gpu.memory_total - gpu.memory_free - sum(r.bytes_per_gpu for r in here)
        if other >= OTHER_PROCESSES_SHOWN:
            what.append(f"other processes {_gib(other)}")
        parts.append(f"GPU {gpu.index} has {_gib(gpu.memory_free)} free of "
                     f"{_gib(gpu.memory_total)}" + (f" ({', '.join(what)})" if what else ""))
    return ", ".join(parts)


def _tail(gpus: Sequence[GpuState], residents: Sequence[Resident]) -> str:
    indices = {g.index for g in gpus}
    busy = sorted({r.model_id for r in residents if r.busy and indices & set(r.gpus)})
    text = "; unloading idle models would not free enough"
    if busy:
        names = ", ".join(f"'{m}'" for m in busy)
        verb = "is" if len(busy) == 1 else "are"
        text += f" ({names} {verb} busy, and a busy model is never unloaded)"
    return text


# -- estimates -------------------------------------------------------------------------


def _args(engine_args: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in engine_args.items()}


def _number(args: Mapping[str, Any], key: str) -> float | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise PlacementError(f"engine_args.{key} must be a number, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PlacementError(f"engine_args.{key} must be a number, not {value!r}") from None


def _positive_int(args: Mapping[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlacementError(f"engine_args.{key} must be a positive integer, not {value!r}")
    return value


def estimate_bytes_per_gpu(backend: str, weights_bytes: int, engine_args: Mapping[str, Any],
                           gpu_total_bytes: int, n_gpus: int, *, n_layers: int | None = None,
                           kv_bytes_per_token: int | None = None) -> int:
    """Bytes a model needs on each of its `n_gpus` GPUs (0 when it has none); see the
    module's documentation for the formulas. `gpu_total_bytes` is a GPU's total memory (on a
    machine with GPUs of several sizes, the largest, to be safe). `n_layers` and
    `kv_bytes_per_token` (llama.cpp, from the GGUF metadata) make the estimate exact where
    known. Raises PlacementError when the engine arguments say the model cannot fit."""
    if n_gpus <= 0 or str(backend) == "remote":
        return 0
    args = _args(engine_args)
    if str(backend) == "vllm":
        return _vllm_bytes(weights_bytes, args, gpu_total_bytes, n_gpus)
    if str(backend) == "llamacpp":
        return _llamacpp_bytes(weights_bytes, args, n_gpus, n_layers, kv_bytes_per_token)
    return math.ceil(weights_bytes / n_gpus * (1 + SAFETY_MARGIN)) + CUDA_CONTEXT


def _vllm_bytes(weights_bytes: int, args: Mapping[str, Any], gpu_total_bytes: int,
                n_gpus: int) -> int:
    fraction = _number(args, "gpu_memory_utilization")
    if fraction is None:
        fraction = DEFAULT_GPU_MEMORY_UTILIZATION
    if not 0 < fraction <= 1:
        raise PlacementError(f"engine_args.gpu_memory_utilization must be in (0, 1], "
                             f"not {fraction}")
    reserved = int(fraction * gpu_total_bytes)
    per_gpu = weights_bytes / n_gpus
    if per_gpu >= reserved:
        raise PlacementError(
            f"the weights need {_gib(math.ceil(per_gpu))} on each of {n_gpus} GPU(s), but "
            f"vLLM may use only gpu_memory_utilization {fraction:g} of "
            f"{_gib(gpu_total_bytes)} = {_gib(reserved)} per GPU, which must also hold the KV "
            "cache: use more GPUs (tensor_parallel_size), a quantized model or a higher "
            "gpu_memory_utilization")
    return reserved


def _llamacpp_bytes(weights_bytes: int, args: Mapping[str, Any], n_gpus: int,
                    n_layers: int | None, kv_bytes_per_token: int | None) -> int:
    layers = _number(args, "n_gpu_layers")
    total_layers = n_layers if n_layers is not None else _positive_int(args, "n_layers")
    if layers is None or layers < 0:
        fraction = 1.0
    elif layers == 0:
        return CUDA_CONTEXT  # nothing offloaded: only the CUDA context is on the GPU
    elif total_layers:
        fraction = min(layers / total_layers, 1.0)
    else:
        fraction = 1.0  # unknown number of layers: assume all, on the safe side
    if kv_bytes_per_token is None:
        kv_bytes_per_token = int(KV_PER_TOKEN_PER_SQRT_GIB * math.sqrt(weights_bytes / GIB))
    n_ctx = _number(args, "n_ctx")
    context = DEFAULT_CONTEXT if n_ctx is None else int(n_ctx) or UNKNOWN_CONTEXT
    offloaded = fraction * (weights_bytes + kv_bytes_per_token * context)
    return math.ceil(offloaded * _split_share(args, n_gpus) * (1 + SAFETY_MARGIN)) \
        + COMPUTE_BUFFER + CUDA_CONTEXT


def _split_share(args: Mapping[str, Any], n_gpus: int) -> float:
    """The largest part of the offloaded model that one GPU holds."""
    if n_gpus == 1 or args.get("split_mode") in (0, "0", "none"):
        return 1.0
    split = args.get("tensor_split")
    if isinstance(split, str):
        split = [part for part in split.replace(",", " ").split() if part]
    if isinstance(split, list | tuple) and split:
        try:
            parts = [max(float(x), 0.0) for x in list(split)[:n_gpus]]
        except (TypeError, ValueError):
            raise PlacementError(f"engine_args.tensor_split must list numbers, "
                                 f"not {split!r}") from None
        parts += [0.0] * (n_gpus - len(parts))
        if sum(parts) > 0:
            return max(parts) / sum(parts)
    return 1.0 / n_gpus


def check_tensor_parallel(engine_args: Mapping[str, Any], n_gpus: int) -> int:
    """The tensor parallel size to use on `n_gpus` GPUs: `tensor_parallel_size` *
    `pipeline_parallel_size` must equal the number of GPUs (PlacementError otherwise);
    without `tensor_parallel_size`, it is `n_gpus / pipeline_parallel_size`. On the CPU
    (`n_gpus` 0), 1."""
    args = _args(engine_args)
    tp = _positive_int(args, "tensor_parallel_size")
    pp = _positive_int(args, "pipeline_parallel_size") or 1
    if n_gpus <= 0:
        if (tp or 1) * pp > 1:
            raise PlacementError(f"tensor_parallel_size={tp or 1} * pipeline_parallel_size="
                                 f"{pp} needs {(tp or 1) * pp} GPUs but the model has none")
        return 1
    if tp is None:
        if n_gpus % pp:
            raise PlacementError(f"pipeline_parallel_size={pp} does not divide the "
                                 f"{n_gpus} GPU(s) the model is given")
        return n_gpus // pp
    if tp * pp != n_gpus:
        shown = f"tensor_parallel_size={tp}" + \
            (f" * pipeline_parallel_size={pp}" if pp != 1 else "")
        raise PlacementError(f"{shown} needs {tp * pp} GPU(s) but the model is given "
                             f"{n_gpus} GPU(s); they must agree")
    return tp
