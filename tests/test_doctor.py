"""`modelhost doctor`: the host checks, on this machine and against stand-ins with real parts.

On this machine (no NVIDIA driver) the GPU checks must say they do not apply. The GPU
checks themselves run against `HostNvml`, the NVML stand-in of tests/test_gpu.py with the
three functions only doctor reads (driver version, CUDA version, compute capability); the
torch and vLLM they compare with are real files in a real virtual environment (a model's
`python:`) whose packages are their metadata only. Ports are real sockets, directories
real directories, the running gateway a real `modelhost serve`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from modelhost.checks.report import Outcome, Report
from modelhost.cli_doctor import doctor
from modelhost.doctor import Host, diagnose, system
from modelhost.doctor.rules import RULES
from modelhost.doctor.versions import read_versions
from modelhost.downloads.cache import RemoteFile, repo_folder, write_listing
from modelhost.settings import Settings
from modelhost.workers.process import free_port
from tests.conftest import GatewayFactory, fake_model
from tests.test_gpu import HAS_DRIVER, FakeGpu, FakeNvml, FakeNVMLError

GIB = 1024**3
ROOT = Path(__file__).parent.parent
GOOD_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"  # 34 after hf_, like the hub's
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Settings this module sets itself: whatever the environment says is cleared first.
SETTINGS_ENV = [
    "HF_TOKEN", "HUGGINGFACE_TOKEN", "MODELHOST_HUGGINGFACE_TOKEN", "MODELHOST_DATA_DIR",
    "MODEL_CACHE_DIR", "MODELHOST_MODEL_CACHE_DIR", "LOG_DIR", "MODELHOST_LOG_DIR",
    "API_HOST", "MODELHOST_API_HOST", "API_PORT", "MODELHOST_API_PORT", "MODELHOST_CONFIG",
    "HF_ENDPOINT",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)


# -- NVML with what doctor reads too ---------------------------------------------------------


@dataclass
class HostGpu(FakeGpu):
    capability: tuple[int, int] = (9, 0)


class HostNvml(FakeNvml):
    def __init__(self, gpus: list[HostGpu], cuda: int | None = 12040,
                 driver: str = "550.54.15",
                 init_error: int | None = None) -> None:
        super().__init__(list(gpus), init_error=init_error)
        self.cuda = cuda
        self.driver = driver

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        if self.cuda is None:  # a driver that does not say
            raise FakeNVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return self.cuda

    def nvmlDeviceGetCudaComputeCapability(self, handle: HostGpu) -> tuple[int, int]:
        self._check(handle, "capability")
        return handle.capability


def t4(used: int = 1 * GIB) -> HostGpu:
    return HostGpu("Tesla T4", "GPU-t4", 16 * GIB, used, capability=(7, 5))


def a100(used: int = 1 * GIB) -> HostGpu:
    return HostGpu("NVIDIA A100-SXM4-80GB", "GPU-a100", 80 * GIB, used, capability=(8, 0))


# -- a machine: settings, a models file, a root folder, an engine environment -----------------


class Machine:
    """A gateway's settings in `tmp`, a folder standing for `/`, and (on demand) a virtual
    environment with a torch and a vLLM made of their metadata."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        (self.root / "dev" / "shm").mkdir(parents=True)
        self.cache = tmp / "cache"
        self.port = free_port()
        self.environ: dict[str, str] = {}
        self.config: Path | None = None

    def models(self, *models: dict[str, Any], include_builtin: bool = False) -> None:
        self.config = self.tmp / "models.yaml"
        self.config.write_text(yaml.safe_dump({"include_builtin": include_builtin,
                                               "models": list(models)}))

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": self.tmp / "data", "model_cache_dir": self.cache,
                                  "api_port": self.port, "config_file": self.config}
        return Settings.with_overrides(**{**values, **overrides})

    def diagnose(self, nvml: Any = None, sys_path: tuple[str, ...] | None = None,
                 **overrides: Any) -> Report:
        # Without a stand-in, a driver that cannot load (what this machine has).
        nvml = nvml if nvml is not None else HostNvml([], init_error=12)
        host = Host(root=self.root, environ=self.environ, nvml=nvml, sys_path=sys_path)
        return diagnose(self.settings(**overrides), host)

    def engines(self, torch: str | None = "2.5.1+cu124", cuda: str | None = "12.4",
                vllm: str | None = "0.6.4", vllm_torch: str = "2.5.1") -> str:
        """A virtual environment holding the metadata of torch and vLLM, its `vllm`
        command beside its interpreter; returns the interpreter."""
        env = self.tmp / "engines"
        venv.create(env, with_pip=False, symlinks=True)
        site = next(env.glob("lib/python*/site-packages"))
        if torch is not None:
            _dist(site, "torch", torch)
            (site / "torch").mkdir()
            (site / "torch" / "version.py").write_text(
                f"__version__ = '{torch}'\ndebug = False\n"
                f"cuda: Optional[str] = {cuda!r}\ngit_version = 'abc'\n")
        if vllm is not None:
            _dist(site, "vllm", vllm, f"Requires-Dist: torch=={vllm_torch}",
                  "Requires-Dist: xformers; platform_system == 'Linux'")
            (env / "bin" / "vllm").write_text("#!/bin/sh\n")
            (env / "bin" / "vllm").chmod(0o755)
        return str(env / "bin" / "python")

    def listed(self, repo: str, sizes: dict[str, int], have: tuple[str, ...] = (),
               config: dict[str, Any] | None = None) -> None:
        """The cache knows `repo`'s listing at main (as after a started download), with the
        files `have` already there."""
        storage = repo_folder(self.cache, repo)
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(COMMIT)
        write_listing(storage, COMMIT, {
            path: RemoteFile(path, size, f"{i:040x}") for i, (path, size) in
            enumerate(sizes.items(), start=1)})
        snapshot = storage / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for path in have:
            with open(snapshot / path, "wb") as out:
                out.truncate(sizes[path])  # sparse: the size without the bytes
        if config is not None:
            (snapshot / "config.json").write_text(json.dumps(config))


