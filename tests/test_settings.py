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


def test_seed_legacy_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("API_PORT", "9000")
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_legacy")
    monkeypatch.setenv("OPENAI_API_KEYS", "k1,k2")
    monkeypatch.setenv("LAZY_LOAD_MODELS", "false")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    settings = Settings()
    assert settings.api_host == "0.0.0.0"
    assert settings.api_port == 9000
    assert settings.model_cache_dir == tmp_path / "cache"
    assert settings.huggingface_token == "hf_legacy"
    assert settings.api_keys == ["k1", "k2"]
    assert settings.lazy_load_models is False
    assert settings.log_level == "debug"
    assert settings.log_dir == tmp_path / "logs"
    assert settings.logs_path == tmp_path / "logs"


def test_hf_token_is_accepted_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_standard")
    assert Settings().huggingface_token == "hf_standard"


def test_prefixed_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELHOST_API_HOST", "10.1.2.3")
    monkeypatch.setenv("MODELHOST_API_PORT", "8123")
    monkeypatch.setenv("MODELHOST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MODELHOST_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MODELHOST_HUGGINGFACE_TOKEN", "hf_new")
    monkeypatch.setenv("MODELHOST_OPENAI_API_KEYS", "x")
    monkeypatch.setenv("MODELHOST_LAZY_LOAD_MODELS", "0")
    monkeypatch.setenv("MODELHOST_LOG_LEVEL", "warning")
    monkeypatch.setenv("MODELHOST_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("MODELHOST_CONFIG", str(tmp_path / "models.yaml"))
    monkeypatch.setenv("MODELHOST_LOAD_WAIT_TIMEOUT", "12.5")
    monkeypatch.setenv("MODELHOST_MAX_REQUEST_BYTES", "1024")
    monkeypatch.setenv("MODELHOST_STOP_TIMEOUT", "3")
    settings = Settings()
    assert settings.api_host == "10.1.2.3"
    assert settings.api_port == 8123
    assert settings.data_dir == tmp_path / "data"
    assert settings.model_cache_dir == tmp_path / "cache"
    assert settings.huggingface_token == "hf_new"
    assert settings.api_keys == ["x"]
    assert settings.lazy_load_models is False
    assert settings.log_level == "warning"
    assert settings.logs_path == tmp_path / "logs"
    assert settings.config_file == tmp_path / "models.yaml"
    assert settings.load_wait_timeout == 12.5
    assert settings.max_request_bytes == 1024
    assert settings.stop_timeout == 3.0


def test_prefixed_names_win_over_legacy(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = {
        "API_HOST": ("0.0.0.0", "10.0.0.1"),
        "API_PORT": ("9000", "9001"),
        "MODEL_CACHE_DIR": (str(tmp_path / "old"), str(tmp_path / "new")),
        "HUGGINGFACE_TOKEN": ("hf_old", "hf_new"),
        "OPENAI_API_KEYS": ("old", "new"),
        "LAZY_LOAD_MODELS": ("true", "false"),
        "LOG_LEVEL": ("error", "debug"),
        "LOG_DIR": (str(tmp_path / "oldlogs"), str(tmp_path / "newlogs")),
    }
    for name, (legacy, prefixed) in pairs.items():
        monkeypatch.setenv(name, legacy)
        monkeypatch.setenv(f"MODELHOST_{name}", prefixed)
    # HF_TOKEN loses as well.
    monkeypatch.setenv("HF_TOKEN", "hf_standard")
    settings = Settings()
    assert settings.api_host == "10.0.0.1"
    assert settings.api_port == 9001
    assert settings.model_cache_dir == tmp_path / "new"
    assert settings.huggingface_token == "hf_new"
    assert settings.api_keys == ["new"]
    assert settings.lazy_load_models is False
    assert settings.log_level == "debug"
    assert settings.log_dir == tmp_path / "newlogs"


def test_huggingface_token_wins_over_hf_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_standard")
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_seed")
    assert Settings().huggingface_token == "hf_seed"


def test_api_keys_are_split_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEYS", "a, b,,c")
    assert Settings().api_keys == ["a", "b", "c"]
    monkeypatch.setenv("OPENAI_API_KEYS", " , ,")
    assert Settings().api_keys == []
    monkeypatch.setenv("OPENAI_API_KEYS", "  sk-one  ")
    assert Settings().api_keys == ["sk-one"]


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


def test_invalid_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError, match="must be one of"):
        Settings()


@pytest.mark.parametrize("port", ["http", "70000", "-1", "80.5"])
def test_invalid_api_port(monkeypatch: pytest.MonkeyPatch, port: str) -> None:
    monkeypatch.setenv("API_PORT", port)
    with pytest.raises(ValidationError):
        Settings()


def test_invalid_lazy_load_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZY_LOAD_MODELS", "sometimes")
    with pytest.raises(ValidationError):
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
