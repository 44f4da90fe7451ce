"""Process settings, read from the environment.

The names of the gateway this project grew from (``API_HOST``, ``API_PORT``,
``MODEL_CACHE_DIR``, ``HUGGINGFACE_TOKEN``, ``OPENAI_API_KEYS``, ``LAZY_LOAD_MODELS``,
``LOG_LEVEL``, ``LOG_DIR``) keep working; every setting also answers to a
``MODELHOST_``-prefixed name, which wins when both are set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import platformdirs
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str, *legacy: str) -> AliasChoices:
    return AliasChoices(f"MODELHOST_{name}", *legacy)


def _default_cache_dir() -> Path:
    # The Hugging Face hub cache, so that other tools share what modelhost downloads.
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


class Settings(BaseSettings):
    # No populate_by_name: it would make the bare field names (DATA_DIR, CONFIG, ...) settings
    # too, and those names belong to other programs (llama-cpp-python reads CONFIG_FILE).
    model_config = SettingsConfigDict(extra="ignore")

    api_host: str = Field("127.0.0.1", validation_alias=_env("API_HOST", "API_HOST"))
    api_port: int = Field(8000, ge=0, le=65535, validation_alias=_env("API_PORT", "API_PORT"))
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("modelhost")),
        validation_alias=_env("DATA_DIR"),
    )
    model_cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        validation_alias=_env("MODEL_CACHE_DIR", "MODEL_CACHE_DIR"),
    )
    huggingface_token: str | None = Field(
        None, validation_alias=_env("HUGGINGFACE_TOKEN", "HUGGINGFACE_TOKEN", "HF_TOKEN")
    )
    # Comma-separated. When set, every /v1 route requires "Authorization: Bearer <key>".
    openai_api_keys: str = Field("", validation_alias=_env("OPENAI_API_KEYS", "OPENAI_API_KEYS"))
    lazy_load_models: bool = Field(
        True, validation_alias=_env("LAZY_LOAD_MODELS", "LAZY_LOAD_MODELS")
    )
    log_level: str = Field("info", validation_alias=_env("LOG_LEVEL", "LOG_LEVEL"))
    log_dir: Path | None = Field(None, validation_alias=_env("LOG_DIR", "LOG_DIR"))
    # One log line per HTTP request (uvicorn's access log). Off by default: on a busy gateway
    # it is a measurable share of the time spent per request (see docs/benchmarks.md).
    access_log: bool = Field(False, validation_alias=_env("ACCESS_LOG"))
    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed
    # (comma-separated IPs or networks, or *). Empty: the headers are ignored, and the
    # per-request work of looking for them is skipped.
    forwarded_allow_ips: str = Field("", validation_alias=_env("FORWARDED_ALLOW_IPS"))
    config_file: Path | None = Field(None, validation_alias=_env("CONFIG"))
    # SQLAlchemy URL of the state database (default: SQLite in the data directory).
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    # How long a request waits for its model to become ready before a 503.
    load_wait_timeout: float = Field(300.0, gt=0, validation_alias=_env("LOAD_WAIT_TIMEOUT"))
    # Largest JSON request body accepted on the /v1 routes.
    max_request_bytes: int = Field(
        8 * 1024 * 1024, gt=0, validation_alias=_env("MAX_REQUEST_BYTES")
    )
    # Largest upload (audio) accepted; 25 MiB like OpenAI's. Spooled to disk, never memory.
    max_upload_bytes: int = Field(
        25 * 1024 * 1024, gt=0, validation_alias=_env("MAX_UPLOAD_BYTES")
    )
    # Seconds between SIGTERM and SIGKILL when a worker is stopped.
    stop_timeout: float = Field(15.0, gt=0, validation_alias=_env("STOP_TIMEOUT"))

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in {"critical", "error", "warning", "info", "debug", "trace"}:
            raise ValueError("must be one of critical, error, warning, info, debug, trace")
        return value

    @classmethod
    def with_overrides(cls, **overrides: Any) -> Settings:
        """The environment's settings, with some fields set (by field name) on top."""
        values = {}
        for name, value in overrides.items():
            alias = cls.model_fields[name].validation_alias
            assert isinstance(alias, AliasChoices)
            if value is not None:
                values[str(alias.choices[0])] = value
        return cls(**values)

    @property
    def api_keys(self) -> list[str]:
        return [key.strip() for key in self.openai_api_keys.split(",") if key.strip()]

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'modelhost.db'}"

    @property
    def logs_path(self) -> Path:
        return self.log_dir if self.log_dir is not None else self.data_dir / "logs"
