"""Process settings from the environment: defaults, the seed's names and the MODELHOST_ ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelhost.settings import Settings

# Every name a setting answers to (besides MODELHOST_*), so the developer's environment
# cannot leak into these tests.
LEGACY = {
    "API_HOST", "API_PORT", "MODEL_CACHE_DIR", "HUGGINGFACE_TOKEN", "HF_TOKEN",
    "OPENAI_API_KEYS", "LAZY_LOAD_MODELS", "LOG_LEVEL", "LOG_DIR",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings are read case-insensitively, so clear any spelling of the names.
    for name in list(os.environ):
        upper = name.upper()
        if upper in LEGACY or upper.startswith("MODELHOST_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert settings.api_host == "127.0.0.1"
    assert settings.api_port == 8000
    assert settings.lazy_load_models is True
    assert settings.log_level == "info"
    assert settings.log_dir is None
    assert settings.huggingface_token is None
    assert settings.openai_api_keys == ""
    assert settings.api_keys == []
    assert settings.config_file is None
    assert settings.load_wait_timeout > 0
    assert settings.max_request_bytes > 0
    assert settings.stop_timeout > 0
    assert settings.model_cache_dir.is_absolute()
    assert settings.data_dir.is_absolute()


def test_logs_path_defaults_to_data_dir_logs(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().logs_path == Settings().data_dir / "logs"
    monkeypatch.setenv("MODELHOST_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.logs_path == tmp_path / "logs"


def test_log_dir_overrides_logs_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELHOST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "elsewhere"))
    assert Settings().logs_path == tmp_path / "elsewhere"


# Paths are only named here, never created: Settings reads them and touches nothing.
SRV = Path("/srv/modelhost-test")

SEED_NAMES = {
    "API_HOST": "0.0.0.0",
    "API_PORT": "9000",
    "MODEL_CACHE_DIR": str(SRV / "cache"),
    "HUGGINGFACE_TOKEN": "hf_legacy",
    "OPENAI_API_KEYS": "k1,k2",
    "LAZY_LOAD_MODELS": "false",
    "LOG_LEVEL": "DEBUG",
    "LOG_DIR": str(SRV / "logs"),
}
PREFIXED_NAMES = {
    "MODELHOST_API_HOST": "10.1.2.3",
    "MODELHOST_API_PORT": "8123",
    "MODELHOST_DATA_DIR": str(SRV / "data"),
    "MODELHOST_MODEL_CACHE_DIR": str(SRV / "cache"),
    "MODELHOST_HUGGINGFACE_TOKEN": "hf_new",
    "MODELHOST_OPENAI_API_KEYS": "x",
    "MODELHOST_LAZY_LOAD_MODELS": "0",
    "MODELHOST_LOG_LEVEL": "warning",
    "MODELHOST_LOG_DIR": str(SRV / "logs"),
    "MODELHOST_CONFIG": str(SRV / "models.yaml"),
    "MODELHOST_LOAD_WAIT_TIMEOUT": "12.5",
    "MODELHOST_MAX_REQUEST_BYTES": "1024",
    "MODELHOST_STOP_TIMEOUT": "3",
}
# Each seed name (and HF_TOKEN) set, and its MODELHOST_ name to something else.
BOTH_NAMES = {
    "API_HOST": "0.0.0.0", "MODELHOST_API_HOST": "10.0.0.1",
    "API_PORT": "9000", "MODELHOST_API_PORT": "9001",
    "MODEL_CACHE_DIR": str(SRV / "old"), "MODELHOST_MODEL_CACHE_DIR": str(SRV / "new"),
    "HUGGINGFACE_TOKEN": "hf_old", "MODELHOST_HUGGINGFACE_TOKEN": "hf_new",
    "HF_TOKEN": "hf_standard",
    "OPENAI_API_KEYS": "old", "MODELHOST_OPENAI_API_KEYS": "new",
    "LAZY_LOAD_MODELS": "true", "MODELHOST_LAZY_LOAD_MODELS": "false",
    "LOG_LEVEL": "error", "MODELHOST_LOG_LEVEL": "debug",
    "LOG_DIR": str(SRV / "oldlogs"), "MODELHOST_LOG_DIR": str(SRV / "newlogs"),
}


@pytest.mark.parametrize(("env", "expected"), [
    pytest.param(SEED_NAMES, {
        "api_host": "0.0.0.0", "api_port": 9000, "model_cache_dir": SRV / "cache",
        "huggingface_token": "hf_legacy", "api_keys": ["k1", "k2"],
        "lazy_load_models": False, "log_level": "debug", "log_dir": SRV / "logs",
        "logs_path": SRV / "logs"}, id="the-seeds-names"),
    pytest.param(PREFIXED_NAMES, {
        "api_host": "10.1.2.3", "api_port": 8123, "data_dir": SRV / "data",
        "model_cache_dir": SRV / "cache", "huggingface_token": "hf_new", "api_keys": ["x"],
        "lazy_load_models": False, "log_level": "warning", "logs_path": SRV / "logs",
        "config_file": SRV / "models.yaml", "load_wait_timeout": 12.5,
        "max_request_bytes": 1024, "stop_timeout": 3.0}, id="the-modelhost-prefixed-names"),
    pytest.param(BOTH_NAMES, {
        "api_host": "10.0.0.1", "api_port": 9001, "model_cache_dir": SRV / "new",
        "huggingface_token": "hf_new", "api_keys": ["new"], "lazy_load_models": False,
        "log_level": "debug", "log_dir": SRV / "newlogs"},
        id="prefixed-names-win-over-the-seeds-and-hf-token"),
    pytest.param({"HF_TOKEN": "hf_standard"}, {"huggingface_token": "hf_standard"},
                 id="hf-token-is-accepted-too"),
    pytest.param({"HF_TOKEN": "hf_standard", "HUGGINGFACE_TOKEN": "hf_seed"},
                 {"huggingface_token": "hf_seed"}, id="huggingface-token-wins-over-hf-token"),
    pytest.param({"OPENAI_API_KEYS": "a, b,,c"}, {"api_keys": ["a", "b", "c"]},
                 id="api-keys-are-split-blanks-dropped"),
    pytest.param({"OPENAI_API_KEYS": " , ,"}, {"api_keys": []}, id="api-keys-only-blanks"),
    pytest.param({"OPENAI_API_KEYS": "  sk-one  "}, {"api_keys": ["sk-one"]},
                 id="api-keys-are-trimmed"),
])
def test_environment_names(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                           expected: dict[str, object]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    for field, want in expected.items():
        got = getattr(settings, field)
        # The type too: False, not 0; a Path, not a str.
        assert (type(got), got) == (type(want), want), field


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("no", False),
])
def test_lazy_load_models_spellings(monkeypatch: pytest.MonkeyPatch, raw: str,
                                    expected: bool) -> None:
    monkeypatch.setenv("LAZY_LOAD_MODELS", raw)
    assert Settings().lazy_load_models is expected


@pytest.mark.parametrize("level", ["critical", "error", "warning", "info", "debug", "trace"])
def test_valid_log_levels(monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    monkeypatch.setenv("LOG_LEVEL", f" {level.upper()} ")
    assert Settings().log_level == level


@pytest.mark.parametrize(("name", "value", "match"), [
    pytest.param("LOG_LEVEL", "verbose", "must be one of", id="log-level-verbose"),
    *(pytest.param("API_PORT", port, None, id=f"api-port-{port}")
      for port in ("http", "70000", "-1", "80.5")),
    pytest.param("LAZY_LOAD_MODELS", "sometimes", None, id="lazy-load-models-sometimes"),
    *(pytest.param("MODELHOST_DASHBOARD_PREFIX", prefix, match, id=f"dashboard-prefix-{i}")
      for i, (prefix, match) in enumerate([("ui", None), ("/", None), ("/ui/", None),
                                           ("/v1", "the API's"), ("/api/ui", "the API's"),
                                           ("/metrics", "the API's"), ("/a b", None)])),
])
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                    match: str | None) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=match):
        Settings()


def test_overrides_use_field_names(tmp_path: Path) -> None:
    settings = Settings.with_overrides(api_port=1234, data_dir=tmp_path, log_dir=None)
    assert settings.api_port == 1234
    assert settings.logs_path == tmp_path / "logs"


def test_bare_field_names_are_not_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # CONFIG_FILE, DATA_DIR... belong to other programs (llama-cpp-python reads CONFIG_FILE).
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STOP_TIMEOUT", "99")
    settings = Settings()
    assert settings.data_dir != tmp_path
    assert settings.stop_timeout == 15.0


def test_dashboard_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().dashboard_prefix == "/ui"
    monkeypatch.setenv("MODELHOST_DASHBOARD_PREFIX", "/console/ops")
    assert Settings().dashboard_prefix == "/console/ops"
