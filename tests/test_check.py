"""`modelhost check` on the audit's two compose files (tests/fixtures/check/audit, written
from ../shared/seeds/000_*: every defect the audit names is found) and on their corrected
versions (nothing at warning level or above); formatting variants of the same files; the
text, JSON and SARIF reports; the command's exit statuses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from modelhost.checks.report import Finding, Outcome, Report, Rule, Severity, render
from modelhost.checks.rules import RULES
from modelhost.checks.runner import run_check
from modelhost.cli_check import check

FIXTURES = Path(__file__).parent / "fixtures" / "check"
FILE1 = "docker-compose-qwen3-medium.yml"
FILE2 = "configs/docker/profiles/medium.yml"

# Every defect the audit names: (rule id, words of the message, the file it is in).
AUDIT_DEFECTS = [
    ("compose.image-unpinned", ["latest"], FILE2),
    ("compose.conflicting-definitions", ["image", "v0.9.2", "latest"], FILE2),
    ("compose.conflicting-definitions", ["max-model-len", "70000", "131072"], FILE2),
    ("compose.conflicting-definitions", ["quantization", "(not set)", "awq_marlin"], FILE2),
    ("vllm.quantization-implicit", ["AWQ"], FILE1),
    ("vllm.executor-backend", ["ray"], FILE1),
    ("compose.conflicting-definitions", ["distributed-executor-backend", "ray", "mp"], FILE2),
    ("compose.healthcheck-start-period", ["30s", "Qwen/Qwen3-32B-AWQ"], FILE1),
    ("compose.container-name-missing", ["vllm-medium-qwen3"], FILE1),
    ("vllm.swap-space", ["swap"], FILE1),
    ("compose.gpu-device-ids", ["${CUDA_VISIBLE_DEVICES}"], FILE2),
    ("vllm.gpu-memory-utilization", ["0.97"], FILE2),
    ("secrets.plaintext", ["HUGGING_FACE_HUB_TOKEN"], FILE1),
    ("vllm.tensor-parallel-gpus", ["tensor-parallel-size 2", "given 1"], FILE1),
    ("vllm.tensor-parallel-gpus", ["tensor-parallel-size 2", "given 1"], FILE2),
]


def copy(name: str, tmp: Path) -> Path:
    """A fixture folder copied out of git (so that .env is not a committed file), with its
    .env readable by its owner only, as the audit's own checklist wants."""
    target = tmp / name
    shutil.copytree(FIXTURES / name, target)
    (target / ".env").chmod(0o600)
    return target


def check_folder(folder: Path, environ: dict[str, str] | None = None,
                 files: tuple[str, ...] = (FILE1, FILE2)) -> Report:
    return run_check([folder / f for f in files], environ=environ or {}, cache_dirs=[])


def has(report: Report, rule: str, words: list[str], file: str) -> bool:
    return any(f.rule.id == rule and f.path is not None and f.path.endswith(file)
               and f.line is not None and all(w in f.message for w in words)
               for f in report.failed())


@pytest.mark.parametrize(("rule", "words", "file"), AUDIT_DEFECTS,
                         ids=[f"{r}-{w[0]}" for r, w, _ in AUDIT_DEFECTS])
def test_every_audit_defect_is_found(tmp_path: Path, rule: str, words: list[str],
                                     file: str) -> None:
    report = check_folder(copy("audit", tmp_path))
    assert has(report, rule, words, file), report.as_text()
    assert report.exit_status() == 1


def test_device_ids_from_the_env_file_say_the_one_id(tmp_path: Path) -> None:
    report = check_folder(copy("audit", tmp_path), {"CUDA_VISIBLE_DEVICES": "0,1"})
    found = [f for f in report.failed() if f.rule.id == "compose.gpu-device-ids"]
    assert found and "'0,1'" in found[0].message
    assert found[0].replacement == "device_ids: ['0', '1']"


