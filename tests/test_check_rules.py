"""One case per rule of `modelhost check` (checks/rules.py): files that break the rule, and
the rule found at the file and line it names. The registry is fully covered by the table.

Each case writes real files into a temporary folder (a Hugging Face cache with a config.json
where a rule reads one, a git repository where a rule asks git) and runs the check on them.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from modelhost.checks.report import Outcome, Report, Severity
from modelhost.checks.rules import RULES
from modelhost.checks.runner import run_check
from modelhost.settings import Settings

VLLM = """\
services:
  llm:
    image: vllm/vllm-openai:v0.9.2
    container_name: llm
    ipc: host
    ports: ["127.0.0.1:8000:8000"]
    command: --model org/small-1B --tensor-parallel-size 2 --swap-space 8
      --distributed-executor-backend mp
    deploy:
      resources:
        reservations:
          devices:
            - driver: nvidia
              device_ids: ["0", "1"]
              capabilities: [gpu]
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost:8000/health"]
      start_period: 300s
"""


def vllm_compose(**changes: str) -> str:
    """VLLM with some lines replaced: {old line text: new text}."""
    text = VLLM
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def models_file(engine_args: dict[str, Any], model: str = "org/model-7B",
                gpus: list[int] | None = None, **fields: Any) -> str:
    import yaml

    entry = {"id": "m", "backend": "vllm", "source": {"hf": model},
             "gpus": gpus or [0], "engine_args": {"swap_space": 8, **engine_args},
             "start_timeout": 900, **fields}
    return yaml.safe_dump({"include_builtin": False, "models": [entry]}, sort_keys=False)


def hf_config(model: str, config: dict[str, Any]) -> dict[str, str]:
    """A hub-cache snapshot holding config.json for `model`."""
    folder = f"cache/models--{model.replace('/', '--')}"
    return {f"{folder}/refs/main": "abc123",
            f"{folder}/snapshots/abc123/config.json": json.dumps(config)}


@dataclass
class Case:
    rule: str
    files: dict[str, str]
    line: int | None = None  # the line the finding must point at, where it is fixed
    settings: dict[str, Any] | None = None
    modes: dict[str, int] = field(default_factory=dict)
    git: list[str] = field(default_factory=list)  # files to add to a git repository


CASES = [
    Case("input.unreadable", {"compose.yaml": "services:\n  a: [\n"}),
    Case("input.not-recognised", {"prometheus.yml": "scrape_configs: []\n"}),
    Case("compose.image-unpinned", {"compose.yaml": "services:\n  web:\n    image: nginx\n"},
         line=3),
    Case("compose.container-name-missing",
         {"compose.yaml": vllm_compose(**{"    container_name: llm\n": ""})}, line=2),
    Case("compose.healthcheck-missing", {"compose.yaml": vllm_compose(**{
        '    healthcheck:\n      test: ["CMD", "curl", "-f", "http://localhost:8000/health"]\n'
        "      start_period: 300s\n": ""})}, line=2),
    Case("compose.healthcheck-start-period", {"compose.yaml": vllm_compose(
        **{"start_period: 300s": "start_period: 1m", "org/small-1B": "org/big-70B"})},
        line=18),
    Case("compose.gpu-device-ids", {"compose.yaml": vllm_compose(
        **{'device_ids: ["0", "1"]': "device_ids: ['${CUDA_VISIBLE_DEVICES}']"})}, line=14),
    Case("compose.gpu-missing", {"compose.yaml": vllm_compose(**{
        "    deploy:\n      resources:\n        reservations:\n          devices:\n"
        "            - driver: nvidia\n              device_ids: [\"0\", \"1\"]\n"
        "              capabilities: [gpu]\n": ""})}, line=2),
    Case("compose.shared-memory", {"compose.yaml": vllm_compose(
        **{"    ipc: host\n": "    shm_size: 64m\n"})}, line=5),
    Case("compose.port-exposed-without-key", {"compose.yaml": vllm_compose(
        **{'["127.0.0.1:8000:8000"]': '["8000:8000"]'})}, line=6),
    Case("compose.port-conflict", {"compose.yaml": (
        "services:\n  a:\n    image: nginx:1.27\n    user: nginx\n    ports: ['8080:80']\n"
        "  b:\n    image: httpd:2.4\n    user: www-data\n    ports:\n"
        "      - target: 80\n        published: 8080\n")}, line=10),
    Case("compose.gpu-conflict", {"compose.yaml": (
        "services:\n  a:\n    image: ollama/ollama:0.5.7\n    user: '1000'\n"
        "    container_name: a\n    healthcheck: {test: [CMD, 'true']}\n"
        "    runtime: nvidia\n    environment:\n      NVIDIA_VISIBLE_DEVICES: '0'\n"
        "  b:\n    image: ghcr.io/ggml-org/llama.cpp:server-b4500\n    user: '1000'\n"
        "    container_name: b\n    healthcheck: {test: [CMD, 'true']}\n"
        "    runtime: nvidia\n    environment:\n      NVIDIA_VISIBLE_DEVICES: '0,1'\n")},
        line=17),
    Case("compose.container-name-conflict", {"compose.yaml": (
        "services:\n  a:\n    image: nginx:1.27\n    user: nginx\n    container_name: web\n"
        "  b:\n    image: httpd:2.4\n    user: www-data\n    container_name: web\n")},
        line=9),
    Case("compose.conflicting-definitions", {
        "compose.yaml": VLLM,
        "other/compose.yaml": vllm_compose(**{"--swap-space 8": "--swap-space 8 "
                                              "--max-model-len 4096"})}, line=7),
    Case("compose.duplicate-service", {"compose.yaml": VLLM, "other/compose.yaml": VLLM},
         line=2),
    Case("compose.runs-as-root", {"compose.yaml": VLLM}, line=2),
    Case("compose.user-root", {"compose.yaml": (
        "services:\n  web:\n    image: nginx:1.27\n    user: root\n")}, line=4),
    Case("compose.undefined-variable", {"compose.yaml": (
        "services:\n  web:\n    image: nginx:${NGINX_TAG}\n    user: nginx\n")}, line=3),
    Case("vllm.gpu-memory-utilization",
         {"models.yaml": models_file({"gpu_memory_utilization": 0.99})}, line=11),
    Case("vllm.executor-backend", {"models.yaml": models_file(
        {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}, gpus=[0, 1])},
        line=13),
    Case("vllm.swap-space", {"compose.yaml": vllm_compose(**{" --swap-space 8": ""})}, line=2),
    Case("vllm.quantization-implicit", {
        "models.yaml": models_file({}, model="org/model-7B"),
        **hf_config("org/model-7B", {"num_attention_heads": 32, "max_position_embeddings": 4096,
                                     "quantization_config": {"quant_method": "awq"}})},
        line=5),
    Case("vllm.quantization-mismatch", {
        "models.yaml": models_file({"quantization": "gptq"}, model="org/model-7B-AWQ")},
        line=11),
    Case("vllm.max-model-len-exceeds-model", {
        "models.yaml": models_file({"max_model_len": 131072}, model="Qwen/Qwen3-32B"),
        **hf_config("Qwen/Qwen3-32B", {"num_attention_heads": 64,
                                       "max_position_embeddings": 40960})}, line=11),
    Case("vllm.tensor-parallel-gpus", {"compose.yaml": vllm_compose(
        **{"--tensor-parallel-size 2": "--tensor-parallel-size 4"})}, line=14),
    Case("vllm.tensor-parallel-heads", {
        "models.yaml": models_file({"tensor_parallel_size": 3}, gpus=[0, 1, 2]),
        **hf_config("org/model-7B", {"num_attention_heads": 32})}, line=13),
    Case("secrets.key-in-command", {"compose.yaml": vllm_compose(
        **{"--swap-space 8": "--swap-space 8 --api-key sk-literal-key-0123456789abcdef"})},
        line=7),
    Case("secrets.plaintext", {"Dockerfile": (
        "FROM python:3.12-slim\nENV HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz012345\n"
        "USER nobody\nHEALTHCHECK CMD true\n")}, line=2),
    Case("dockerfile.base-image-unpinned", {"Dockerfile": (
        "ARG BASE=python\nFROM ${BASE}\nUSER nobody\nHEALTHCHECK CMD true\n")}, line=2),
    Case("dockerfile.runs-as-root", {"Dockerfile": (
        "FROM python:3.12-slim\nHEALTHCHECK CMD true\n")}),
    Case("dockerfile.healthcheck-missing", {"Dockerfile": (
        "FROM python:3.12-slim\nUSER nobody\n")}),
    Case("env.secret-committed", {".env": "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz012345\n"},
         line=1, modes={".env": 0o600}, git=[".env"]),
    Case("env.permissions", {".env": "# keys\nVLLM_API_KEY=abcdef0123456789\n"}, line=2,
         modes={".env": 0o644}),
    Case("env.hf-token-format", {".env": "HUGGING_FACE_HUB_TOKEN=abcdef0123456789\n"}, line=1,
         modes={".env": 0o600}),
    Case("models.invalid", {"models.yaml": (
        "models:\n  - id: big\n    backend: vllm\n    source: {hf: org/m}\n")}, line=2),
    Case("models.file-missing", {}, settings={"config_file": "missing.yaml"}),
    Case("models.start-timeout", {"models.yaml": models_file(
        {}, model="org/model-70B", start_timeout=60)}, line=11),
    Case("settings.exposed-without-keys", {}, settings={"api_host": "0.0.0.0"}),
    Case("settings.admin-allow-code", {}, settings={
        "api_host": "10.0.0.5", "admin_keys": "k", "admin_allow_code": True}),
    Case("settings.allowed-hosts-any", {}, settings={"allowed_hosts": "*"}),
    Case("settings.worker-host-exposed", {}, settings={"worker_host": "10.0.0.5"}),
    Case("settings.shared-database-without-secret-key", {}, settings={
        "database_url": "postgresql+psycopg://modelhost@db.internal/modelhost"}),
]


def run_case(case: Case, tmp: Path) -> Report:
    for name, text in case.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, mode in case.modes.items():
        (tmp / name).chmod(mode)
    if case.git:
        subprocess.run(["git", "init", "-q", str(tmp)], check=True)
        subprocess.run(["git", "-C", str(tmp), "add", *case.git], check=True)
    settings = None
    if case.settings is not None:
        overrides = {"openai_api_keys": "", "admin_keys": "", "api_host": "127.0.0.1",
                     **case.settings}
        if "config_file" in overrides:
            overrides["config_file"] = tmp / overrides["config_file"]
        settings = Settings.with_overrides(**overrides)
    inputs = [tmp / name for name in case.files if not name.startswith("cache/")] or [tmp]
    return run_check(inputs, settings=settings, environ={}, cache_dirs=[tmp / "cache"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.rule)
def test_rule(case: Case, tmp_path: Path) -> None:
    report = run_case(case, tmp_path)
    found = [f for f in report.failed() if f.rule.id == case.rule]
    assert found, f"{case.rule} not found in:\n{report.as_text()}"
    finding = found[0]
    assert finding.rule is RULES[case.rule]
    assert finding.message and finding.fix
    assert finding.path is not None
    if case.line is not None:
        assert finding.line == case.line, report.as_text()


def test_every_rule_has_a_case() -> None:
    assert sorted(c.rule for c in CASES) == sorted(RULES)


def test_rule_ids_are_stable_names() -> None:
    for rule_id, rule in RULES.items():
        family, _, name = rule_id.partition(".")
        assert family and name and name == name.lower() and " " not in rule_id
        assert rule.title and rule.why and isinstance(rule.severity, Severity)


CLEAN = {
    "compose.yaml": VLLM.replace("    container_name: llm\n",
                                 "    container_name: llm\n    user: '1000:1000'\n"),
    "Dockerfile": ("ARG PY=3.12\nFROM python:${PY}-slim AS build\nRUN pip wheel .\n"
                   "FROM build\nRUN useradd app\nUSER app\nHEALTHCHECK CMD curl -f "
                   "http://127.0.0.1:8000/ready\n"),
    ".env": "HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz012345\nVLLM_GPU_MEMORY_UTILIZATION=0.9\n",
    "models.yaml": models_file({"tensor_parallel_size": 2, "quantization": "awq_marlin",
                                "max_model_len": 32768}, model="org/model-7B-AWQ",
                               gpus=[0, 1]),
    **hf_config("org/model-7B-AWQ", {"num_attention_heads": 32,
                                     "max_position_embeddings": 32768,
                                     "quantization_config": {"quant_method": "awq"}}),
}


def test_clean_files_have_no_finding(tmp_path: Path) -> None:
    report = run_case(Case("", CLEAN, modes={".env": 0o600},
                           settings={"openai_api_keys": "k"}), tmp_path)
    assert report.failed() == [], report.as_text()
    assert report.exit_status() == 0 and report.score() == 100


@pytest.mark.parametrize(("rope", "limit"), [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    ({"type": "linear", "factor": 2.0}, 81920),
    ({"rope_type": "llama3", "factor": 8.0}, 40960),
])
def test_context_length_follows_rope_scaling(tmp_path: Path, rope: dict[str, Any],
                                             limit: int) -> None:
    files = {"models.yaml": models_file({"max_model_len": limit}, model="Qwen/Qwen3-32B"),
             **hf_config("Qwen/Qwen3-32B", {"max_position_embeddings": 40960,
                                            "rope_scaling": rope})}
    report = run_case(Case("", files), tmp_path)
    assert not [f for f in report.failed() if f.rule.id == "vllm.max-model-len-exceeds-model"]
    files["models.yaml"] = models_file({"max_model_len": limit + 1}, model="Qwen/Qwen3-32B")
    report = run_case(Case("", files), tmp_path)
    assert [f for f in report.failed() if f.rule.id == "vllm.max-model-len-exceeds-model"]


def test_passed_findings_do_not_count(tmp_path: Path) -> None:
    report = run_case(Case("", {}, settings={}), tmp_path)
    assert all(f.outcome is Outcome.FAILED for f in report.findings)
    assert report.failed() == [] and report.score() == 100
