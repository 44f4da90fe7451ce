"""Real model: the embedded SmolLM2 (llama.cpp) through modelhost against the same llama.cpp
worker hit directly; cold load to ready; unload -> load swap time; the embedded Whisper's
real-time factor through modelhost against its speech worker hit directly (workers/apps/speech/)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from modelhost.catalog import BUILTIN_MODELS, package_path
from modelhost.config import PackageSource
from modelhost.workers import llamacpp

from .aio import run
from .arms import MODELHOST_KEY, clean_env, start_modelhost
from .loadgen import Client, StreamTrace, Target
from .procs import Proc, Procs, free_port, http_get, http_post, pinning_possible, wait_http
from .speech import run_speech

MODEL = "smollm2-135m"
SPEC = next(s for s in BUILTIN_MODELS if s.id == MODEL)
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather and what the message says.")
EVENT_SPLIT = re.compile(rb"\r?\n\r?\n")
ENGINE_CPUS = {0}
OTHER_CPUS = {1}


@dataclass(frozen=True)
class ModelPlan:
    rounds: int  # streamed generations per arm, interleaved
    max_tokens: int
    swaps: int  # unload -> load cycles timed
    idle_ttl: float  # seconds, for the swap gateway
    speech_rounds: int  # transcriptions of the test speech per arm, interleaved


def direct_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The llama.cpp worker's command line, built by modelhost's own launch plan."""
    assert isinstance(SPEC.source, PackageSource)
    plan = llamacpp.plan(SPEC, package_path(SPEC.source), "127.0.0.1", port, [])
    return plan.argv, plan.env


