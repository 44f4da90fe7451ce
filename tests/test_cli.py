"""The `modelhost` command line, run as a user runs it (a real process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import GatewayFactory, fake_model


def modelhost(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelhost", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_models_lists_a_running_gateway(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake", aliases=["f"])],
                         env={"OPENAI_API_KEYS": "k1", "MODELHOST_ADMIN_KEYS": "a1,a2"})
    # The CLI sends an admin key: the first of MODELHOST_ADMIN_KEYS (as on the server)...
    env = {"API_PORT": str(gw.port), "OPENAI_API_KEYS": "k1", "MODELHOST_ADMIN_KEYS": "a1,a2"}
    table = modelhost("models", env=env)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "TASK", "BACKEND", "STATE", "GPUS", "ALIASES"]
    assert row.split() == ["fake", "chat", "command", "cached", "-", "f"]
    # ... or MODELHOST_ADMIN_KEY, first.
    as_json = modelhost("models", "--json", "--url", gw.url,
                        env={"MODELHOST_ADMIN_KEY": "a2", "MODELHOST_ADMIN_KEYS": "wrong"})
    assert json.loads(as_json.stdout)[0]["state"] == "cached"


def test_an_inference_key_is_refused_with_what_to_set(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")],
                         env={"OPENAI_API_KEYS": "k1", "MODELHOST_ADMIN_KEYS": "a1"})
    clean = {"MODELHOST_ADMIN_KEY": "", "MODELHOST_ADMIN_KEYS": ""}
    result = modelhost("models", "--url", gw.url, env={**clean, "OPENAI_API_KEYS": "k1"})
    assert result.returncode == 1
    assert "403" in result.stderr and "MODELHOST_ADMIN_KEYS" in result.stderr
    result = modelhost("gpus", "--url", gw.url, env=clean)
    assert result.returncode == 1
    assert "401" in result.stderr and "Missing API key" in result.stderr
    # Without an admin key on the server, the admin API is closed to every key.
    closed = gateway_factory([fake_model("fake")], env={"OPENAI_API_KEYS": "k1"})
    result = modelhost("models", "--url", closed.url, env={**clean, "OPENAI_API_KEYS": "k1"})
    assert result.returncode == 1
    assert "403" in result.stderr and "no admin key" in result.stderr


def test_load_unload_and_gpus(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([fake_model("fake")])
    env = {"MODELHOST_URL": gw.url}
    loaded = modelhost("models", "load", "fake", env=env)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "fake: ready (cpu)"
    as_json = json.loads(modelhost("models", "unload", "fake", "--json", env=env).stdout)
    assert as_json["state"] == "cached"
    pinned = modelhost("models", "load", "fake", "--gpus", "0", env=env)
    assert pinned.returncode == 1
    assert "no NVIDIA GPU" in pinned.stderr
    gpus = modelhost("gpus", env=env)
    assert gpus.returncode == 0
    assert gpus.stdout.startswith("no GPU: ")


def test_models_without_a_gateway_says_so() -> None:
    result = modelhost("models", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "cannot reach the gateway" in result.stderr


def test_config_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - id: a\n    backend: remote\n    source: {url: http://x/v1}\n")
    result = modelhost("config", "validate", str(good))
    assert result.returncode == 0
    assert "OK, 1 model(s)" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - id: a\n    backend: llamacpp\n    max_concurency: 2\n")
    result = modelhost("config", "validate", str(bad))
    assert result.returncode == 1
    assert str(bad) in result.stderr
    assert "model 'a'" in result.stderr
    assert "field 'max_concurency'" in result.stderr


def test_serve_refuses_an_invalid_models_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - id: a\n    backend: nope\n")
    result = modelhost("serve", "--config", str(bad), "--port", "0")
    assert result.returncode == 1
    assert "model 'a', field 'backend'" in result.stderr


def test_serve_refuses_invalid_settings_without_echoing_them(tmp_path: Path) -> None:
    """A bad setting is named with what is wrong, never with the value given (an operator's
    key pasted into the wrong variable must not land in a log)."""
    secret = "sk-live-0123456789abcdef"
    result = modelhost("serve", "--port", "0", env={
        "MODELHOST_MAX_CONNECTIONS": secret, "MODELHOST_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "invalid settings: " in result.stderr and "max_connections" in result.stderr.lower()
    assert secret not in result.stderr
