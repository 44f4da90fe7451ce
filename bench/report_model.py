"""The report's sections on the real model (tokens per second, load times, speech) and on
where modelhost spends its time (the py-spy profile)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .report_fmt import cores, f, pct, table

ROOT = Path(__file__).resolve().parent.parent


def model_section(model: dict[str, Any]) -> str:
    tps = model["tokens_per_s"]
    plan = model["plan"]
    rows = []
    for name in ("direct", "modelhost"):
        r = tps[name]
        spread = (f"{min(r['decode_tps']):.1f} - {max(r['decode_tps']):.1f}"
                  if r["decode_tps"] else "-")
        rows.append([name, f"{r['runs']}", str(r["failed"]),
                     ", ".join(map(str, sorted(set(r["tokens"])))),
                     f(r["decode_tps_median"], 1), spread, f(r["e2e_tps_median"], 1),
                     f(r["ttft_ms_median"], 1)])
    text = (f"## Real model: SmolLM2-135M (llama.cpp, CPU)\n\n**Tokens per second.** The "
            f"embedded `{model['model']}` through modelhost (the gateway starts its worker on "
            f"first use) against the same llama.cpp server started by hand with the gateway's "
            f"own command line (`python {_command(model)}`), "
            f"{plan['rounds']} streamed generations each, interleaved, temperature 0, "
            f"`max_tokens` {plan['max_tokens']}. Decode rate: tokens after the first over the "
            f"time between first and last; end to end: tokens over the time from the request. "
            f"{_model_pinning(model)}\n\n")
    text += table(["arm", "runs", "failed", "tokens", "decode tok/s (median)", "range",
                   "end-to-end tok/s (median)", "TTFT ms (median)"], rows)
    if tps.get("ratio_decode") is not None:
        paired = ", ".join(f"{r:.1%}" for r in tps.get("paired_decode_ratios", []))
        text += (f"\n\nmodelhost / direct, median of the rounds' paired ratios (each round runs "
                 f"both arms back to back): decode {tps['ratio_decode']:.1%} (per round: "
                 f"{paired}), end to end {tps['ratio_e2e']:.1%}; time to first token "
                 f"{tps['added_ttft_ms']:+.1f} ms (medians).")
    cold, swap = model["cold"], model["swap"]
    text += "\n\n**Load and swap.**\n\n" + table(["what", "seconds"], [
        ["gateway process start to `/health`", f(cold.get("gateway_start_s"))],
        ["first request (cold: starts the worker, loads the model)",
         f(cold.get("first_request_s"))],
        ["same request, warm", f(cold.get("warm_request_s"), 3)],
        ["cold load to ready (first - warm)", f(cold.get("load_s"))],
        ["first request on a second gateway", f(cold.get("second_gateway_first_request_s"))],
        [f"unload → load: next request after an idle unload (idle_ttl {plan['idle_ttl_s']:g}"
         " s), median", f(swap.get("reload_request_s_median"))],
        ["unload → load: load part (that request - warm), median",
         f(swap.get("load_s_median"))],
        ["llama.cpp worker started by hand, to `/v1/models`",
         f(model.get("direct_worker_start_s"))],
    ])
    cycles = [c for c in swap.get("cycles", []) if c.get("ok")]
    if cycles:
        text += ("\n\nSwap cycles: " + "; ".join(
            f"unloaded {c['idle_to_unloaded_s']:.2f} s after the last request, reloaded in "
            f"{c['reload_request_s']:.2f} s" for c in cycles) + ".")
    text += "\n\n" + _speech(model.get("speech_rtf") or {}, bool(model.get("pinning")))
    return text


def _speech(speech: dict[str, Any], pinned: bool) -> str:
    if not speech.get("measured"):
        return (f"**Speech real-time factor (Whisper tiny.en).** "
                f"{speech.get('note', 'not measured')}.")
    rows = []
    for name in ("direct", "modelhost"):
        r = speech[name]
        rows.append([name, str(r["runs"]), str(r["failed"]), f(r["rtf_median"], 3),
                     f"{min(r['rtf']):.3f} - {max(r['rtf']):.3f}" if r["rtf"] else "-",
                     f(1 / r["rtf_median"] if r["rtf_median"] else None, 1),
                     f(statistics.median(r["seconds"]) if r["seconds"] else None),
                     pct(r["wer_median"])])
    text = (f"**Speech real-time factor.** The embedded `{speech['model']}` (faster-whisper, "
            f"int8, CPU) through modelhost (the gateway starts its worker on the first "
            f"request, which is not counted) against the same speech worker started by hand "
            f"with the gateway's own command line (`python {_command(speech)}`). The audio: "
            f"{speech['audio_s']:.1f} s of English ({speech['words']} words) spoken by "
            f"espeak-ng (voice `{speech['voice']}`, "
            f"{speech.get('words_per_minute', 175)} words per minute), a 16 kHz mono WAV of "
            f"{speech['audio_bytes'] / 1e6:.2f} MB sent as OpenAI's multipart form "
            f"(`response_format` json), {speech['rounds']} rounds, each running both arms back "
            f"to back in alternating order. **Real-time factor (RTF)** = seconds to answer the "
            f"request (sent to last byte, upload and decoding included) / seconds of audio: "
            f"lower is better; *x real time* is its inverse. WER is the word error rate of the "
            f"transcript against the script, a check that both arms really transcribe. "
            + ("Both speech workers run on core 0 (one CTranslate2 thread each: a worker sizes "
               "its pool to the cores it may use), the gateway and the client on core 1.\n\n"
               if pinned else "No core pinning (fewer than 2 cores).\n\n"))
    text += table(["arm", "runs", "failed", "RTF (median)", "RTF range", "x real time",
                   "seconds (median)", "WER (median)"], rows)
    pairs = speech.get("paired_ratios") or []
    if speech.get("ratio") is not None and pairs:
        text += (f"\n\nmodelhost / direct request time, median of the rounds' paired ratios: "
                 f"{speech['ratio']:.1%} (per round {min(pairs):.1%} - {max(pairs):.1%}; "
                 f"{', '.join(f'{p:.1%}' for p in pairs)}); median added time "
                 f"{speech['added_s_median'] * 1e3:+.0f} ms per request.")
    else:
        text += f"\n\n{speech.get('note', '')}"
    text += (f"\n\nCold: the first request through the gateway took "
             f"{f(speech.get('gateway_first_request_s'))} s, "
             f"{f(speech.get('gateway_cold_load_s'))} s more than the median warm one "
             f"(worker start and model load); the speech worker started by hand answered "
             f"`/v1/models` after {f(speech.get('direct_worker_start_s'))} s.")
    transcript = speech["modelhost"].get("transcript")
    if transcript:
        text += f"\n\nTranscript through modelhost (last round): \"{transcript.strip()}\""
    return text


def _model_pinning(model: dict[str, Any]) -> str:
    if not model.get("pinning"):
        return "No core pinning (fewer than 2 cores)."
    text = ("Both llama.cpp workers (the gateway's, moved there once started, and the one "
            "started by hand) run on core 0; the gateway and the client share core 1, so the "
            "relay never competes with the engine for its core.")
    seen = model.get("cores_seen")
    if seen:
        text += " Read back from the kernel: " + cores(seen) + "."
    return text


def _command(model: dict[str, Any]) -> str:
    return " ".join(model.get("direct_command", [])).replace(str(ROOT) + "/", "")


def profile_section(profile: dict[str, Any]) -> str:
    if not profile.get("ok"):
        return f"## Where modelhost spends its time\n\nNot profiled: {profile.get('error')}"
    per_req = profile.get("cpu_us_per_request")
    rows = [[c["what"], pct(c["share"]),
             f(c["share"] * per_req, 0) if per_req else "-"] for c in profile["components"]]
    text = (f"## Where modelhost spends its time\n\npy-spy sampled the gateway's thread "
            f"while it held the GIL ({profile.get('sample_hz', 100)} Hz, non-blocking) for "
            f"{profile['duration_s']:g} s as it relayed "
            f"{profile['rate']} req/s ({profile['requests']:,} requests, p50 "
            f"{f(profile['latency_ms'].get('p50'))} ms, {profile['errors']} errors): "
            f"{f(per_req, 0)} µs of CPU per request. Each sample is charged to the first "
            f"component met walking its stack up from the leaf; *event loop* is time inside "
            f"uvloop's C code (socket reads and writes, polling) that py-spy cannot see "
            f"into. The raw stacks are in `bench/results/{profile['raw']}` (flamegraph "
            f"format).\n\n")
    text += table(["component", "share of samples", "≈ µs per request"], rows)
    text += "\n\nWhere the samples stop (self time, the 12 heaviest lines):\n\n" + table(
        ["function (file:line)", "share"], [[f"`{r['what']}`", pct(r["share"])]
                                            for r in profile["self_top"][:12]])
    text += ("\n\nHeaviest functions of the request path, inclusive (what they and their "
             "callees cost):\n\n" + table(
                 ["function (file:line)", "share"],
                 [[f"`{r['what']}`", pct(r["share"])]
                  for r in profile["inclusive_top"] if r["share"] < 0.9][:16]))
    return text
