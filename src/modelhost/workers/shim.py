"""Process-group guardian placed between the gateway and every worker.

    python -m modelhost.workers.shim GRACE_SECONDS -- COMMAND [ARGS...]

The gateway starts this shim as the leader of a new process group; the shim starts the real
worker (vllm, llama.cpp, ...) inside that group and stays as its parent. It guarantees that no
worker outlives the gateway, even when the gateway is killed with SIGKILL and cannot clean up:

* Linux: PR_SET_PDEATHSIG delivers SIGTERM to the shim the moment its parent dies; a thread
  also polls getppid() once a second (the only mechanism on other systems).
* On SIGTERM/SIGINT (a graceful stop, or the parent's death) the shim sends SIGTERM to the
  whole group, so the worker's own children (vLLM's tensor-parallel processes) stop too,
  waits GRACE_SECONDS, then SIGKILLs the group.

The shim exits with the worker's exit status (128 + signal number when it was killed), or
127/126 when the command is missing or not executable.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def poll() -> None:
        while True:
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(1.0)

    threading.Thread(target=poll, daemon=True).start()
    # The parent may have died before prctl took effect.
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _others_in_group(pgid: int) -> bool:
    """Whether a live process other than the shim is in the group (always True where /proc
    cannot tell, so that the group is swept)."""
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m modelhost.workers.shim GRACE -- COMMAND [ARGS...]",
              file=sys.stderr)
        return 2
    grace = float(argv[0])
    parent = int(os.environ.pop("MODELHOST_SHIM_PARENT", os.getppid()))
    # A plain flag: a signal handler that takes a lock (threading.Event.set) deadlocks when the
    # signal lands while the main thread holds that lock inside Event.wait() - a shim stuck so
    # outlived its dead gateway with its worker.
    stopping: list[bool] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _watch_parent(parent)
    if stopping:
        return 128 + signal.SIGTERM

    try:
        child = subprocess.Popen(argv[2:])
    except OSError as exc:
        print(f"modelhost shim: cannot execute {argv[2]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    while child.poll() is None and not stopping:
        time.sleep(0.1)  # the flag is seen within 0.1 s of a signal
    if stopping and child.poll() is None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pgid = os.getpgrp()
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if child.poll() is None or _others_in_group(pgid):
            # Kill whatever is left in the group (the worker's own children, the shim too).
            os.killpg(pgid, signal.SIGKILL)
    code = child.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
