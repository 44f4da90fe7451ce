"""Process settings, read from the environment.

The names of the gateway this project grew from (``API_HOST``, ``API_PORT``,
``MODEL_CACHE_DIR``, ``HUGGINGFACE_TOKEN``, ``OPENAI_API_KEYS``, ``LAZY_LOAD_MODELS``,
``LOG_LEVEL``, ``LOG_DIR``) keep working; every setting also answers to a
``MODELHOST_``-prefixed name, which wins when both are set.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
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
    # How log lines are written: `text` (one readable line) or `json` (one object a line,
    # with the request id of the request a line is about).
    log_format: Literal["text", "json"] = Field("text", validation_alias=_env("LOG_FORMAT"))
    # The gateway's log file in LOG_DIR (the seed's LOG_FILE_NAME), rotated past
    # `log_file_bytes`, keeping `log_file_backups` old files.
    log_file_name: str = Field("modelhost.log", min_length=1,
                               validation_alias=_env("LOG_FILE_NAME", "LOG_FILE_NAME"))
    log_file_bytes: int = Field(20 * 1024 * 1024, gt=0, validation_alias=_env("LOG_FILE_BYTES"))
    log_file_backups: int = Field(5, ge=0, validation_alias=_env("LOG_FILE_BACKUPS"))
    # One log line per HTTP request (uvicorn's access log; the fast path's lines are written
    # from a timer, serving/access.py). Off by default: the lines cost CPU on a busy gateway.
    access_log: bool = Field(False, validation_alias=_env("ACCESS_LOG"))
    # Blue-green updates (registry/rollout.py): each smoke request's timeout, how long the new
    # version is watched after the switch (the old one kept running), the share of failed
    # answers that rolls back (once `rollout_min_requests` answers are in), how often an idle
    # watched version gets a smoke request, and how long the old version's requests may take.
    rollout_probe_timeout: float = Field(60.0, gt=0, validation_alias=_env("ROLLOUT_PROBE_TIMEOUT"))
    rollout_watch_seconds: float = Field(30.0, ge=0, validation_alias=_env("ROLLOUT_WATCH_SECONDS"))
    rollout_error_threshold: float = Field(0.2, ge=0, le=1,
                                           validation_alias=_env("ROLLOUT_ERROR_THRESHOLD"))
    rollout_min_requests: int = Field(5, ge=1, validation_alias=_env("ROLLOUT_MIN_REQUESTS"))
    rollout_probe_every: float = Field(5.0, gt=0, validation_alias=_env("ROLLOUT_PROBE_EVERY"))
    rollout_drain_timeout: float = Field(600.0, ge=0,
                                         validation_alias=_env("ROLLOUT_DRAIN_TIMEOUT"))
    # Addresses of reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed
    # (comma-separated IPs or networks, or *). Empty: the headers are ignored, and the
    # per-request work of looking for them is skipped.
    forwarded_allow_ips: str = Field("", validation_alias=_env("FORWARDED_ALLOW_IPS"))
    config_file: Path | None = Field(None, validation_alias=_env("CONFIG"))
    # SQLAlchemy URL of the state database (default: SQLite in the data directory).
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    # Days the audit log keeps its entries (0: for ever); see docs/operations.md#audit-log.
    audit_retention_days: int = Field(0, ge=0, validation_alias=_env("AUDIT_RETENTION_DAYS"))
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
    # The address local workers listen on, and the one other gateways sharing the database
    # reach them at (default: the worker host; required when that is 0.0.0.0 or ::). Workers
    # take no key: anything but loopback belongs on a private network (docs/scale-out.md).
    worker_host: str = Field("127.0.0.1", min_length=1, validation_alias=_env("WORKER_HOST"))
    worker_advertise_host: str | None = Field(None, min_length=1,
                                              validation_alias=_env("WORKER_ADVERTISE_HOST"))

    # ---------------------------------------------------------------- security (docs/security.md)
    # Comma-separated admin keys: the admin API (and /metrics when protected) needs one; an
    # inference key (OPENAI_API_KEYS) gets 403 there. An admin key also calls /v1.
    admin_keys: str = Field("", validation_alias=_env("ADMIN_KEYS"))
    # Serve with no key at all on a non-loopback address (refused otherwise).
    insecure_no_auth: bool = Field(False, validation_alias=_env("INSECURE_NO_AUTH"))
    # Host names (comma-separated; "*" for any, ".example.com" for a domain and its
    # subdomains) accepted in the Host header, on top of the loopback names and the address
    # the server binds. Anything else is refused (DNS rebinding).
    allowed_hosts: str = Field("", validation_alias=_env("ALLOWED_HOSTS"))
    # Browser origins (comma-separated, e.g. https://app.example.com) allowed to call the API
    # (CORS). Empty: CORS is off and a foreign Origin is refused on state-changing routes.
    cors_origins: str = Field("", validation_alias=_env("CORS_ORIGINS"))
    # Let the admin API set what runs code on the host (`command`, `python`, `env`, a local
    # `source.path`, `trust_remote_code`); by default only the models file may.
    admin_allow_code: bool = Field(False, validation_alias=_env("ADMIN_ALLOW_CODE"))
    # Networks or host names (comma-separated) that `remote` URLs given through the admin API
    # may reach even though they are loopback, link-local or private (refused by default).
    remote_allow: str = Field("", validation_alias=_env("REMOTE_ALLOW"))

    # ---------------------------------------------------------------- limits and deadlines
    # Largest non-streamed answer relayed from a worker; past it the client gets a 502.
    max_answer_bytes: int = Field(
        64 * 1024 * 1024, gt=0, validation_alias=_env("MAX_ANSWER_BYTES")
    )
    # Overall deadline of a non-streamed request once admitted (waiting for a load excluded:
    # LOAD_WAIT_TIMEOUT bounds that); 504 past it.
    request_timeout: float = Field(900.0, gt=0, validation_alias=_env("REQUEST_TIMEOUT"))
    # A stream (or any answer) with no byte from the worker for this long is ended.
    idle_timeout: float = Field(600.0, gt=0, validation_alias=_env("IDLE_TIMEOUT"))
    # A client that reads nothing of its answer for this long is disconnected (stalled reader).
    write_timeout: float = Field(60.0, gt=0, validation_alias=_env("WRITE_TIMEOUT"))
    # Seconds a client may take to send a request's headers, and at most between two pieces
    # of its body; past either the connection is closed (408 when nothing was answered yet).
    header_timeout: float = Field(30.0, gt=0, validation_alias=_env("HEADER_TIMEOUT"))
    body_timeout: float = Field(60.0, gt=0, validation_alias=_env("BODY_TIMEOUT"))
    # Open client connections at most; past it new connections are answered 503 and closed.
    max_connections: int = Field(4096, gt=0, validation_alias=_env("MAX_CONNECTIONS"))
    # Largest JSON body on the admin API.
    max_admin_body_bytes: int = Field(
        1024 * 1024, gt=0, validation_alias=_env("MAX_ADMIN_BODY_BYTES")
    )
    # Multipart uploads: parts at most, and bytes of headers per part.
    max_multipart_parts: int = Field(64, gt=0, validation_alias=_env("MAX_MULTIPART_PARTS"))
    max_part_header_bytes: int = Field(
        16 * 1024, gt=0, validation_alias=_env("MAX_PART_HEADER_BYTES")
    )
    # Longest audio accepted by the speech and diarization workers (checked before decoding).
    max_audio_seconds: float = Field(
        4 * 3600.0, gt=0, validation_alias=_env("MAX_AUDIO_SECONDS")
    )
    # On SIGTERM: how long requests in flight (streams included) may take to finish.
    drain_timeout: float = Field(30.0, ge=0, validation_alias=_env("DRAIN_TIMEOUT"))
    # A worker's log file rotates past this size, keeping this many old files.
    worker_log_bytes: int = Field(
        10 * 1024 * 1024, gt=0, validation_alias=_env("WORKER_LOG_BYTES")
    )
    worker_log_backups: int = Field(3, ge=0, validation_alias=_env("WORKER_LOG_BACKUPS"))

    # A Ray cluster for the workers (docs/scale-out.md): "auto" or HOST:PORT when the gateway
    # runs on a node of it, ray://HOST:10001 through Ray Client. Unset: local workers only.
    ray_address: str | None = Field(None, min_length=1, validation_alias=_env("RAY_ADDRESS"))
    ray_namespace: str = Field("modelhost", min_length=1, validation_alias=_env("RAY_NAMESPACE"))
    # This machine's address in the cluster, when Ray would guess another one.
    ray_node_ip: str | None = Field(None, validation_alias=_env("RAY_NODE_IP"))
    ray_worker_cpus: float = Field(1.0, gt=0, validation_alias=_env("RAY_WORKER_CPUS"))
    # Custom resources every Ray worker reserves (JSON object), on top of a model's own.
    ray_resources: dict[str, float] = Field(default_factory=dict,
                                            validation_alias=_env("RAY_RESOURCES"))
    ray_placement_timeout: float = Field(30.0, gt=0,
                                         validation_alias=_env("RAY_PLACEMENT_TIMEOUT"))
    ray_heartbeat: float = Field(1.0, gt=0, validation_alias=_env("RAY_HEARTBEAT"))
    ray_lost_after: float = Field(5.0, gt=0, validation_alias=_env("RAY_LOST_AFTER"))
    # Seals the secrets of models added through the admin API into the state database
    # (sealing.py), so that every gateway with the same key serves them; unset: they stay in
    # DATA_DIR/secrets.json. Or the path of a file that holds it (Docker/Kubernetes secrets).
    secret_key: SecretStr | None = Field(None, validation_alias=_env("SECRET_KEY"))
    secret_key_file: Path | None = Field(None, validation_alias=_env("SECRET_KEY_FILE"))
    # Earlier secret keys (comma-separated): what they sealed still opens, and is sealed
    # again with secret_key at start (changing the key: docs/configuration.md#secret-key).
    secret_key_fallbacks: SecretStr | None = Field(
        None, validation_alias=_env("SECRET_KEY_FALLBACKS"))
    # Where the web dashboard is served (`/` redirects there); its pages check their own
    # session (an admin key signs in), the API routes keep theirs.
    dashboard_prefix: str = Field("/ui", pattern=r"^(/[A-Za-z0-9._~-]+)+$",
                                  validation_alias=_env("DASHBOARD_PREFIX"))

    @field_validator("dashboard_prefix")
    @classmethod
    def _dashboard_prefix(cls, value: str) -> str:
        first = value.split("/")[1]
        if first in {"v1", "api", "metrics", "health", "ready", "docs", "redoc",
                     "openapi.json"}:
            raise ValueError(f"'/{first}' is the API's; choose another prefix (e.g. /ui)")
        return value

    @model_validator(mode="after")
    def _worker_advertise_host(self) -> Settings:
        if self.worker_advertise_host is None and is_unspecified(self.worker_host):
            raise ValueError(f"MODELHOST_WORKER_HOST is {self.worker_host} (every interface): "
                             "set MODELHOST_WORKER_ADVERTISE_HOST to the address other "
                             "gateways reach this machine's workers at")
        return self

    @model_validator(mode="after")
    def _secret_key(self) -> Settings:
        from modelhost.sealing import MIN_KEY_LENGTH

        if self.secret_key is None and self.secret_key_file is not None:
            try:
                text = self.secret_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"MODELHOST_SECRET_KEY_FILE cannot be read: "
                                 f"{exc.strerror or exc}") from None
            self.secret_key = SecretStr(text)
        if self.secret_key is not None and len(self.secret_key.get_secret_value()) \
                < MIN_KEY_LENGTH:
            raise ValueError(f"MODELHOST_SECRET_KEY must be at least {MIN_KEY_LENGTH} "
                             "characters (e.g. `openssl rand -base64 32`)")
        if any(len(k) < MIN_KEY_LENGTH for k in self.secret_key_fallback_list):
            raise ValueError(f"each of MODELHOST_SECRET_KEY_FALLBACKS must be at least "
                             f"{MIN_KEY_LENGTH} characters")
        if self.secret_key_fallback_list and self.secret_key is None:
            raise ValueError("MODELHOST_SECRET_KEY_FALLBACKS needs MODELHOST_SECRET_KEY")
        return self

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
        return _split(self.openai_api_keys)

    @property
    def admin_api_keys(self) -> list[str]:
        return _split(self.admin_keys)

    @property
    def allowed_host_names(self) -> list[str]:
        return [h.lower() for h in _split(self.allowed_hosts)]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.rstrip("/") for o in _split(self.cors_origins)]

    @property
    def secret_key_fallback_list(self) -> tuple[str, ...]:
        value = self.secret_key_fallbacks
        return tuple(_split(value.get_secret_value())) if value is not None else ()

    @property
    def remote_allow_list(self) -> list[str]:
        return _split(self.remote_allow)

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'modelhost.db'}"

    @property
    def logs_path(self) -> Path:
        return self.log_dir if self.log_dir is not None else self.data_dir / "logs"


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def is_loopback(host: str) -> bool:
    """Whether an address (`api_host`) is 127.0.0.0/8, ::1 or localhost: a server there is
    reachable from this machine only."""
    name = host.strip().lower().strip("[]").rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    """Whether an address is 0.0.0.0 or :: (every interface: no address to reach it at)."""
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False
