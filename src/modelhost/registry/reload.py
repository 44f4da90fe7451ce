"""What a reload of the models file changes (`plan`), before anything is changed.

The file is compared with the file as last read, model by model: a model whose entry is the
same is left alone (even one rolled back through the admin API since: the file did not
change it), a changed entry is updated (through the blue-green path of `rollout`), a new one
added, a missing one removed. The models added through the admin API are not the file's and
are left alone, unless the file now declares one of their ids: then the file takes it over,
as it does at start. A plan whose names clash with a model the file does not own changes
nothing (`ReloadError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from modelhost.config import ModelSpec


class ReloadError(Exception):
    """The file cannot be applied as it is; the message says why."""


@dataclass(frozen=True)
class ReloadPlan:
    added: list[ModelSpec] = field(default_factory=list)
    changed: list[ModelSpec] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    taken_over: list[str] = field(default_factory=list)  # API models the file now declares


def plan(previous: Mapping[str, ModelSpec], declared: Iterable[ModelSpec],
         current: Mapping[str, ModelSpec], api_models: set[str]) -> ReloadPlan:
    """`previous`: the file's models as last read (built-in ones included), `declared`: as
    read now, `current`: every model served now by id, `api_models`: the ids added
    through the admin API."""
    result = ReloadPlan()
    new = {spec.id: spec for spec in declared}
    for model_id, spec in new.items():
        if model_id in api_models:
            result.taken_over.append(model_id)
            result.changed.append(spec)
        elif model_id not in current:
            result.added.append(spec)
        elif previous.get(model_id) != spec:
            result.changed.append(spec)
        else:
            result.unchanged.append(model_id)
    result.removed.extend(m for m in previous if m not in new and m in current
                          and m not in api_models)
    # Names: the file's models against one another were checked when it was read; against
    # the models it does not own, here.
    owners = {name: spec.id for spec in current.values()
              if spec.id in api_models and spec.id not in new for name in spec.names}
    for spec in new.values():
        for name in spec.names:
            owner = owners.get(name)
            if owner is not None:
                raise ReloadError(f"name '{name}' of model '{spec.id}' is already used by "
                                  f"model '{owner}', added through the admin API")
    return result
