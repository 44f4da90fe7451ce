"""Findings and their report, shared by `modelhost check` and `modelhost doctor`.

A `Rule` is described once; a `Finding` is a rule applied to one place (a file and line, or
an aspect of the host), with what was seen and the fix. A finding `FAILED` is a problem;
`PASSED` and `NOT_APPLICABLE` findings say what was checked (doctor lists them; they are
never SARIF results and never lower the score).

The score: 100 minus 20 per failed error, 5 per failed warning and 1 per failed info, never
below 0. The exit status: 1 when a failed finding is an error, else 0 (usage errors, 2, are
the CLI's).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
INFORMATION_URI = "https://github.com/modelhost/modelhost/blob/main/docs/check.md"


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


class Outcome(StrEnum):
    FAILED = "failed"
    PASSED = "passed"
    NOT_APPLICABLE = "not_applicable"


# What one failed finding takes off the score of 100.
PENALTY = {Severity.ERROR: 20, Severity.WARNING: 5, Severity.INFO: 1}
# SARIF calls an info a "note".
SARIF_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
_COLOR = {Severity.ERROR: "\x1b[31m", Severity.WARNING: "\x1b[33m", Severity.INFO: "\x1b[36m"}
_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Rule:
    """One rule or doctor check, described once."""

    id: str  # stable, kebab-case, dotted by family: "compose.gpu-device-ids"
    title: str
    severity: Severity
    why: str


@dataclass(frozen=True)
class Finding:
    rule: Rule
    message: str  # what is wrong (or, for PASSED / NOT_APPLICABLE, what was seen)
    fix: str = ""
    replacement: str | None = None  # a concrete replacement text, where one exists
    path: str | None = None
    line: int | None = None
    outcome: Outcome = Outcome.FAILED

    @property
    def severity(self) -> Severity:
        return self.rule.severity

    @property
    def where(self) -> str:
        if self.path is None:
            return ""
        return f"{self.path}:{self.line}" if self.line is not None else self.path

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.id,
            "title": self.rule.title,
            "severity": self.rule.severity.value,
            "outcome": self.outcome.value,
            "path": self.path,
            "line": self.line,
            "message": self.message,
            "why": self.rule.why,
            "fix": self.fix,
            "replacement": self.replacement,
        }


def _sort_key(finding: Finding) -> tuple[str, int, int, str]:
    return (finding.path or "", finding.line or 0, _ORDER[finding.severity], finding.rule.id)


@dataclass
class Report:
    tool: str  # "check" or "doctor"
    findings: list[Finding]
    inputs: list[str] = field(default_factory=list)  # files (or host aspects) examined

    def failed(self) -> list[Finding]:
        return sorted((f for f in self.findings if f.outcome is Outcome.FAILED), key=_sort_key)

    def counts(self) -> dict[str, int]:
        """Failed findings by severity, every severity present."""
        seen = Counter(f.severity for f in self.failed())
        return {s.value: seen.get(s, 0) for s in Severity}

    def score(self) -> int:
        """100 minus 20 per failed error, 5 per failed warning, 1 per failed info; >= 0."""
        return max(0, 100 - sum(PENALTY[f.severity] for f in self.failed()))

    def exit_status(self) -> int:
        return 1 if any(f.severity is Severity.ERROR for f in self.failed()) else 0

    def rules(self) -> list[Rule]:
        """The distinct rules of the findings, in order of first appearance."""
        seen: dict[str, Rule] = {}
        for finding in self.findings:
            seen.setdefault(finding.rule.id, finding.rule)
        return list(seen.values())

    def as_dict(self) -> dict[str, Any]:
        outcomes = Counter(f.outcome.value for f in self.findings)
        return {
            "tool": self.tool,
            "score": self.score(),
            "exit_status": self.exit_status(),
            "summary": {**self.counts(),
                        **{o.value: outcomes.get(o.value, 0) for o in Outcome}},
            "inputs": list(self.inputs),
            "findings": [f.as_dict() for f in sorted(self.findings, key=_sort_key)],
        }

    def as_sarif(self) -> dict[str, Any]:
        rules = [r for r in self.rules()
                 if any(f.rule.id == r.id for f in self.failed())]
        index = {r.id: i for i, r in enumerate(rules)}
        results = []
        for finding in self.failed():
            text = finding.message
            if finding.fix:
                text += f" Fix: {finding.fix}"
            result: dict[str, Any] = {
                "ruleId": finding.rule.id,
                "ruleIndex": index[finding.rule.id],
                "level": SARIF_LEVEL[finding.severity],
                "message": {"text": text},
            }
            if finding.path is not None and not _pseudo(finding.path):
                physical: dict[str, Any] = {"artifactLocation": {"uri": _uri(finding.path)}}
                if finding.line is not None:
                    physical["region"] = {"startLine": max(1, finding.line)}
                result["locations"] = [{"physicalLocation": physical}]
            if finding.replacement is not None:
                result["properties"] = {"replacement": finding.replacement}
            results.append(result)
        return {
            "$schema": SARIF_SCHEMA,
            "version": SARIF_VERSION,
            "runs": [{
                "tool": {"driver": {
                    "name": f"modelhost {self.tool}",
                    "informationUri": INFORMATION_URI,
                    "rules": [{
                        "id": r.id,
                        "name": r.id,
                        "shortDescription": {"text": r.title},
                        "fullDescription": {"text": r.why},
                        "help": {"text": r.why},
                        "defaultConfiguration": {"level": SARIF_LEVEL[r.severity]},
                    } for r in rules],
                }},
                "results": results,
            }],
        }

    def as_text(self, color: bool = False) -> str:
        def paint(severity: Severity, text: str) -> str:
            return f"{_COLOR[severity]}{text}{_RESET}" if color else text

        lines: list[str] = []
        failed = self.failed()
        groups: dict[str, list[Finding]] = {}
        for finding in failed:
            groups.setdefault(finding.path or "(no file)", []).append(finding)
        for path, findings in groups.items():
            lines.append(path)
            for f in findings:
                where = f.where or path
                lines.append(f"  {paint(f.severity, f.severity.value.upper())} "
                             f"[{f.rule.id}] {where}")
                lines.append(f"    {f.message}")
                lines.append(f"    why: {f.rule.why}")
                if f.fix:
                    lines.append(f"    fix: {f.fix}")
                if f.replacement is not None:
                    replacement = f.replacement.rstrip("\n").replace("\n", "\n      ")
                    lines.append(f"    replace with:\n      {replacement}")
            lines.append("")
        others = [f for f in self.findings if f.outcome is not Outcome.FAILED]
        if others:
            for f in sorted(others, key=_sort_key):
                mark = "ok" if f.outcome is Outcome.PASSED else "n/a"
                lines.append(f"  {mark:<4}[{f.rule.id}] {f.message}")
            lines.append("")
        counts = self.counts()
        lines.append(
            f"modelhost {self.tool}: {len(self.inputs)} input(s), "
            f"{counts['error']} error(s), {counts['warning']} warning(s), "
            f"{counts['info']} info; score {self.score()}/100")
        return "\n".join(lines)


def _pseudo(path: str) -> bool:
    """A place that is no file, e.g. "(environment)": no SARIF location."""
    return path.startswith("(") and path.endswith(")")


def _uri(path: str) -> str:
    # SARIF wants a URI reference: a relative path with forward slashes is one.
    return path.replace("\\", "/").replace(" ", "%20")


def render(report: Report, fmt: str) -> str:
    """The report as "text", "json" or "sarif"."""
    if fmt == "text":
        return report.as_text()
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2)
    if fmt == "sarif":
        return json.dumps(report.as_sarif(), indent=2)
    raise ValueError(f"unknown report format {fmt!r} (text, json, sarif)")
