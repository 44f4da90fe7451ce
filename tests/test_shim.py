"""The process-group guardian (`modelhost.workers.shim`), with real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelhost.workers import shim
from tests.conftest import pid_alive, wait_gone

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

SHIM = [sys.executable, "-m", "modelhost.workers.shim"]


# --------------------------------------------------------------------------- helpers


def read_pids(path: Path, count: int, timeout: float = 15.0) -> list[int]:
    """Wait for `path` (written atomically) and read `count` pids from it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(p) for p in path.read_text().split()]
            assert len(pids) == count, pids
            return pids
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written within {timeout} s")


def shim_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MODELHOST_SHIM_PARENT", None)
    return env


def kill_if_running(pid: int) -> None:
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cleanup() -> Iterator[list[int | subprocess.Popen[bytes]]]:
    """Processes (Popen objects we own, or bare pids) to kill whatever the test's outcome."""
    procs: list[int | subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            if isinstance(proc, int):
                kill_if_running(proc)
            else:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=10)
                if proc.stdout is not None:
                    proc.stdout.close()


def write_pids_code(path: Path, expr: str) -> str:
    """Python lines writing the space-separated pids `expr` to `path` atomically."""
    return textwrap.dedent(f"""\
        import os as _os
        with open({str(path) + ".tmp"!r}, "w") as _f:
            _f.write(" ".join(str(p) for p in {expr}))
        _os.replace({str(path) + ".tmp"!r}, {str(path)!r})
        """)


# --------------------------------------------------------------------------- tests


def test_usage_error() -> None:
    assert shim.main([]) == 2
    assert shim.main(["5", "sleep", "1"]) == 2
    assert shim.main(["5", "--"]) == 2


@pytest.mark.parametrize(("code", "status", "output"), [
    ("import sys; print('hello'); sys.exit(3)", 3, "hello"),
    ("pass", 0, None),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + signal.SIGKILL, None),
], ids=["the-commands-status-and-output", "zero", "killed-by-a-signal-is-128-plus-signal"])
def test_exits_with_the_commands_status(code: str, status: int, output: str | None) -> None:
    result = subprocess.run([*SHIM, "5", "--", sys.executable, "-c", code],
                            env=shim_env(), capture_output=output is not None, timeout=30,
                            check=False)
    assert result.returncode == status
    if output is not None:
        assert result.stdout.decode().strip() == output


def test_the_command_does_not_see_the_parent_variable(tmp_path: Path) -> None:
    env = shim_env()
    env["MODELHOST_SHIM_PARENT"] = str(os.getpid())
    code = "import os; print(os.environ.get('MODELHOST_SHIM_PARENT', 'unset'))"
    result = subprocess.run([*SHIM, "5", "--", sys.executable, "-c", code],
                            env=env, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0
    assert result.stdout.decode().strip() == "unset"


def test_sigterm_stops_the_child_and_its_children(
    tmp_path: Path, cleanup: list[int | subprocess.Popen[bytes]]
) -> None:
    pidfile = tmp_path / "pids"
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, subprocess\n"
        "grandchild = subprocess.Popen(['sleep', '300'])\n"
        + write_pids_code(pidfile, "(os.getpid(), grandchild.pid)")
        + "grandchild.wait()\n")
    proc = subprocess.Popen([*SHIM, "10", "--", sys.executable, str(script)],
                            env=shim_env(), start_new_session=True)
    cleanup.append(proc)
    child, grandchild = read_pids(pidfile, 2)
    cleanup += [child, grandchild]
    assert pid_alive(child) and pid_alive(grandchild)
    # Both run in the shim's process group.
    assert os.getpgid(child) == proc.pid and os.getpgid(grandchild) == proc.pid

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    # The worker obeys SIGTERM at once: the shim does not sit out its 10 s grace.
    assert time.monotonic() - started < 5
    assert wait_gone(child, 5)
    assert wait_gone(grandchild, 5)


def test_sigint_stops_the_group_too(
    tmp_path: Path, cleanup: list[int | subprocess.Popen[bytes]]
) -> None:
    pidfile = tmp_path / "pids"
    code = write_pids_code(pidfile, "(_os.getpid(),)") + "import time; time.sleep(300)\n"
    proc = subprocess.Popen([*SHIM, "10", "--", sys.executable, "-c", code],
                            env=shim_env(), start_new_session=True)
    cleanup.append(proc)
    (child,) = read_pids(pidfile, 1)
    cleanup.append(child)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    assert wait_gone(child, 5)


def test_child_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, cleanup: list[int | subprocess.Popen[bytes]]
) -> None:
    pidfile = tmp_path / "pids"
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        + write_pids_code(pidfile, "(_os.getpid(),)")
        + "time.sleep(300)\n")
    proc = subprocess.Popen([*SHIM, "0.5", "--", sys.executable, str(script)],
                            env=shim_env(), start_new_session=True)
    cleanup.append(proc)
    (child,) = read_pids(pidfile, 1)
    cleanup.append(child)

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    elapsed = time.monotonic() - started
    assert wait_gone(child, 5)
    # The shim waited for the grace period, then escalated.
    assert 0.45 <= elapsed < 5


def test_no_orphan_when_the_shims_parent_is_killed(
    tmp_path: Path, cleanup: list[int | subprocess.Popen[bytes]]
) -> None:
    pidfile = tmp_path / "sleep.pid"
    # The worker writes its own pid, then becomes `sleep`.
    worker = ["sh", "-c", 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec sleep 300',
              str(pidfile)]
    intermediate_code = textwrap.dedent(f"""\
        import os, subprocess, sys
        env = dict(os.environ, MODELHOST_SHIM_PARENT=str(os.getpid()))
        shim = subprocess.Popen({[*SHIM, "10", "--", *worker]!r}, env=env,
                                start_new_session=True)
        print(shim.pid, flush=True)
        shim.wait()
        """)
    intermediate = subprocess.Popen([sys.executable, "-c", intermediate_code],
                                    env=shim_env(), stdout=subprocess.PIPE)
    cleanup.append(intermediate)
    assert intermediate.stdout is not None
    shim_pid = int(intermediate.stdout.readline())
    cleanup.append(shim_pid)
    (sleep_pid,) = read_pids(pidfile, 1)
    cleanup.append(sleep_pid)
    assert pid_alive(sleep_pid) and pid_alive(shim_pid)
    assert os.getpgid(sleep_pid) == shim_pid

    intermediate.kill()
    intermediate.wait(timeout=10)
    intermediate.stdout.close()
    assert wait_gone(sleep_pid, 3), "the worker outlived the gateway"
    assert wait_gone(shim_pid, 3)


def test_parent_already_dead_at_start(tmp_path: Path) -> None:
    """A shim whose declared parent is not its parent stops at once, starting nothing."""
    marker = tmp_path / "started"
    env = shim_env()
    # Not our pid: as if the gateway had died and the shim been re-parented.
    env["MODELHOST_SHIM_PARENT"] = str(os.getpid() + 1_000_000)
    code = f"open({str(marker)!r}, 'w').close(); import time; time.sleep(300)"
    result = subprocess.run([*SHIM, "1", "--", sys.executable, "-c", code],
                            env=env, timeout=30, check=False)
    assert result.returncode in (128 + signal.SIGTERM, -signal.SIGTERM)
    assert not marker.exists()