def _dist(site: Path, name: str, version: str, *requires: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *requires]) + "\n")


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def vllm_model(model_id: str = "qwen", hf: str = "Qwen/Qwen2.5-7B-Instruct-AWQ",
               **fields: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"id": model_id, "backend": "vllm", "source": {"hf": hf}}
    if "gpus" not in fields:
        spec["gpu_count"] = 1
    return {**spec, **fields}


def outcomes(report: Report, rule: str) -> list[str]:
    return [f.outcome.value for f in report.findings if f.rule.id == rule]


def found(report: Report, rule: str, outcome: str = "failed") -> str:
    """The messages of `rule`'s findings with `outcome` (at least one)."""
    messages = [f.message for f in report.findings
                if f.rule.id == rule and f.outcome.value == outcome]
    assert messages, f"no {outcome} {rule}: " + "; ".join(
        f"{f.rule.id} {f.outcome.value}: {f.message}" for f in report.findings)
    return " | ".join(messages)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(doctor, list(args), env=env)


def base_env(tmp: Path, port: int | None = None) -> dict[str, str]:
    return {"MODELHOST_DATA_DIR": str(tmp / "data"), "MODEL_CACHE_DIR": str(tmp / "cache"),
            "API_PORT": str(port or free_port())}


# -- on this machine -------------------------------------------------------------------------


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_this_machine_without_gpu(tmp_path: Path) -> None:
    """The acceptance check: `modelhost doctor --json` here (no GPU) says the GPU checks do
    not apply, and every other check passed or failed with its reason, in a real process
    that does not import torch."""
    script = ("import sys\nfrom modelhost.cli_doctor import doctor\n"
              "try:\n    doctor(['--json'])\nexcept SystemExit as exc:\n    code = exc.code\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch', "
              "file=sys.stderr)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **base_env(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no torch" in done.stderr
    report = json.loads(done.stdout)
    assert report["tool"] == "doctor" and report["exit_status"] == 0
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for finding in report["findings"]:
        by_rule.setdefault(finding["rule"], []).append(finding)
    assert set(by_rule) == {r.id for r in RULES}  # every check said something
    for rule, findings in by_rule.items():
        for f in findings:
            assert f["message"], f
            if rule.startswith("doctor.gpu."):
                assert f["outcome"] == "not_applicable", f
            if f["outcome"] == "failed":
                assert f["fix"], f
    assert "no NVIDIA" in by_rule["doctor.gpu.driver"][0]["message"]
    for rule in ("doctor.config", "doctor.ports"):
        assert [f["outcome"] for f in by_rule[rule]] == ["passed"]
    assert {f["outcome"] for f in by_rule["doctor.dirs.writable"]} == {"passed"}


def test_report_forms(tmp_path: Path) -> None:
    env = {**base_env(tmp_path), "HF_TOKEN": "not-a-token"}
    text = run(env=env)
    assert text.exit_code == 1
    assert "ERROR [doctor.hf.token]" in text.output and "score 80/100" in text.output
    assert "n/a [doctor.gpu.driver]" in text.output or HAS_DRIVER
    sarif = json.loads(run("--format", "sarif", env=env).output)
    results = sarif["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["doctor.hf.token"]
    assert json.loads(run("--format", "json", env=env).output)["score"] == 80
    both = run("--json", "--format", "sarif", env=env)
    assert both.exit_code == 2 and "disagree" in both.output
    # An info fails only when asked: no token while a hub model is still to download.
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"include_builtin": False, "models": [
        {"id": "m", "backend": "llamacpp", "source": {"hf": "org/m"}}]}))
    quiet = {**base_env(tmp_path), "MODELHOST_CONFIG": str(models)}
    assert run(env=quiet).exit_code == 0
    written = tmp_path / "report.json"
    assert run("--fail-on", "info", "--json", "-o", str(written), env=quiet).exit_code == 1
    assert json.loads(written.read_text())["summary"]["info"] == 2