def test_the_unpinned_image_gets_the_other_files_version(tmp_path: Path) -> None:
    report = check_folder(copy("audit", tmp_path))
    found = next(f for f in report.failed() if f.rule.id == "compose.image-unpinned")
    assert found.replacement == "image: vllm/vllm-openai:v0.9.2"
    assert found.line == 8


def test_each_audit_file_alone_still_shows_its_own_defects(tmp_path: Path) -> None:
    folder = copy("audit", tmp_path)
    alone = {f.rule.id for f in check_folder(folder, files=(FILE1,)).failed()}
    assert {"compose.healthcheck-start-period", "compose.container-name-missing",
            "vllm.swap-space", "vllm.executor-backend", "vllm.quantization-implicit",
            "secrets.plaintext", "vllm.tensor-parallel-gpus"} <= alone
    alone = {f.rule.id for f in check_folder(folder, files=(FILE2,)).failed()}
    assert {"compose.image-unpinned", "compose.gpu-device-ids",
            "vllm.gpu-memory-utilization", "vllm.tensor-parallel-gpus"} <= alone


def test_corrected_files_have_no_error_or_warning(tmp_path: Path) -> None:
    report = check_folder(copy("corrected", tmp_path))
    serious = [f for f in report.failed() if f.severity is not Severity.INFO]
    assert serious == [], report.as_text()
    assert report.exit_status() == 0
    # The .env beside the root compose file is examined too.
    assert any(i.endswith(".env") for i in report.inputs)


# ------------------------------------------------------------------ formatting variants

def _variant(folder: Path, change: Any) -> None:
    path = folder / FILE1
    data = yaml.safe_load(path.read_text())
    change(data["services"]["vllm-medium-qwen3"])
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _command_list(service: dict[str, Any]) -> None:
    service["command"] = service["command"].split()


def _command_equals(service: dict[str, Any]) -> None:
    words, out = service["command"].split(), []
    while words:
        word = words.pop(0)
        if word.startswith("--") and words and not words[0].startswith("--"):
            word = f"{word}={words.pop(0)}"
        out.append(word)
    service["command"] = " ".join(out)


def _vllm_serve(service: dict[str, Any]) -> None:
    words = service["command"].split()
    model = words[words.index("--model") + 1]
    rest = [w for i, w in enumerate(words) if w != "--model" and w != model]
    service["command"] = ["vllm", "serve", model, *rest]


def _env_mapping(service: dict[str, Any]) -> None:
    service["environment"] = dict(item.split("=", 1) for item in service["environment"])


def _long_ports(service: dict[str, Any]) -> None:
    service["ports"] = [{"target": 8000, "published": "${VLLM_PORT_MEDIUM:-5002}"}]


@pytest.mark.parametrize("change", [_command_list, _command_equals, _vllm_serve, _env_mapping,
                                    _long_ports])
def test_formatting_variants_find_the_same(tmp_path: Path, change: Any) -> None:
    baseline = {f.rule.id for f in check_folder(copy("audit", tmp_path)).failed()}
    folder = copy("audit", tmp_path / "variant")
    _variant(folder, change)
    found = {f.rule.id for f in check_folder(folder).failed()}
    assert baseline == found, baseline ^ found


# ------------------------------------------------------------------ report forms

RULE = Rule("demo.rule", "A demo rule", Severity.WARNING, "Because.")
ERR = Rule("demo.error", "An error", Severity.ERROR, "It breaks.")


def sample() -> Report:
    return Report("check", [
        Finding(ERR, "broken", fix="mend it", replacement="a: 1", path="x.yml", line=3),
        Finding(RULE, "iffy", fix="look", path="x.yml", line=1),
        Finding(RULE, "fine", outcome=Outcome.PASSED),
        Finding(ERR, "no GPU", outcome=Outcome.NOT_APPLICABLE),
    ], ["x.yml"])


