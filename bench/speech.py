"""Speech: the embedded Whisper tiny.en (faster-whisper) through modelhost against the same
speech worker hit directly, on English speech synthesized by espeak-ng.

Real-time factor (RTF) = seconds to answer a transcription request (sent to last byte) / seconds
of audio in it: lower is better, 0.1 means ten times faster than real time.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
import uuid
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import audio  # the tests' espeak-ng speech and word error rate

from modelhost.catalog import BUILTIN_MODELS, package_path
from modelhost.config import PackageSource
from modelhost.workers.plans import launch_plan

from .arms import MODELHOST_KEY, clean_env, start_modelhost
from .procs import Proc, Procs, free_port, wait_http

SPEECH_MODEL = "whisper-tiny.en"
SPEECH_SPEC = next(s for s in BUILTIN_MODELS if s.id == SPEECH_MODEL)
VOICE = "en-us"
# Words per minute (espeak-ng's default 175 gives a WER near 10 % with tiny.en, 150 near 2 %).
SPEED = 150
# About 26 s at 150 words per minute; no digits, so that the words said are the words written.
SCRIPT = ("The old lighthouse stood on a rock at the edge of the bay. Every evening the keeper "
          "climbed the narrow stairs and lit the lamp before the sun went down. One morning "
          "after a storm he found a green bottle on the beach. Inside was a letter from a "
          "sailor who had lost his way many years ago. The keeper read it twice, folded it "
          "carefully and put it in the drawer of his desk, next to the logbook and the map of "
          "the coast.")
RTF_DEFINITION = ("real-time factor = seconds to answer a transcription request (from sending "
                  "it to its last byte) / seconds of audio; lower is better")


def speak_script(path: Path) -> float:
    """SCRIPT spoken by espeak-ng into `path` (the tests' helper: 16 kHz mono WAV); its
    length in seconds."""
    if not audio.have_espeak():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    audio.speak(SCRIPT, path, voice=VOICE, speed=SPEED)
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def direct_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The speech worker's command line and environment, built by modelhost's own launch plan
    (no GPUs, as the gateway starts it here)."""
    assert isinstance(SPEECH_SPEC.source, PackageSource)
    plan = launch_plan(SPEECH_SPEC, package_path(SPEECH_SPEC.source), "127.0.0.1", port, [])
    return plan.argv, plan.env


def multipart(audio: bytes, filename: str) -> tuple[bytes, str]:
    """OpenAI's transcription form: file, model, response_format json; (body, content type)."""
    boundary = f"bench-{uuid.uuid4().hex}"
    parts = []
    for name, value in (("model", SPEECH_MODEL), ("response_format", "json")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: audio/wav\r\n\r\n'.encode()
                 + audio + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def transcribe(port: int, body: bytes, content_type: str, key: str | None,
               timeout: float = 600.0) -> dict[str, Any]:
    """One transcription request: wall seconds (sent to last byte), text, the worker's
    X-Audio-Seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/audio/transcriptions", body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        took = time.perf_counter() - start
        audio_header = resp.getheader("X-Audio-Seconds")
    except (OSError, http.client.HTTPException) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()
    if resp.status != 200:
        return {"ok": False, "error": f"HTTP {resp.status}: {raw[:300].decode(errors='replace')}"}
    try:
        text = str(json.loads(raw)["text"])
    except (ValueError, KeyError, TypeError):
        return {"ok": False, "error": f"not a json transcript: {raw[:300]!r}"}
    return {"ok": True, "seconds": took, "text": text,
            "audio_seconds_reported": float(audio_header) if audio_header else None}


def run_speech(procs: Procs, workdir: Path, rounds: int, say: Callable[[str], None], *,
               engine_cpus: set[int] | None, other_cpus: set[int] | None,
               pin_workers: Callable[[Proc, set[int]], int]) -> dict[str, Any]:
    """Direct worker and gateway, `rounds` interleaved rounds; the result for `speech_rtf`.

    Failure anywhere gives {"measured": False, "note": why}: the rest of the real-model part
    stands. Every process started here is stopped before it returns."""
    started: list[Proc] = []
    try:
        return _measure(procs, workdir, rounds, say, engine_cpus, other_cpus, pin_workers,
                        started)
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
        say(f"  !! speech not measured: {why}")
        return {"measured": False, "note": f"not measured: {why}"}
    finally:
        for proc in started:
            procs.stop(proc)


def _measure(procs: Procs, workdir: Path, rounds: int, say: Callable[[str], None],
             engine_cpus: set[int] | None, other_cpus: set[int] | None,
             pin_workers: Callable[[Proc, set[int]], int], started: list[Proc]
             ) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    wav = workdir / "speech.wav"
    audio_s = speak_script(wav)
    body, content_type = multipart(wav.read_bytes(), wav.name)
    say(f"  speech: {audio_s:.1f} s of espeak-ng speech ({len(SCRIPT.split())} words), "
        f"{rounds} rounds")

    # The speech worker, started by hand with the gateway's own command line. Both workers
    # get the engine's core: the worker sizes its thread pool to the cores it may use at start
    # (one here), the gateway's worker inherits the gateway's single core, so both run one
    # CTranslate2 thread.
    port = free_port()
    argv, env = direct_command(port)
    t0 = time.monotonic()
    direct_proc = procs.start("speech-direct", argv, env=clean_env(**env), cwd=workdir,
                              cpus=engine_cpus)
    started.append(direct_proc)
    wait_http(direct_proc, port, "/v1/models", 180)
    direct_start = time.monotonic() - t0

    gw = start_modelhost(procs, workdir / "gateway", [], include_builtin=True,
                         name="modelhost-speech", cpus=other_cpus)
    started.append(gw.proc)
    # First request through the gateway starts its worker (cold); not counted in the rounds.
    cold = transcribe(gw.target.port, body, content_type, MODELHOST_KEY)
    if not cold["ok"]:
        raise RuntimeError(f"first transcription through modelhost failed: {cold['error']}")
    if engine_cpus:
        pin_workers(gw.proc, engine_cpus)
    warm = [transcribe(port, body, content_type, None),
            transcribe(gw.target.port, body, content_type, MODELHOST_KEY)]
    for w in warm:
        if not w["ok"]:
            raise RuntimeError(f"warm-up transcription failed: {w['error']}")

    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "modelhost": []}
    arms = [("direct", port, None), ("modelhost", gw.target.port, MODELHOST_KEY)]
    for rnd in range(rounds):
        order = arms if rnd % 2 == 0 else arms[::-1]
        for name, arm_port, key in order:
            result = transcribe(arm_port, body, content_type, key)
            if result["ok"]:
                result["rtf"] = result["seconds"] / audio_s
                result["wer"] = audio.word_error_rate(SCRIPT, result["text"])
                say(f"  speech round {rnd + 1} {name:<9} {result['seconds']:6.2f} s  "
                    f"RTF {result['rtf']:.3f}  WER {result['wer']:.1%}")
            else:
                say(f"  speech round {rnd + 1} {name:<9} failed: {result['error']}")
            runs[name].append(result)
    procs.stop(gw.proc)
    procs.stop(direct_proc)

    out: dict[str, Any] = {
        "measured": True, "model": SPEECH_MODEL, "definition": RTF_DEFINITION,
        "audio_s": audio_s, "audio_bytes": len(body), "words": len(audio.normalize_words(SCRIPT)),
        "voice": VOICE, "words_per_minute": SPEED, "script": SCRIPT, "rounds": rounds,
        "direct_command": argv[1:], "direct_worker_start_s": direct_start,
        "gateway_first_request_s": cold["seconds"],
        "audio_s_reported": warm[0].get("audio_seconds_reported"),
    }
    for name, results in runs.items():
        ok = [r for r in results if r["ok"]]
        out[name] = {
            "runs": len(results), "failed": len(results) - len(ok),
            "seconds": [r["seconds"] for r in ok],
            "rtf": [r["rtf"] for r in ok],
            "rtf_median": statistics.median(r["rtf"] for r in ok) if ok else None,
            "wer": [r["wer"] for r in ok],
            "wer_median": statistics.median(r["wer"] for r in ok) if ok else None,
            "transcript": ok[-1]["text"] if ok else None,
            "errors": [r["error"] for r in results if not r["ok"]]}
    # Each round's two requests are back to back: their ratio is free of the slow drifts of a
    # shared machine.
    pairs = [mr["seconds"] / dr["seconds"]
             for dr, mr in zip(runs["direct"], runs["modelhost"], strict=True)
             if dr["ok"] and mr["ok"]]
    out["paired_ratios"] = pairs
    out["ratio"] = statistics.median(pairs) if pairs else None
    d, m = out["direct"], out["modelhost"]
    if m["seconds"]:
        out["gateway_cold_load_s"] = cold["seconds"] - statistics.median(m["seconds"])
    if out["ratio"] is None:
        out["note"] = (f"no round succeeded on both arms: direct "
                       f"{d['errors'][:1] or 'ok'}, modelhost {m['errors'][:1] or 'ok'}")
        return out
    out["added_s_median"] = statistics.median(
        mr["seconds"] - dr["seconds"] for dr, mr in zip(runs["direct"], runs["modelhost"],
                                                        strict=True) if dr["ok"] and mr["ok"])
    out["note"] = (f"RTF {d['rtf_median']:.3f} direct, {m['rtf_median']:.3f} through modelhost "
                   f"(modelhost / direct {out['ratio']:.1%}, per round {min(pairs):.1%} - "
                   f"{max(pairs):.1%}); WER {m['wer_median']:.1%} on {audio_s:.1f} s of "
                   f"espeak-ng speech, {len(pairs)} paired rounds")
    say(f"  speech: {out['note']}")
    return out
