"""`modelhost serve` with no key at all is a single-user development server: it refuses a
non-loopback address unless told (`--insecure-no-auth`, MODELHOST_INSECURE_NO_AUTH)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelhost.workers.process import free_port


class Serve:
    """`modelhost serve --host HOST` in a subprocess."""

    def __init__(self, tmp: Path, host: str, *args: str, **env: str) -> None:
        config = tmp / "models.yaml"
        config.write_text("include_builtin: false\nmodels: []\n")
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("MODELHOST_", "OPENAI_API_KEYS", "API_HOST", "API_PORT"))}
        port = free_port()
        address = "127.0.0.1" if host == "0.0.0.0" else host
        self.url = f"http://{'[::1]' if host == '::1' else address}:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelhost", "serve", "--host", host, "--port", str(port),
             "--config", str(config), *args],
            env={**clean, "MODELHOST_DATA_DIR": str(tmp / "data"), "HF_HUB_OFFLINE": "1",
                 **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def started(self) -> bool:
        """True when the server answers (it is then stopped), False when it exited."""
        try:
            deadline = time.monotonic() + 30
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                        return True
                except httpx.HTTPError:
                    time.sleep(0.1)
            return False
        finally:
            self.proc.terminate()
            self.proc.communicate(timeout=30)


def test_no_key_on_a_public_address_is_refused(tmp_path: Path) -> None:
    proc = Serve(tmp_path, "0.0.0.0").proc
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "refusing to serve on 0.0.0.0 with no key configured" in out
    for name in ("OPENAI_API_KEYS", "MODELHOST_ADMIN_KEYS", "--insecure-no-auth",
                 "MODELHOST_INSECURE_NO_AUTH"):
        assert name in out
    assert "Traceback" not in out


@pytest.mark.parametrize(("args", "env"), [
    (("--insecure-no-auth",), {}),
    ((), {"MODELHOST_INSECURE_NO_AUTH": "1"}),
    ((), {"OPENAI_API_KEYS": "sk-inference"}),
    ((), {"MODELHOST_ADMIN_KEYS": "sk-admin"}),
], ids=["flag", "env", "inference-key", "admin-key"])
def test_a_public_address_with_a_key_or_when_told(tmp_path: Path, args: tuple[str, ...],
                                                   env: dict[str, str]) -> None:
    assert Serve(tmp_path, "0.0.0.0", *args, **env).started()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_key(tmp_path: Path, host: str) -> None:
    assert Serve(tmp_path, host).started()