def test_score_and_exit_status() -> None:
    report = sample()
    assert report.score() == 100 - 20 - 5
    assert report.exit_status() == 1
    assert [f.message for f in report.failed()] == ["iffy", "broken"]  # by file, then line
    assert Report("check", [Finding(RULE, "x")] * 30, []).score() == 0
    assert Report("check", [Finding(RULE, "x")], []).exit_status() == 0


def test_text_form() -> None:
    text = render(sample(), "text")
    assert "x.yml\n" in text
    assert "ERROR [demo.error] x.yml:3" in text and "WARNING [demo.rule] x.yml:1" in text
    assert "why: It breaks." in text and "fix: mend it" in text and "a: 1" in text
    assert text.splitlines()[-1] == ("modelhost check: 1 input(s), 1 error(s), 1 warning(s), "
                                     "0 info; score 75/100")
    assert "\x1b[" not in text and "\x1b[31m" in sample().as_text(color=True)


def test_json_form() -> None:
    data = json.loads(render(sample(), "json"))
    assert data["tool"] == "check" and data["score"] == 75 and data["exit_status"] == 1
    assert data["summary"]["error"] == 1 and data["summary"]["passed"] == 1
    assert data["summary"]["not_applicable"] == 1
    first = data["findings"][0]
    assert set(first) >= {"rule", "severity", "outcome", "path", "line", "message", "why",
                          "fix", "replacement"}