def _chat(max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "stream": stream, "max_tokens": max_tokens,
                       "temperature": 0, "seed": 1,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()


async def generate(target: Target, max_tokens: int) -> dict[str, Any]:
    """One streamed generation: tokens, time to first token, decode and end-to-end tokens/s."""
    client = Client(target)
    trace = StreamTrace(keep=True)
    sent = time.perf_counter()
    reply = await client.send(target.request(_chat(max_tokens, True)), 600.0, trace)
    client.close()
    if not reply.ok:
        return {"ok": False, "error": reply.error or f"HTTP {reply.status}"}
    raw = b"".join(trace.chunks or [])
    events = [e for e in EVENT_SPLIT.split(raw) if b"data:" in e]
    token_times: list[float] = []
    text = []
    for event, at in zip(events, trace.times, strict=False):
        data = event.split(b"data:", 1)[1].strip()
        if data == b"[DONE]":
            continue
        try:
            delta = json.loads(data)["choices"][0].get("delta") or {}
        except (ValueError, KeyError, IndexError):
            continue
        if delta.get("content"):
            token_times.append(at)
            text.append(delta["content"])
    n = len(token_times)
    if n < 2:
        return {"ok": False, "error": f"only {n} token(s) streamed"}
    return {"ok": True, "tokens": n, "ttft_s": token_times[0] - sent,
            "decode_tps": (n - 1) / (token_times[-1] - token_times[0]),
            "e2e_tps": n / (token_times[-1] - sent), "chars": len("".join(text))}


def _tiny(port: int, key: str | None) -> float:
    status, answer, took = http_post(port, "/v1/chat/completions", {
        "model": MODEL, "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}]}, key)
    if status != 200:
        raise RuntimeError(f"request failed with {status}: {answer}")
    return took


def _state(port: int) -> str:
    status, card = http_get(port, f"/v1/models/{MODEL}", MODELHOST_KEY)
    return str(card.get("state")) if status == 200 and isinstance(card, dict) else "?"


def run_realmodel(procs: Procs, workdir: Path, plan: ModelPlan, say: Any) -> dict[str, Any]:
    started = time.monotonic()
    out: dict[str, Any] = {"model": MODEL, "plan": {
        "rounds": plan.rounds, "max_tokens": plan.max_tokens, "swaps": plan.swaps,
        "idle_ttl_s": plan.idle_ttl, "prompt": PROMPT, "speech_rounds": plan.speech_rounds},
        "pinning": {"llama.cpp and speech workers": sorted(ENGINE_CPUS),
                    "gateway + client": sorted(OTHER_CPUS)} if pinning_possible() else None}

    # -- the gateway as shipped: the embedded model, loaded on first use --------------------
    # Cores: both llama.cpp workers (one thread each, llama-cpp-python's default on two
    # cores) get core 0 to themselves; the gateway and the client share core 1, so the relay
    # never takes the engine's core.
    pin = pinning_possible()
    all_cpus = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, OTHER_CPUS)
    try:
        return _run(procs, workdir, plan, say, pin, out, started)
    finally:
        if pin:
            os.sched_setaffinity(0, all_cpus)


def _worker_threads(proc: Proc) -> list[int]:
    """The thread ids of `proc`'s descendants (its workers)."""
    ids: list[int] = []
    for child in proc.tree()[1:]:
        with contextlib.suppress(OSError, psutil.Error):
            ids += [thread.id for thread in child.threads()]
    return ids


def _pin_descendants(proc: Proc, cpus: set[int]) -> int:
    """Move every thread of `proc`'s descendants (its workers) to `cpus`; how many."""
    moved = 0
    for tid in _worker_threads(proc):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)
            moved += 1
    return moved


def _worker_cores(proc: Proc) -> list[int]:
    """Every core any thread of `proc`'s descendants may run on."""
    cores: set[int] = set()
    for tid in _worker_threads(proc):
        with contextlib.suppress(OSError):
            cores |= os.sched_getaffinity(tid)
    return sorted(cores)


def _run(procs: Procs, workdir: Path, plan: ModelPlan, say: Any, pin: bool,
         out: dict[str, Any], started: float) -> dict[str, Any]:
    t0 = time.monotonic()
    gw = start_modelhost(procs, workdir / "builtin", [], include_builtin=True,
                         name="modelhost-builtin", cpus=OTHER_CPUS if pin else None)
    gateway_start = time.monotonic() - t0
    first = _tiny(gw.target.port, MODELHOST_KEY)
    if pin:
        _pin_descendants(gw.proc, ENGINE_CPUS)
    warm = statistics.median(_tiny(gw.target.port, MODELHOST_KEY) for _ in range(5))
    cold = {"gateway_start_s": gateway_start, "first_request_s": first,
            "warm_request_s": warm, "load_s": first - warm}
    say(f"  cold: gateway up in {gateway_start:.2f} s, first request {first:.2f} s "
        f"(warm {warm * 1e3:.0f} ms): load {first - warm:.2f} s")

    # -- the same worker, started by hand with the gateway's own command line ---------------
    port = free_port()
    argv, env = direct_command(port)
    t0 = time.monotonic()
    direct_proc = procs.start("llama-direct", argv, env=clean_env(**env), cwd=workdir,
                              cpus=ENGINE_CPUS if pin else None)
    wait_http(direct_proc, port, "/v1/models", 180)
    direct_start = time.monotonic() - t0
    direct = Target("direct", port)
    _tiny(port, None)
    out["direct_command"] = argv[1:]
    # Where each process runs, read back from the kernel (not what was asked).
    out["cores_seen"] = {"gateway + client": sorted(os.sched_getaffinity(0)),
                         "gateway's llama.cpp worker": _worker_cores(gw.proc),
                         "llama.cpp worker started by hand": direct_proc.cpus()}

    # One unrecorded generation each: llama.cpp caches the prompt after the first one.
    run(generate(direct, plan.max_tokens))
    run(generate(gw.target, plan.max_tokens))
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "modelhost": []}
    for rnd in range(plan.rounds):
        order = [("direct", direct), ("modelhost", gw.target)]
        if rnd % 2:
            order.reverse()
        for name, target in order:
            result = run(generate(target, plan.max_tokens))
            runs[name].append(result)
            if result["ok"]:
                say(f"  round {rnd + 1} {name:<9} {result['tokens']:>4} tokens  "
                    f"decode {result['decode_tps']:6.1f} tok/s  "
                    f"e2e {result['e2e_tps']:6.1f} tok/s  TTFT {result['ttft_s'] * 1e3:6.1f} ms")
            else:
                say(f"  round {rnd + 1} {name:<9} failed: {result['error']}")
    procs.stop(gw.proc)
    procs.stop(direct_proc)
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        ok = [r for r in results if r["ok"]]
        summary[name] = {
            "runs": len(results), "failed": len(results) - len(ok),
            "tokens": [r["tokens"] for r in ok],
            "decode_tps_median": statistics.median(r["decode_tps"] for r in ok) if ok else None,
            "e2e_tps_median": statistics.median(r["e2e_tps"] for r in ok) if ok else None,
            "ttft_ms_median": statistics.median(r["ttft_s"] for r in ok) * 1e3 if ok else None,
            "decode_tps": [r["decode_tps"] for r in ok]}
    d, m = summary["direct"], summary["modelhost"]
    if d["decode_tps_median"] and m["decode_tps_median"]:
        # Each round's two runs are back to back: their ratio is free of the slow drifts of a
        # shared machine. The goal is judged on the median of these paired ratios.
        pairs = [(mr["decode_tps"] / dr["decode_tps"], mr["e2e_tps"] / dr["e2e_tps"])
                 for dr, mr in zip(runs["direct"], runs["modelhost"], strict=True)
                 if dr["ok"] and mr["ok"]]
        summary["paired_decode_ratios"] = [p[0] for p in pairs]
        summary["ratio_decode"] = statistics.median(p[0] for p in pairs)
        summary["ratio_e2e"] = statistics.median(p[1] for p in pairs)
        summary["added_ttft_ms"] = m["ttft_ms_median"] - d["ttft_ms_median"]
    out["tokens_per_s"] = summary
    out["direct_worker_start_s"] = direct_start

    # -- unload -> load: the embedded model's spec with a short idle_ttl --------------------
    spec = SPEC.model_dump(mode="json", exclude_none=True) | {"idle_ttl": plan.idle_ttl}
    gw = start_modelhost(procs, workdir / "swap", [spec], include_builtin=True,
                         name="modelhost-swap", cpus=OTHER_CPUS if pin else None)
    cold_again = _tiny(gw.target.port, MODELHOST_KEY)
    swaps = []
    for i in range(plan.swaps):
        last = time.monotonic()
        warm = _tiny(gw.target.port, MODELHOST_KEY)
        last = time.monotonic()
        seen_stopping = None
        deadline = last + plan.idle_ttl + 30
        state = _state(gw.target.port)
        while state != "cached" and time.monotonic() < deadline:
            if state == "stopping" and seen_stopping is None:
                seen_stopping = time.monotonic()
            time.sleep(0.02)
            state = _state(gw.target.port)
        unloaded = time.monotonic()
        if state != "cached":
            swaps.append({"ok": False, "error": f"still {state} after idle_ttl + 30 s"})
            break
        reload = _tiny(gw.target.port, MODELHOST_KEY)
        swaps.append({"ok": True, "idle_to_unloaded_s": unloaded - last,
                      "stopping_to_cached_s": (unloaded - seen_stopping)
                      if seen_stopping is not None else None,
                      "reload_request_s": reload, "warm_request_s": warm,
                      "load_s": reload - warm})
        say(f"  swap {i + 1}: unloaded {unloaded - last:.2f} s after the last request, "
            f"next request {reload:.2f} s (load {reload - warm:.2f} s)")
    procs.stop(gw.proc)
    ok = [s for s in swaps if s["ok"]]
    out["cold"] = cold | {"second_gateway_first_request_s": cold_again}
    out["swap"] = {"cycles": swaps,
                   "load_s_median": statistics.median(s["load_s"] for s in ok) if ok else None,
                   "reload_request_s_median":
                       statistics.median(s["reload_request_s"] for s in ok) if ok else None}

    # -- speech: the embedded Whisper through modelhost vs its worker directly ---------------
    out["speech_rtf"] = run_speech(procs, workdir / "speech", plan.speech_rounds, say,
                                   engine_cpus=ENGINE_CPUS if pin else None,
                                   other_cpus=OTHER_CPUS if pin else None,
                                   pin_workers=_pin_descendants)
    out["seconds"] = time.monotonic() - started
    return out
