"""Where modelhost spends its time per request: py-spy samples the gateway while it relays an
open-loop load, and the stacks are summed by component."""

from __future__ import annotations

import asyncio
import collections
import shutil
import sys
from pathlib import Path
from typing import Any

from .aio import run
from .arms import Arm
from .loadgen import Client, open_loop
from .overhead import BODY
from .stats import ms_summary

# A sample's time goes to the first of these met walking its stack from the leaf up.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    # The two writes of a request: their samples are the kernel's loopback path (waking the
    # reader included), whichever layer made the call.
    ("socket writes (request to the worker, answer to the client)",
     ("CoalescingWriter.write (", "CoalescingWriter.write_now (",
      "_send (modelhost/upstream", "UpstreamClient.start (")),
    ("logging (uvicorn access log, handlers, file writes)",
     ("logging/", "uvicorn/logging.py")),
    ("json encode/decode", ("json/",)),
    ("modelhost auth (KeyGuard, hashlib)", ("modelhost/auth.py", "hashlib")),
    ("modelhost client to the worker (upstream/, httptools)",
     ("modelhost/upstream", "httptools/parser")),
    # (The files named before serving/ existed are kept, so that `--commit` of an older
    # revision is grouped the same way.)
    ("modelhost server hot path (serving/protocol.py, wire.py, limits.py)",
     ("modelhost/server.py", "modelhost/serving/protocol.py", "modelhost/serving/wire.py",
      "modelhost/serving/limits.py", "modelhost/serving/server.py")),
    ("modelhost handler (serving/front.py, endpoint.py, answers.py, api/)",
     ("modelhost/front.py", "modelhost/asgi.py", "modelhost/api/",
      "modelhost/serving/front.py", "modelhost/serving/endpoint.py",
      "modelhost/serving/answers.py")),
    ("modelhost call + admission + registry (serving/call.py, stream.py, registry/)",
     ("modelhost/relay.py", "modelhost/serving/call.py", "modelhost/serving/stream.py",
      "modelhost/serving/failures.py", "modelhost/admission.py", "modelhost/registry/")),
    ("aiohttp client (request to the worker)", ("aiohttp/", "yarl/", "multidict/")),
    ("FastAPI app layers (telemetry, body limit, exit stack, router)",
     ("fastapi/", "opentelemetry/")),
    ("starlette (routing, Request, Response, exceptions)", ("starlette/",)),
    ("uvicorn HTTP protocol (httptools)", ("uvicorn/",)),
    ("asyncio machinery (tasks, futures, streams)", ("asyncio/",)),
]
SAMPLE_HZ = 250
EVENT_LOOP = "event loop + socket I/O (uvloop, native)"


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in COMPONENTS:
            if any(m in frame for m in markers):
                return name
    return "other"


def summarize(raw: Path, top: int = 30) -> dict[str, Any]:
    """Collapsed stacks (py-spy --format raw) → totals per component and per function."""
    total = 0
    components: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        total += n
        leaf = frames[-1] if frames else "?"
        # A leaf in the loop's own Python frames means time inside uvloop's C code.
        if leaf.startswith(("Runner.run ", "run ", "Server.serve ", "Server.main_loop ",
                            "Server._serve ", "run_until_complete ", "asyncio_run ")) \
                or "asyncio/runners.py" in leaf:
            components[EVENT_LOOP] += n
        else:
            components[_component(frames)] += n
        own[leaf] += n
        for frame in dict.fromkeys(frames):  # not a set: ties keep one order, run to run
            inclusive[frame] += n
    def share(counter: collections.Counter[str], n: int) -> list[dict[str, Any]]:
        return [{"what": k, "share": v / total} for k, v in counter.most_common(n)]

    interesting = collections.Counter({k: v for k, v in inclusive.items()
                                       if any(m in k for m in ("modelhost/", "starlette/",
                                                               "uvicorn/", "aiohttp/",
                                                               "logging/", "json/"))})
    return {"samples": total, "components": share(components, len(components)),
            "self_top": share(own, top), "inclusive_top": share(interesting, top)}


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


async def _load_while_sampling(arm: Arm, rate: int, duration: float, out: Path, spy: str
                               ) -> dict[str, Any]:
    client = Client(arm.target)
    await open_loop(client, BODY, rate, 1.0, seed=5)  # warm
    # py-spy attaches first (reading the interpreter's symbols takes a moment of CPU); the
    # load starts once it samples, and stops before it does. `--gil` samples the thread that
    # holds the GIL, i.e. while the interpreter runs (uvloop lets go of it while it waits for
    # events): py-spy's other test of an active thread, its state in /proc, also counts the
    # time a woken gateway waits for its idle core to wake up, which on this machine put most
    # samples in the event loop once the gateway had a core of its own. `--nonblocking`
    # reads the stacks without stopping the process, so its cost stays with py-spy.
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(arm.proc.pid), "--rate", str(SAMPLE_HZ), "--duration",
        str(int(duration + 3)), "--format", "raw", "--output", str(out), "--nonblocking",
        "--gil",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await asyncio.sleep(2.0)
        cpu0 = arm.proc.cpu_seconds()
        res = await open_loop(client, BODY, rate, duration, seed=6)
        cpu = arm.proc.cpu_seconds() - cpu0
        output, _ = await asyncio.wait_for(proc.communicate(), duration + 40)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        client.close()
    return {"rate": rate, "duration_s": duration, "requests": res.total,
            "errors": res.error_count, "latency_ms": ms_summary(res.latency),
            "cpu_us_per_request": cpu / res.total * 1e6 if res.total else None,
            "py_spy_output": output.decode(errors="replace")[-2000:]}


def profile_gateway(arm: Arm, rate: int, duration: float, out: Path, say: Any
                    ) -> dict[str, Any]:
    """Sample `arm`'s process with py-spy while it relays `rate` req/s for `duration` s."""
    spy = py_spy()
    if spy is None:
        return {"ok": False, "error": "py-spy is not installed"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    measured = run(_load_while_sampling(arm, rate, duration, out, spy))
    if not out.exists():
        return {"ok": False, "error": f"py-spy wrote nothing: {measured['py_spy_output']}"}
    summary = summarize(out)
    say(f"  profiled {arm.name} at {rate} req/s: "
        f"{measured['cpu_us_per_request'] or 0:.0f} us CPU per request, "
        f"{summary['samples']} samples")
    return {"ok": True, **measured, "sample_hz": SAMPLE_HZ, "raw": out.name, **summary}
