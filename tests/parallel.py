"""How the suite is shared out among pytest-xdist workers (docs/testing.md).

tests/conftest.py makes a whole-suite run use `WORKERS` workers and hands pytest-xdist the
`ModuleScheduling` below. A unit of work goes to one worker, whose tests run in order:

- a test module is one unit by default: its module-scoped gateways start once, and tests
  that lean on the order of their module (test_ray kills a node last) keep it;
- modules that must not run at the same time as each other share a unit (`GROUPS`);
- a module in `SPLIT` (function-scoped fixtures only, and long) is a unit per test, so that
  its tests spread over the workers.

Units are handed out longest first (`SECONDS`, measured), so that a long module does not
start last and keep one worker busy after the others have finished.

(xdist's own `--dist loadgroup` cannot be used for this with pytest 9.2: it tags a test's
node id with its group, and pytest 9.2's node ids no longer take the tag, so every test
would go its own way: pytest-xdist issue 1386.)
"""

from __future__ import annotations

from collections import OrderedDict

# pytest-xdist ships no type information.
from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

WORKERS = 4
"""Workers for a whole-suite run. Most tests wait on processes (gateways, workers,
llama.cpp, PostgreSQL, Ray, chromium) rather than compute, so more workers than this
machine's 2 cores pay (docs/testing.md)."""

GROUPS: dict[str, str] = {
    # A two-node Ray cluster on 127.0.0.2 and 127.0.0.3 (tests/ray_cluster.py), whose nodes
    # take ports on those addresses that free_port() knows nothing of; gateways whose
    # workers listen on those addresses.
    "test_ray": "loopback-aliases",
    "test_multigateway_lifecycle": "loopback-aliases",
}
"""Modules that share a unit (by module name): they never run at the same time."""

SPLIT: frozenset[str] = frozenset()
"""Modules whose tests are units of their own (no module-scoped fixture, no order)."""

SECONDS: dict[str, float] = {
    # Seconds per module on one of 4 workers of a full run (docs/testing.md); only the
    # order matters. A unit not named here counts a second per test.
    "test_rollout": 440, "loopback-aliases": 366, "test_security": 340, "test_admin": 334,
    "test_lifecycle": 324, "test_large_answers": 239, "test_multigateway": 235,
    "test_admin_safety": 206, "test_audio_limits": 184, "test_cli": 172,
    "test_serve_exposed": 165, "test_usage": 149, "test_fuzz": 137, "test_hub_e2e": 122,
    "test_request_metrics": 119, "test_shared_secrets": 107, "test_metrics": 104,
    "test_speech_worker": 92, "test_uploads": 90, "test_dashboard_browser": 88,
    "test_embedded_models": 81, "test_llamacpp": 78, "test_reload": 75,
    "test_server_limits": 75,
}
"""A unit's weight: its measured seconds, longest first."""


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to."""
    path = nodeid.split("::", 1)[0]
    module = path.rsplit("/", 1)[-1].removesuffix(".py")
    if module in GROUPS:
        return GROUPS[module]
    if module in SPLIT:
        return nodeid
    return path


def weight(unit: str, tests: int) -> float:
    module = unit.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    if "::" not in unit and module in SECONDS:
        return SECONDS[module]
    return float(tests)


class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """xdist's scope scheduling with `unit_of` as the scope, the longest unit first."""

    workqueue: OrderedDict[str, dict[str, bool]]
    _ordered = False

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid)

    def _assign_work_unit(self, node: object) -> None:
        if not self._ordered:  # the first assignment: the queue is complete
            self.workqueue = OrderedDict(sorted(
                self.workqueue.items(), key=lambda unit: -weight(unit[0], len(unit[1]))))
            self._ordered = True
        super()._assign_work_unit(node)
