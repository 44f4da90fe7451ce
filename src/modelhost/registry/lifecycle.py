"""The lifecycle state machine of a model (DESIGN §3).

`TRANSITIONS` is the whole table; `docs/lifecycle.md` renders it and a test keeps the two equal.
Only a model's owner task (`Model`) moves a model between states.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    absent = "absent"            # weights not on this machine
    downloading = "downloading"  # weights being fetched into the cache
    cached = "cached"            # weights on disk (or nothing to fetch), no worker running
    starting = "starting"        # worker spawned, waiting for its readiness probe
    ready = "ready"              # worker answering requests
    stopping = "stopping"        # worker being stopped (SIGTERM, then SIGKILL)
    failed = "failed"            # download or start failed, or too many crashes; see last_error


# (from, to) -> why the transition happens.
TRANSITIONS: dict[tuple[State, State], str] = {
    (State.absent, State.downloading): "the model is wanted and its weights are not cached",
    (State.downloading, State.cached): "every file is downloaded",
    (State.downloading, State.failed): "the download failed",
    (State.downloading, State.absent): "the download was cancelled (partial files are kept "
                                       "so that the next download resumes)",
    (State.cached, State.starting): "the model is wanted: its worker is spawned",
    (State.cached, State.absent): "its files were deleted from the cache",
    (State.starting, State.ready): "the worker answers its readiness probe",
    (State.starting, State.starting): "the worker failed to start or crashed; "
                                      "restart after a backoff (a rollout's new version: "
                                      "no restart, the rollout decides)",
    (State.starting, State.failed): "start failures or crashes exceed max_restarts, or the "
                                    "failure cannot be helped by a retry (bad configuration, "
                                    "missing command)",
    (State.starting, State.stopping): "unload or shutdown while starting",
    (State.ready, State.starting): "the worker crashed: restart after a backoff",
    (State.ready, State.failed): "the worker crashed and its restart budget (max_restarts) "
                                 "is spent",
    (State.ready, State.stopping): "unload, idle TTL expired, or shutdown",
    (State.stopping, State.cached): "the worker process (and its group) is gone",
    (State.failed, State.cached): "a new request or load retries a model whose weights "
                                  "are cached",
    (State.failed, State.absent): "a new request or load retries a model whose "
                                  "download failed, or its files were deleted from the cache",
    (State.failed, State.failed): "a retry finds the weights still missing (package or path)",
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: State, new: State) -> None:
    if (current, new) not in TRANSITIONS:
        raise InvalidTransition(f"{current} -> {new} is not a lifecycle transition")