# -- ports -----------------------------------------------------------------------------------


def test_a_port_in_use_fails(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("--json", "--port", str(port), env=base_env(tmp_path))
    assert result.exit_code == 1
    report = json.loads(result.output)
    [finding] = [f for f in report["findings"] if f["rule"] == "doctor.ports"]
    assert finding["outcome"] == "failed" and finding["severity"] == "error"
    assert f"127.0.0.1:{port} is in use by another program" in finding["message"]
    assert "--port" in finding["fix"]


def test_a_port_held_by_a_running_gateway_says_so(gateway_factory: GatewayFactory,
                                                  machine: Machine) -> None:
    gw = gateway_factory([fake_model("fake")])
    report = machine.diagnose(api_port=gw.port)
    message = found(report, "doctor.ports")
    assert f"127.0.0.1:{gw.port} is taken by a running modelhost gateway" in message
    assert "1 model(s)" in message
    assert report.exit_status() == 1


def test_an_address_of_another_machine_fails(machine: Machine) -> None:
    assert "not an address of this machine" in found(machine.diagnose(api_host="192.0.2.1"),
                                                     "doctor.ports")
    assert outcomes(machine.diagnose(api_port=0), "doctor.ports") == ["not_applicable"]


# -- directories -----------------------------------------------------------------------------


def test_a_data_dir_that_cannot_be_created_fails(tmp_path: Path) -> None:
    # A path under a regular file can never be created, even by root (chmod would not stop
    # root from writing).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**base_env(tmp_path), "MODELHOST_DATA_DIR": str(blocker / "data")}
    result = run("--json", env=env)
    assert result.exit_code == 1
    findings = [f for f in json.loads(result.output)["findings"]
                if f["rule"] == "doctor.dirs.writable"]
    assert [f["outcome"] for f in findings] == ["failed", "failed"]  # data, and logs in it
    assert f"{blocker} is not a directory, so {blocker / 'data'} cannot be created" in \
        findings[0]["message"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_a_read_only_data_dir_fails(machine: Machine) -> None:
    data = machine.tmp / "data"
    data.mkdir()
    data.chmod(0o500)
    try:
        assert f"cannot write in {data}: Permission denied" in found(machine.diagnose(),
                                                                     "doctor.dirs.writable")
    finally:
        data.chmod(0o700)


def test_the_folder_of_a_sqlite_database(machine: Machine) -> None:
    blocker = machine.tmp / "a-file"
    blocker.write_text("")
    report = machine.diagnose(database_url=f"sqlite:///{blocker}/state.db")
    assert f"database folder (MODELHOST_DATABASE_URL) {blocker}: {blocker} is not a " \
        "directory" in found(report, "doctor.dirs.writable")
    report = machine.diagnose(database_url="postgresql://db.example/modelhost")
    assert "database folder" not in " ".join(f.message for f in report.findings)


def test_existing_and_missing_directories_are_written_and_left_clean(machine: Machine) -> None:
    data = machine.tmp / "data"
    data.mkdir()
    logs = machine.tmp / "logs" / "deep"
    report = machine.diagnose(log_dir=logs)
    messages = found(report, "doctor.dirs.writable", "passed")
    assert f"{data}: writable" in messages and f"{logs}: can be created" in messages
    assert list(data.iterdir()) == [] and not (machine.tmp / "logs").exists()


# -- the Hugging Face token ------------------------------------------------------------------


@pytest.mark.parametrize("token", ["hf_short", "hf_" + "a" * 29, "sk-" + "a" * 40,
                                   GOOD_TOKEN + "!"])
def test_a_malformed_token_fails_without_being_shown(tmp_path: Path, token: str) -> None:
    for args in (["--json"], []):
        result = run(*args, env={**base_env(tmp_path), "HF_TOKEN": token})
        assert result.exit_code == 1
        assert token not in result.output and token[:-4] not in result.output
        assert "doctor.hf.token" in result.output and "malformed" in result.output


def test_a_good_token_passes_and_never_appears(tmp_path: Path) -> None:
    for args in (["--json"], [], ["--format", "sarif"]):
        result = run(*args, env={**base_env(tmp_path), "HF_TOKEN": GOOD_TOKEN})
        assert result.exit_code == 0, result.output
        assert GOOD_TOKEN not in result.output and GOOD_TOKEN[3:-4] not in result.output
    report = json.loads(run("--json", env={**base_env(tmp_path),
                                           "HF_TOKEN": GOOD_TOKEN}).output)
    [finding] = [f for f in report["findings"] if f["rule"] == "doctor.hf.token"]
    assert finding["outcome"] == "passed"
    assert "hf_…4567 (from the environment) is well-formed" in finding["message"]


def test_token_for_a_mirror_and_missing_token(machine: Machine) -> None:
    machine.environ["HF_ENDPOINT"] = "https://hub.example.com"
    report = machine.diagnose(huggingface_token="mirror-token-1234")
    assert "shape is not checked" in found(report, "doctor.hf.token", "passed")
    # No token, a hub model to download: an info (public models need none).
    machine.environ.clear()
    machine.models(vllm_model())
    report = machine.diagnose()
    assert outcomes(report, "doctor.hf.token") == ["not_applicable"]
    assert "still to download from the hub: model 'qwen';" in found(
        report, "doctor.hf.token-missing")
    assert [f.severity.value for f in report.failed()
            if f.rule.id == "doctor.hf.token-missing"] == ["info"]


# -- the models file and the disk ------------------------------------------------------------


def test_an_invalid_models_file_fails_and_the_rest_still_runs(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - id: x\n    backend: nope\n")
    result = run("--json", "--config", str(bad), env=base_env(tmp_path))
    assert result.exit_code == 1
    report = json.loads(result.output)
    [config] = [f for f in report["findings"] if f["rule"] == "doctor.config"]
    assert config["outcome"] == "failed" and "model 'x'" in config["message"]
    assert str(bad) in report["inputs"]
    assert any(f["rule"] == "doctor.ports" for f in report["findings"])


def test_disk_space_against_the_models_to_download(machine: Machine) -> None:
    machine.models(vllm_model("big", hf="org/big"), vllm_model("new", hf="org/new"),
                   vllm_model("done", hf="org/done"))
    machine.listed("org/big", {"model.safetensors": 1 << 60, "config.json": 100})
    machine.listed("org/done", {"model.safetensors": 4096}, have=("model.safetensors",))
    report = machine.diagnose()
    assert "1073741824.0 GiB still to download (model 'big')" in found(report,
                                                                       "doctor.disk.cache")
    assert "model 'new'" in found(report, "doctor.disk.model-sizes")
    # What is already there is not counted; the cache must be writable for the rest.
    assert "'done'" not in found(report, "doctor.disk.cache")
    assert "model cache" in found(report, "doctor.dirs.writable", "passed")


def test_disk_checks_without_hub_models(machine: Machine) -> None:
    report = machine.diagnose()  # the built-in models only: shipped in packages
    assert outcomes(report, "doctor.disk.cache") == ["not_applicable"]
    assert outcomes(report, "doctor.disk.model-sizes") == ["not_applicable"]


# -- GPUs ------------------------------------------------------------------------------------


def test_nvml_without_library_does_not_apply_and_a_broken_driver_fails(
        machine: Machine) -> None:
    absent = machine.diagnose(HostNvml([], init_error=12))
    for rule in RULES:
        if rule.id.startswith("doctor.gpu."):
            assert set(outcomes(absent, rule.id)) == {"not_applicable"}, rule.id
    broken = machine.diagnose(HostNvml([t4()], init_error=9))
    assert "the NVIDIA driver is not loaded" in found(broken, "doctor.gpu.driver")
    assert broken.exit_status() == 1
    empty = machine.diagnose(HostNvml([]))
    assert "NVML lists no device" in found(empty, "doctor.gpu.driver", "not_applicable")


def test_gpu_models_without_gpu_fail(machine: Machine) -> None:
    machine.models(vllm_model())
    report = machine.diagnose()
    assert outcomes(report, "doctor.gpu.driver") == ["not_applicable"]
    assert "'qwen' (1) need GPUs, and this machine has none" in found(report,
                                                                      "doctor.gpu.memory")
    assert report.exit_status() == 1


def test_the_driver_and_gpus_are_listed(machine: Machine) -> None:
    report = machine.diagnose(HostNvml([t4(), a100()]))
    message = found(report, "doctor.gpu.driver", "passed")
    assert "NVIDIA driver 550.54.15, CUDA up to 12.4" in message
    assert "GPU 0 (Tesla T4): 16.0 GiB, compute capability 7.5" in message
    assert "GPU 1 (NVIDIA A100-SXM4-80GB): 80.0 GiB, compute capability 8.0" in message
    assert outcomes(report, "doctor.gpu.memory") == ["not_applicable"]  # no GPU model


def test_an_awq_model_on_compute_capability_7_5(machine: Machine) -> None:
    python = machine.engines()
    # An AWQ checkpoint, quantization left to vLLM: it falls back to its slower kernels.
    machine.models(vllm_model(python=python))
    report = machine.diagnose(HostNvml([t4()]))
    assert "'qwen' is an AWQ checkpoint: on GPU 0 (Tesla T4)" in found(report,
                                                                       "doctor.gpu.kernels")
    assert outcomes(report, "doctor.gpu.capability") == ["passed"]
    # Marlin asked for: it cannot start there at all.
    machine.models(vllm_model(python=python, engine_args={"quantization": "awq_marlin"}))
    report = machine.diagnose(HostNvml([t4()]))
    message = found(report, "doctor.gpu.capability")
    assert "quantization awq_marlin needs compute capability 8.0" in message
    assert "GPU 0 (Tesla T4): 7.5" in message
    assert report.exit_status() == 1
    # Beside an A100 it passes: vLLM asks 0.9 of the largest GPU, so the scheduler never
    # places it on the T4.
    assert outcomes(machine.diagnose(HostNvml([t4(), a100()])),
                    "doctor.gpu.capability") == ["passed"]
    # Beside a GPU of the same size, it may land on either: the fix pins it; pinned, it
    # passes.
    gpus = [HostGpu("Quadro RTX 8000", "GPU-rtx", 48 * GIB, GIB, capability=(7, 5)),
            HostGpu("NVIDIA RTX A6000", "GPU-a6000", 48 * GIB, GIB, capability=(8, 6))]
    report = machine.diagnose(HostNvml(gpus))
    [failure] = [f for f in report.failed() if f.rule.id == "doctor.gpu.capability"]
    assert "places by free memory only" in failure.message and "`gpus: [1]`" in failure.fix
    machine.models(vllm_model(python=python, gpus=[1],
                              engine_args={"quantization": "awq_marlin"}))
    assert outcomes(machine.diagnose(HostNvml(gpus)), "doctor.gpu.capability") == ["passed"]
    # The AWQ fallback's fix names a GPU with Marlin kernels, not the slow one.
    machine.models(vllm_model(python=python))
    [warning] = [f for f in machine.diagnose(HostNvml(gpus)).failed()
                 if f.rule.id == "doctor.gpu.kernels"]
    assert "Quadro RTX 8000" in warning.message and "`gpus: [1]`" in warning.fix


def test_the_checkpoint_config_says_awq(machine: Machine) -> None:
    python = machine.engines()
    machine.listed("org/plain-name", {"config.json": 10},
                   config={"quantization_config": {"quant_method": "awq", "bits": 4}})
    machine.models(vllm_model(hf="org/plain-name", python=python, engine_args={"dtype": "half"}))
    found(machine.diagnose(HostNvml([t4()])), "doctor.gpu.kernels")
    machine.models(vllm_model(hf="org/plain-name", python=python,
                              engine_args={"dtype": "bfloat16"}))
    assert "dtype bfloat16 needs compute capability 8.0" in found(
        machine.diagnose(HostNvml([t4()])), "doctor.gpu.capability")


def test_gpu_memory(machine: Machine) -> None:
    python = machine.engines()
    # vLLM takes gpu_memory_utilization (0.9) of the GPU: 14.4 GiB of a T4.
    machine.models(vllm_model(python=python))
    report = machine.diagnose(HostNvml([t4(used=8 * GIB)]))
    assert outcomes(report, "doctor.gpu.memory") == ["passed"]
    assert "needs 14.4 GiB on each of 1 GPU(s)" in found(report, "doctor.gpu.free-memory")
    assert "GPU 0 (Tesla T4): 8.0 GiB free of 16.0 GiB" in found(report,
                                                                  "doctor.gpu.free-memory")
    assert outcomes(machine.diagnose(HostNvml([t4()])), "doctor.gpu.free-memory") == ["passed"]
    # Weights larger than what vLLM may use of the GPU (listed in the cache).
    machine.listed("org/huge", {"model.safetensors": 40 * GIB})
    machine.models(vllm_model(hf="org/huge", python=python))
    assert "the weights need 40.0 GiB on each of 1 GPU(s)" in found(
        machine.diagnose(HostNvml([t4()])), "doctor.gpu.memory")
    # Pinned to a GPU the machine does not have.
    machine.models(vllm_model(python=python, gpus=[3]))
    assert "pinned to GPU(s) [3], which this machine does not have" in found(
        machine.diagnose(HostNvml([t4()])), "doctor.gpu.memory")


def test_cuda_against_the_driver(machine: Machine) -> None:
    python = machine.engines()
    machine.models(vllm_model(python=python, hf="org/model"))
    report = machine.diagnose(HostNvml([a100()], cuda=12040))
    message = found(report, "doctor.gpu.cuda", "passed")
    assert f"torch 2.5.1+cu124 ({python}): CUDA 12.4" in message
    assert f"vLLM 0.6.4 ({python}): CUDA 12.4" in message
    assert "vLLM 0.6.4 with torch 2.5.1+cu124" in found(report, "doctor.vllm.install", "passed")
    older_minor = machine.diagnose(HostNvml([a100()], cuda=12020))
    assert outcomes(older_minor, "doctor.gpu.cuda") == ["passed"]
    assert "needs CUDA 12.4, newer than the driver (CUDA up to 12.2)" in found(
        older_minor, "doctor.gpu.cuda-minor")
    unknown = machine.diagnose(HostNvml([a100()], cuda=None))
    assert "does not say which CUDA" in found(unknown, "doctor.gpu.cuda", "not_applicable")
    older_major = machine.diagnose(HostNvml([a100()], cuda=11080))
    assert "needs CUDA 12.4" in found(older_major, "doctor.gpu.cuda")
    assert older_major.exit_status() == 1


def test_vllm_install(machine: Machine) -> None:
    python = machine.engines(vllm_torch="2.4.0")
    machine.models(vllm_model(python=python, hf="org/model"))
    assert "built against torch 2.4.0, but torch 2.5.1+cu124 is installed" in found(
        machine.diagnose(HostNvml([a100()])), "doctor.vllm.install")
    (machine.tmp / "engines").rename(machine.tmp / "old")
    python = machine.engines(vllm=None)
    assert "vLLM is not installed in" in found(machine.diagnose(HostNvml([a100()])),
                                               "doctor.vllm.install")
    machine.models(vllm_model(python=str(machine.tmp / "nowhere" / "python"), hf="org/model"))
    report = machine.diagnose(HostNvml([a100()]))
    assert "cannot run" in found(report, "doctor.vllm.install")
    assert "cannot read" in found(report, "doctor.gpu.cuda")


def test_a_cpu_build_of_torch_for_a_gpu_model(machine: Machine) -> None:
    python = machine.engines(torch="2.5.1+cpu", cuda=None)
    machine.models(vllm_model(python=python, hf="org/model"))
    for cuda in (12040, None):
        assert "is a CPU-only build, but model 'qwen' runs on GPUs" in found(
            machine.diagnose(HostNvml([a100()], cuda=cuda)), "doctor.gpu.cuda")


def test_the_gateways_own_environment(machine: Machine) -> None:
    """Without GPU models, the gateway's own torch is still compared with the driver."""
    site = str(next(Path(machine.engines(vllm=None)).parent.parent.glob(
        "lib/python*/site-packages")))
    report = machine.diagnose(HostNvml([a100()], cuda=11080), sys_path=(site,))
    assert "torch 2.5.1+cu124 (the gateway's environment) needs CUDA 12.4" in found(
        report, "doctor.gpu.cuda")
    assert outcomes(report, "doctor.vllm.install") == ["not_applicable"]
    (Path(site) / "torch" / "version.py").write_text("cuda = None\n")
    report = machine.diagnose(HostNvml([a100()]), sys_path=(site,))
    assert "no CUDA build of torch or vLLM is installed (torch 2.5.1+cu124 (the gateway's " \
        "environment): CPU only)" in found(report, "doctor.gpu.cuda", "not_applicable")


def test_versions_are_read_from_files(machine: Machine) -> None:
    python = machine.engines(torch="2.1.0+cu118", cuda="11.8", vllm="0.4.0+cu118",
                             vllm_torch="2.1.0")
    site = next(Path(python).parent.parent.glob("lib/python*/site-packages"))
    assert read_versions([str(site)]) == {"torch": "2.1.0+cu118", "torch_cuda": "11.8",
                                          "vllm": "0.4.0+cu118", "vllm_torch": "2.1.0"}
    assert read_versions([str(machine.tmp)]) == dict.fromkeys(
        ("torch", "torch_cuda", "vllm", "vllm_torch"))
    # This environment's torch, if any, without importing it.
    here = read_versions(sys.path)
    if here["torch"] is not None:
        from importlib.metadata import version
        assert here["torch"] == version("torch")


# -- containers and shared memory ------------------------------------------------------------


def _devices(root: Path, *names: str) -> None:
    for name in names:
        (root / "dev" / name).write_text("")


def test_container_runtime(machine: Machine) -> None:
    machine.models(vllm_model(hf="org/model"))
    assert outcomes(machine.diagnose(), "doctor.container.runtime") == ["not_applicable"]
    (machine.root / ".dockerenv").write_text("")
    report = machine.diagnose()
    assert "in a container: docker (/.dockerenv), but no NVIDIA device is visible" in found(
        report, "doctor.container.runtime")
    assert "--gpus all" in report.failed()[0].fix or any(
        "--gpus all" in f.fix for f in report.failed())
    # Devices there, but the driver's libraries not mounted.
    _devices(machine.root, "nvidiactl", "nvidia0")
    assert "NVML does not answer" in found(machine.diagnose(), "doctor.container.runtime")
    machine.environ["NVIDIA_VISIBLE_DEVICES"] = "void"
    assert "hides every GPU" in found(machine.diagnose(), "doctor.container.runtime")
    machine.environ["NVIDIA_VISIBLE_DEVICES"] = "all"
    assert "1 NVIDIA device(s) visible, NVIDIA_VISIBLE_DEVICES=all; NVML sees 1 GPU(s)" in \
        found(machine.diagnose(HostNvml([a100()])), "doctor.container.runtime", "passed")


def test_container_found_by_cgroup_and_without_gpu_models(machine: Machine) -> None:
    (machine.root / "proc" / "1").mkdir(parents=True)
    (machine.root / "proc" / "1" / "cgroup").write_text(
        "12:memory:/kubepods/burstable/pod1234/abcd\n")
    message = found(machine.diagnose(), "doctor.container.runtime", "passed")
    assert "kubepods (/proc/1/cgroup)" in message and "no configured model uses a GPU" in message


def test_shared_memory(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert outcomes(machine.diagnose(), "doctor.shm") == ["not_applicable"]
    machine.models(vllm_model(hf="org/model"))
    assert "/dev/shm is" in found(machine.diagnose(), "doctor.shm", "passed")
    # The folder standing for /dev/shm is on this machine's disk: ask for more than it has.
    monkeypatch.setattr(system, "SHM_WANTED", 1 << 62)
    report = machine.diagnose()
    assert "less than the" in found(report, "doctor.shm")
    assert any("--shm-size" in f.fix for f in report.failed())


# -- the rules and their documentation -------------------------------------------------------


def test_every_rule_is_documented() -> None:
    docs = (ROOT / "docs" / "doctor.md").read_text(encoding="utf-8")
    ids = [r.id for r in RULES]
    assert len(set(ids)) == len(ids)
    for rule in RULES:
        assert f"`{rule.id}`" in docs, f"{rule.id} is not in docs/doctor.md"
        assert rule.id.startswith("doctor.")


def test_every_finding_has_a_known_rule(machine: Machine) -> None:
    machine.models(vllm_model(hf="org/model"))
    report = machine.diagnose(HostNvml([t4()]))
    assert {f.rule for f in report.findings} <= set(RULES)
    assert all(f.outcome in Outcome for f in report.findings)

