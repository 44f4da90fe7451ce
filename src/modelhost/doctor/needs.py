"""What the configured models ask of the host: GPUs, weights to download, quantization.

Read from the specs and from the model cache only (sizes from the listings the downloader
records, `trees/<commit>.json`; the quantization from the checkpoint's `config.json` when
it is there): nothing is fetched from the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelhost.catalog import SourceUnavailable, local_weights
from modelhost.config import Backend, HubSource, ModelSpec
from modelhost.downloads.cache import (
    file_ok,
    local_commit,
    read_listing,
    repo_folder,
    select_files,
)
from modelhost.gpu.scheduler import weights_bytes


@dataclass(frozen=True)
class ModelNeed:
    spec: ModelSpec
    weights: Path | None  # the weights on disk (None: to download, or not found)
    weights_bytes: int | None  # their size, on disk or listed; None when unknown
    download_bytes: int | None  # still to download (0: nothing); None when unknown
    checkpoint_quantization: str | None  # quant_method of the checkpoint's config.json
    missing: str | None = None  # why the weights can never be found (SourceUnavailable)

    @property
    def gpu_count(self) -> int:
        """GPUs the model runs on (0: the CPU, or a remote server)."""
        if self.spec.backend is Backend.remote:
            return 0
        return len(self.spec.gpus) if self.spec.gpus is not None else self.spec.gpu_count

    @property
    def is_vllm(self) -> bool:
        return self.spec.backend is Backend.vllm

    @property
    def from_hub(self) -> bool:
        return isinstance(self.spec.source, HubSource)

    def engine_arg(self, name: str) -> Any:
        for key, value in self.spec.engine_args.items():
            if key.replace("-", "_") == name:
                return value
        return None

    @property
    def quantization(self) -> str | None:
        """What vLLM is told (`engine_args.quantization`), lower case; None: auto."""
        value = self.engine_arg("quantization")
        return str(value).lower() if value not in (None, "", False) else None

    @property
    def awq_checkpoint(self) -> bool:
        """The checkpoint is AWQ: its config.json says so, or (not downloaded yet) its
        repository is named so, as AWQ checkpoints on the hub are."""
        if self.checkpoint_quantization is not None:
            return self.checkpoint_quantization == "awq"
        source = self.spec.source
        return isinstance(source, HubSource) and "awq" in source.hf.lower()


def _checkpoint_quantization(folder: Path | None) -> str | None:
    if folder is None or not folder.is_dir():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        method = config["quantization_config"]["quant_method"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(method).lower() if method else None


def _hub_need(spec: ModelSpec, source: HubSource, cache_dir: Path) -> ModelNeed:
    storage = repo_folder(cache_dir, source.hf)
    commit = local_commit(storage, source.revision)
    snapshot = storage / "snapshots" / commit if commit is not None else None
    listing = read_listing(storage, commit) if commit is not None else None
    quant = _checkpoint_quantization(snapshot)
    if listing is None or snapshot is None:
        # No listing: complete only if the catalog says so (a cache written by other tools).
        weights = local_weights(spec, cache_dir)
        if weights is not None:
            return ModelNeed(spec, weights, weights_bytes(weights), 0, quant)
        return ModelNeed(spec, None, None, None, quant)
    wanted = select_files(listing, source.files)
    total = sum(f.size for f in wanted)
    missing = sum(f.size for f in wanted if not file_ok(snapshot, f))
    return ModelNeed(spec, snapshot if wanted and not missing else None, total, missing, quant)


def model_need(spec: ModelSpec, cache_dir: Path) -> ModelNeed:
    source = spec.source
    if isinstance(source, HubSource):
        return _hub_need(spec, source, cache_dir)
    try:
        weights = local_weights(spec, cache_dir)
    except SourceUnavailable as exc:
        return ModelNeed(spec, None, None, 0, None, missing=str(exc))
    size = weights_bytes(weights) if weights is not None else None
    folder = weights if weights is not None and weights.is_dir() else None
    return ModelNeed(spec, weights, size, 0, _checkpoint_quantization(folder))


def model_needs(specs: list[ModelSpec] | tuple[ModelSpec, ...], cache_dir: Path
                ) -> list[ModelNeed]:
    return [model_need(spec, cache_dir) for spec in specs]