def validate_sarif(sarif: dict[str, Any]) -> None:
    assert sarif["version"] == "2.1.0"
    assert sarif["$schema"].endswith("sarif-2.1.0.json")
    assert len(sarif["runs"]) == 1
    run = sarif["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    for rule in rules:
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert rule["defaultConfiguration"]["level"] in ("error", "warning", "note")
    assert {r["ruleId"] for r in run["results"]} == set(ids)
    for result in run["results"]:
        assert ids[result["ruleIndex"]] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note")
        assert result["message"]["text"]
        for location in result.get("locations", []):
            physical = location["physicalLocation"]
            assert physical["artifactLocation"]["uri"]
            assert physical.get("region", {"startLine": 1})["startLine"] >= 1


def test_sarif_form() -> None:
    sarif = json.loads(render(sample(), "sarif"))
    validate_sarif(sarif)
    results = sarif["runs"][0]["results"]
    assert len(results) == 2  # passed and not-applicable findings are no results
    located = next(r for r in results if r["ruleId"] == "demo.error")
    assert located["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "x.yml"}, "region": {"startLine": 3}}


def test_sarif_of_the_audit(tmp_path: Path) -> None:
    sarif = check_folder(copy("audit", tmp_path)).as_sarif()
    validate_sarif(sarif)
    assert {r["ruleId"] for r in sarif["runs"][0]["results"]} <= set(RULES)


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        render(sample(), "xml")


# ------------------------------------------------------------------ the command

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELHOST_CONFIG", "API_HOST", "MODELHOST_API_HOST", "OPENAI_API_KEYS",
                 "MODELHOST_OPENAI_API_KEYS", "MODELHOST_ADMIN_KEYS", "CUDA_VISIBLE_DEVICES",
                 "HUGGING_FACE_HUB_TOKEN", "VLLM_PORT_MEDIUM", "VLLM_API_KEY_MEDIUM",
                 "CUDA_VISIBLE_DEVICES_MEDIUM"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_env")
def test_command_exit_statuses(tmp_path: Path) -> None:
    runner = CliRunner()
    audit = copy("audit", tmp_path)
    result = runner.invoke(check, [str(audit / FILE1), str(audit / FILE2)])
    assert result.exit_code == 1, result.output
    assert "score" in result.output and "compose.image-unpinned" in result.output
    corrected = copy("corrected", tmp_path)
    result = runner.invoke(check, [str(corrected / FILE1), str(corrected / FILE2)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(check, ["--fail-on", "info", str(corrected / FILE1)])
    assert result.exit_code == 1
    result = runner.invoke(check, [str(tmp_path / "missing.yml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.usefixtures("clean_env")
def test_command_forms(tmp_path: Path) -> None:
    runner = CliRunner()
    audit = copy("audit", tmp_path)
    paths = [str(audit / FILE1), str(audit / FILE2)]
    as_json = runner.invoke(check, ["--json", *paths])
    as_format = runner.invoke(check, ["--format", "json", *paths])
    assert json.loads(as_json.output) == json.loads(as_format.output)
    assert json.loads(as_json.output)["exit_status"] == 1
    sarif = runner.invoke(check, ["--format", "sarif", *paths])
    validate_sarif(json.loads(sarif.output))
    out = tmp_path / "report.sarif"
    runner.invoke(check, ["--format", "sarif", "-o", str(out), *paths])
    validate_sarif(json.loads(out.read_text()))
    assert runner.invoke(check, ["--json", "--format", "sarif", *paths]).exit_code == 2


@pytest.mark.usefixtures("clean_env")
def test_command_with_no_path_examines_the_folder_and_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy("audit", tmp_path)
    (folder / "Dockerfile").write_text("FROM vllm/vllm-openai\n")
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - id: q\n    backend: vllm\n    source: {hf: Qwen/Qwen3-32B}\n"
                      "    gpus: [0]\n    engine_args: {gpu_memory_utilization: 0.99}\n")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MODELHOST_CONFIG", str(models))
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    result = CliRunner().invoke(check, ["--json"])
    data = json.loads(result.output)
    rules = {f["rule"] for f in data["findings"]}
    assert {"compose.healthcheck-start-period", "dockerfile.base-image-unpinned",
            "vllm.gpu-memory-utilization", "settings.exposed-without-keys",
            "compose.conflicting-definitions"} <= rules
    # The second compose file is found below the folder, whatever its name.
    assert {FILE1, FILE2, ".env", "Dockerfile"} <= set(data["inputs"])
    assert result.exit_code == 1


def test_docs_list_every_rule() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "check.md").read_text()
    for rule in RULES.values():
        assert f"`{rule.id}`" in docs, f"{rule.id} is missing from docs/check.md"
        row = next((line for line in docs.splitlines() if line.startswith(f"| `{rule.id}`")),
                   "")
        assert f"| {rule.severity.value} |" in row, f"{rule.id}: severity not in its row"


# ------------------------------------------------------------------ where facts come from

QWEN_CONFIG = {"max_position_embeddings": 40960, "num_attention_heads": 64,
               "quantization_config": {"quant_method": "awq", "bits": 4}}


def _snapshot(cache: Path, repo: str, config: dict[str, Any]) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("c0ffee")
    (folder / "snapshots" / "c0ffee").mkdir(parents=True)
    (folder / "snapshots" / "c0ffee" / "config.json").write_text(json.dumps(config))


def _rules(report: Report) -> set[str]:
    return {f.rule.id for f in report.failed()}


def test_config_json_from_a_cache_mounted_into_the_container(tmp_path: Path) -> None:
    _snapshot(tmp_path / "hf" / "hub", "Qwen/Qwen3-32B-AWQ", QWEN_CONFIG)
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "services:\n  llm:\n    image: vllm/vllm-openai:v0.9.2\n"
        "    volumes: [./hf:/root/.cache/huggingface]\n"
        "    command: --model Qwen/Qwen3-32B-AWQ --max-model-len 131072 "
        "--quantization gptq --tensor-parallel-size 3\n")
    report = run_check([compose], environ={}, cache_dirs=[])
    assert {"vllm.max-model-len-exceeds-model", "vllm.quantization-mismatch",
            "vllm.tensor-parallel-heads"} <= _rules(report), report.as_text()
    found = next(f for f in report.failed() if f.rule.id == "vllm.max-model-len-exceeds-model")
    assert "40960" in found.message and found.replacement == "--max-model-len 40960"


def test_config_json_of_a_local_model_path(tmp_path: Path) -> None:
    model = tmp_path / "models" / "qwen"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(QWEN_CONFIG))
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "services:\n  llm:\n    image: vllm/vllm-openai:v0.9.2\n"
        "    volumes: ['./models:/models:ro']\n"
        "    entrypoint: [sh, -c, 'exec vllm serve /models/qwen --max-model-len=50000']\n")
    report = run_check([compose], environ={}, cache_dirs=[])
    assert {"vllm.max-model-len-exceeds-model",
            "vllm.quantization-implicit"} <= _rules(report), report.as_text()
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - id: q\n    backend: vllm\n    source: {path: models/qwen}\n"
                      "    gpus: [0]\n    engine_args: {max_model_len: 50000, swap_space: 4, "
                      "quantization: awq}\n    start_timeout: 600\n")
    assert _rules(run_check([models], environ={}, cache_dirs=[])) == {
        "vllm.max-model-len-exceeds-model"}


@pytest.mark.usefixtures("clean_env")
def test_the_command_reads_the_settings_cache(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _snapshot(tmp_path / "cache", "Qwen/Qwen3-32B-AWQ", QWEN_CONFIG)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  llm:\n    image: vllm/vllm-openai:v0.9.2\n"
                       "    command: [--model, Qwen/Qwen3-32B-AWQ, --max-model-len, '65536']\n")
    result = CliRunner().invoke(check, ["--json", str(compose)])
    rules = {f["rule"] for f in json.loads(result.output)["findings"]}
    assert "vllm.max-model-len-exceeds-model" in rules
    assert "settings.exposed-without-keys" not in rules  # paths given: settings not judged


def test_secrets_wherever_they_are(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        "services:\n  app:\n    image: example/app:1.0\n    user: app\n    environment:\n"
        "      - HF_TOKEN=${HF_TOKEN:-hf_abcdefghijklmnopqrstuvwxyz0123}\n"
        "      - MODELHOST_ADMIN_KEYS_FILE=/run/secrets/admin_keys\n"
        "    labels:\n      token: sk-abcdefghijklmnopqrstuvwxyz\n")
    found = [(f.rule.id, f.line) for f in run_check([compose], environ={}).failed()]
    assert found == [("secrets.plaintext", 6), ("secrets.plaintext", 9)]


def test_two_files_claiming_one_port_gpu_and_name(tmp_path: Path) -> None:
    """Different services (other name, model and image) in two files: their shared port,
    GPU and container name are conflicts; services of disjoint profiles are not."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    common = ("    user: '1000'\n    container_name: llm\n    ports: ['127.0.0.1:8000:8000']\n"
              "    healthcheck: {test: [CMD, 'true']}\n    runtime: nvidia\n"
              "    environment: [NVIDIA_VISIBLE_DEVICES=1]\n")
    first = tmp_path / "a" / "compose.yaml"
    first.write_text("services:\n  chat:\n    image: ollama/ollama:0.5.7\n" + common)
    second = tmp_path / "b" / "compose.yaml"
    second.write_text("services:\n  embed:\n    image: ghcr.io/huggingface/"
                      "text-embeddings-inference:1.6\n" + common)
    report = run_check([first, second], environ={})
    assert {(f.rule.id, f.path) for f in report.failed()} == {
        ("compose.port-conflict", str(second)), ("compose.gpu-conflict", str(second)),
        ("compose.container-name-conflict", str(second))}, report.as_text()
    second.write_text(second.read_text().replace("  embed:\n", "  embed:\n    profiles: [b]\n"))
    first.write_text(first.read_text().replace("  chat:\n", "  chat:\n    profiles: [a]\n"))
    assert run_check([first, second], environ={}).failed() == []


def test_only_model_servers_are_judged_as_servers(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  db:\n    image: postgis/postgis:16-3.4\n    user: postgres\n"
                       "    ports: ['5432:5432']\n  llm:\n    image: ollama/ollama:0.5.7\n"
                       "    user: '1000'\n    ports: ['11434:11434']\n"
                       "    healthcheck: {test: [CMD, ollama, ls], start_period: '${WAIT:-60s}'}\n")
    found = [(f.rule.id, f.line) for f in run_check([compose], environ={}).failed()]
    assert found == [("compose.port-exposed-without-key", 9)]


def test_flags_of_a_folded_command_point_at_their_lines(tmp_path: Path) -> None:
    report = check_folder(copy("audit", tmp_path))
    lines = {f.rule.id: f.line or 0 for f in report.failed() if f.path == str(
        tmp_path / "audit" / FILE1)}
    text = (FIXTURES / "audit" / FILE1).read_text().splitlines()
    assert "--distributed-executor-backend ray" in text[lines["vllm.executor-backend"] - 1]
    assert "start_period: 30s" in text[lines["compose.healthcheck-start-period"] - 1]
    assert "HUGGING_FACE_HUB_TOKEN=" in text[lines["secrets.plaintext"] - 1]
    assert any("70000 in " in f.message and f"{FILE1}:25" in f.message
               for f in report.failed()) and "70000" in text[24]


def test_a_folder_is_searched_below(tmp_path: Path) -> None:
    files = {
        "compose.yaml": "services:\n  web:\n    image: nginx:1.27\n    user: nginx\n",
        "deploy/gpu/Dockerfile.cuda": "FROM nvidia/cuda\nUSER app\nHEALTHCHECK CMD true\n",
        "configs/docker/profiles/medium.yml": "services:\n  llm:\n    image: vllm/vllm-openai\n",
        "configs/prometheus.yml": "scrape_configs: []\n",
        "src/app/dockerfile.py": "from __future__ import annotations\n",
        "tests/fixtures/compose.yaml": "services:\n  bad:\n    image: broken\n",
        ".venv/lib/compose.yaml": "services:\n  bad:\n    image: broken\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    report = run_check([tmp_path], environ={})
    assert sorted(Path(i).relative_to(tmp_path).as_posix() for i in report.inputs) == [
        "compose.yaml", "configs/docker/profiles/medium.yml", "deploy/gpu/Dockerfile.cuda"]
    unpinned = {(f.rule.id, Path(f.path or "").name) for f in report.failed()}
    assert {("dockerfile.base-image-unpinned", "Dockerfile.cuda"),
            ("compose.image-unpinned", "medium.yml")} <= unpinned


def test_sarif_of_a_finding_that_is_in_no_file() -> None:
    report = Report("check", [Finding(ERR, "exposed", path="(environment)")], [])
    result = report.as_sarif()["runs"][0]["results"][0]
    assert "locations" not in result and result["message"]["text"] == "exposed"


@pytest.mark.parametrize(("text", "expected", "unresolved"), [
    ("${A}", "a", []),
    ("${B}", "", ["B"]),
    ("${B:-x}", "x", []),
    ("${E:-x}", "x", []),
    ("${E-x}", "", []),
    ("${A:+alt}", "alt", []),
    ("${B:+alt}", "", []),
    ("$A/$$A", "a/$A", []),
    ("${B:-${A}}", "a", []),
    ("${B:?need B}", "", ["B"]),
])
def test_interpolation_as_compose_does(text: str, expected: str,
                                       unresolved: list[str]) -> None:
    from modelhost.checks.yamlloc import interpolate

    result = interpolate(text, {"A": "a", "E": ""})
    assert (result.text, result.unresolved) == (expected, unresolved)


def test_env_file_syntax() -> None:
    from modelhost.checks.yamlloc import parse_env_file

    entries = parse_env_file("# c\nexport A=1\nB='two words' # c\nC=\"x#y\"\nD=v # note\n"
                             "not a line\nE=\n")
    assert [(e.name, e.value, e.line) for e in entries] == [
        ("A", "1", 2), ("B", "two words", 3), ("C", "x#y", 4), ("D", "v", 5), ("E", "", 7)]
