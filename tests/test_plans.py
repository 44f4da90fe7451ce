"""From a model spec to a worker command line: `workers.plans` and the backend modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelhost.config import Backend, ModelSpec, PathSource, UrlSource
from modelhost.workers import llamacpp, vllm
from modelhost.workers.flags import kebab_flags, snake_flags
from modelhost.workers.plans import launch_plan
from modelhost.workers.process import BackendConfigError, LaunchPlan

HOST = "127.0.0.1"
PORT = 18123


def flag_value(argv: list[str], flag: str, count: int = 1) -> list[str]:
    """The `count` values following `flag` in argv (which must hold the flag once)."""
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    i = argv.index(flag)
    return argv[i + 1:i + 1 + count]


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(("spell", "args", "expected"), [
    pytest.param(kebab_flags, {
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": True,
        "disable_log_stats": False,
        "seed": None,
        "allowed_origins": ["a", "b"],
        "override_generation_config": {"temperature": 0.5},
        "lora_modules": [{"name": "x", "path": "/l"}],
        "already-kebab": "v",
    }, [
        "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.9",
        "--enforce-eager",
        "--allowed-origins", "a", "b",
        "--override-generation-config", '{"temperature": 0.5}',
        "--lora-modules", '[{"name": "x", "path": "/l"}]',
        "--already-kebab", "v",
    ], id="kebab-every-kind-of-value"),
    pytest.param(kebab_flags, {}, [], id="kebab-empty"),
    pytest.param(snake_flags, {
        "n_ctx": 2048,
        "verbose": False,
        "flash_attn": True,
        "seed": None,
        "chat_template_kwargs": {"enable_thinking": False},
        "tensor_split": [0.5, 0.5],
        "n-threads": 4,
        "chat_format": "chatml",
    }, [
        "--n_ctx", "2048",
        "--verbose", "false",
        "--flash_attn", "true",
        "--chat_template_kwargs", '{"enable_thinking": false}',
        "--tensor_split", "0.5", "0.5",
        "--n_threads", "4",
        "--chat_format", "chatml",
    ], id="snake-every-kind-of-value"),
    pytest.param(snake_flags, {"x": [[1, 2], [3]]}, ["--x", "[[1, 2], [3]]"],
                 id="snake-nested-list-is-json"),
])
def test_flags(spell: Callable[[dict[str, Any]], list[str]], args: dict[str, Any],
               expected: list[str]) -> None:
    assert spell(args) == expected


# --------------------------------------------------------------------------- llama.cpp


def gguf_spec(path: Path, **extra: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"id": "tiny", "backend": "llamacpp", "source": {"path": str(path)}, **extra})


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.Q4_0.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_llamacpp_cpu_argv(gguf: Path) -> None:
    spec = gguf_spec(gguf, engine_args={"n_ctx": 2048})
    plan = launch_plan(spec, gguf, HOST, PORT, [])
    assert isinstance(plan, LaunchPlan)
    assert plan.argv[:11] == [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--host", HOST, "--port", str(PORT),
        "--model_alias", "tiny",
    ]
    assert flag_value(plan.argv, "--n_ctx") == ["2048"]
    assert flag_value(plan.argv, "--n_gpu_layers") == ["0"]
    assert plan.env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.probe_path == "/v1/models"


def test_llamacpp_gpu_offloads_every_layer(gguf: Path) -> None:
    plan = launch_plan(gguf_spec(gguf, gpus=[1, 2]), gguf, HOST, PORT, [1, 2])
    assert flag_value(plan.argv, "--n_gpu_layers") == ["-1"]
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "1,2"


@pytest.mark.parametrize("key", ["n_gpu_layers", "n-gpu-layers"])
def test_llamacpp_explicit_n_gpu_layers_wins(gguf: Path, key: str) -> None:
    spec = gguf_spec(gguf, engine_args={key: 20})
    plan = launch_plan(spec, gguf, HOST, PORT, [0])
    assert flag_value(plan.argv, "--n_gpu_layers") == ["20"]


def test_llamacpp_booleans_are_spelled_out(gguf: Path) -> None:
    spec = gguf_spec(gguf, engine_args={"verbose": False, "flash_attn": True})
    plan = launch_plan(spec, gguf, HOST, PORT, [])
    assert flag_value(plan.argv, "--verbose") == ["false"]
    assert flag_value(plan.argv, "--flash_attn") == ["true"]


def test_llamacpp_uses_the_specs_python(gguf: Path) -> None:
    spec = gguf_spec(gguf, python="/opt/llama/bin/python")
    plan = launch_plan(spec, gguf, HOST, PORT, [])
    assert plan.argv[:3] == ["/opt/llama/bin/python", "-m", "llama_cpp.server"]


def folder_of(folder: Path, names: list[str]) -> Path:
    for name in names:
        (folder / name).write_bytes(b"GGUF" if name.endswith(".gguf") else b"x")
    return folder


# A source of None: `source.path` is the folder itself.
@pytest.mark.parametrize(("names", "source", "loaded"), [
    pytest.param(["README.md", "model.Q8_0.gguf"], None, "model.Q8_0.gguf",
                 id="the-folders-one-gguf"),
    pytest.param(["model.Q4_K_M.gguf", "model.Q8_0.gguf"],
                 {"hf": "org/model-GGUF", "files": ["*Q8_0*"]}, "model.Q8_0.gguf",
                 id="source-files-choose-among-several"),
    pytest.param([f"big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)], None,
                 "big-Q4_K_M-00001-of-00003.gguf", id="a-split-gguf-loads-its-first-part"),
])
def test_llamacpp_gguf_in_a_folder(tmp_path: Path, names: list[str],
                                   source: dict[str, Any] | None, loaded: str) -> None:
    folder = folder_of(tmp_path, names)
    spec = gguf_spec(folder) if source is None else gguf_spec(folder, source=source)
    plan = launch_plan(spec, folder, HOST, PORT, [])
    assert flag_value(plan.argv, "--model") == [str(folder / loaded)]


@pytest.mark.parametrize(("names", "source", "fragments"), [
    pytest.param(["model.Q4_K_M.gguf", "model.Q8_0.gguf"], {"hf": "org/model-GGUF"},
                 ["model 'tiny'", "several .gguf files", "`source.files`",
                  "model.Q4_K_M.gguf", "model.Q8_0.gguf"],
                 id="two-ggufs-from-the-hub-ask-to-choose-with-source-files"),
    pytest.param(["a.gguf", "b.gguf"], None, ["`source.path` pointing at the file"],
                 id="two-ggufs-in-a-path-folder-ask-for-the-file"),
    pytest.param(["model.safetensors"], None, ["no .gguf file"], id="a-folder-without-gguf"),
])
def test_llamacpp_folder_refused(tmp_path: Path, names: list[str],
                                 source: dict[str, Any] | None, fragments: list[str]) -> None:
    folder = folder_of(tmp_path, names)
    spec = gguf_spec(folder) if source is None else gguf_spec(folder, source=source)
    with pytest.raises(BackendConfigError) as info:
        launch_plan(spec, folder, HOST, PORT, [])
    for fragment in fragments:
        assert fragment in str(info.value), fragment


@pytest.mark.parametrize("key", ["model", "host", "port", "model_alias", "model-alias"])
def test_llamacpp_reserved_engine_args(gguf: Path, key: str) -> None:
    spec = gguf_spec(gguf, engine_args={key: "x"})
    with pytest.raises(BackendConfigError, match="engine_args may not set"):
        launch_plan(spec, gguf, HOST, PORT, [])


def test_llamacpp_argv_parses_with_llama_cpp_server(gguf: Path) -> None:
    """The command line is accepted by llama_cpp.server's own argument parser."""
    cli = pytest.importorskip("llama_cpp.server.cli")
    server_settings = pytest.importorskip("llama_cpp.server.settings")
    spec = gguf_spec(gguf, engine_args={
        "n_ctx": 4096, "verbose": False, "tensor_split": [0.25, 0.75],
        "chat_template_kwargs": {"enable_thinking": False}, "chat_format": "chatml"})
    plan = launch_plan(spec, gguf, HOST, PORT, [0, 1])
    assert plan.argv[1:3] == ["-m", "llama_cpp.server"]
    parser = argparse.ArgumentParser()
    cli.add_args_from_model(parser, server_settings.Settings)
    args = parser.parse_args(plan.argv[3:])
    model = cli.parse_model_from_args(server_settings.ModelSettings, args)
    server = cli.parse_model_from_args(server_settings.ServerSettings, args)
    assert model.model == str(gguf)
    assert model.model_alias == "tiny"
    assert model.n_ctx == 4096
    assert model.n_gpu_layers == -1
    assert model.verbose is False
    assert model.tensor_split == [0.25, 0.75]
    assert model.chat_template_kwargs == {"enable_thinking": False}
    assert server.host == HOST and server.port == PORT


def test_llamacpp_without_weights(gguf: Path) -> None:
    with pytest.raises(BackendConfigError, match="no local weights"):
        launch_plan(gguf_spec(gguf), None, HOST, PORT, [])


# --------------------------------------------------------------------------- vLLM


@pytest.fixture
def no_multiproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)


def seed_spec(**extra: Any) -> ModelSpec:
    """A spec shaped like the seed deployment (Qwen3-32B-AWQ on two GPUs)."""
    data: dict[str, Any] = {
        "id": "qwen3-32b",
        "aliases": ["Qwen/Qwen3-32B-AWQ", "qwen3"],
        "backend": "vllm",
        "source": {"hf": "Qwen/Qwen3-32B-AWQ"},
        "gpus": [0, 1],
        "python": "/opt/vllm/bin/python",
        "engine_args": {
            "max_model_len": 131072,
            "quantization": "awq_marlin",
            "gpu_memory_utilization": 0.9,
            "distributed_executor_backend": "mp",
            "swap_space": 16,
        },
    }
    data.update(extra)
    return ModelSpec.model_validate(data)


@pytest.mark.usefixtures("no_multiproc_env")
def test_vllm_seed_deployment(tmp_path: Path) -> None:
    weights = tmp_path / "snapshots" / "abc"
    plan = launch_plan(seed_spec(), weights, HOST, PORT, [0, 1], hf_token="hf_secret")
    argv = plan.argv
    assert argv[0] == "/opt/vllm/bin/vllm"
    assert argv[1:3] == ["serve", str(weights)]
    assert flag_value(argv, "--host") == [HOST]
    assert flag_value(argv, "--port") == [str(PORT)]
    assert flag_value(argv, "--served-model-name", 3) == \
        ["qwen3-32b", "Qwen/Qwen3-32B-AWQ", "qwen3"]
    assert flag_value(argv, "--tensor-parallel-size") == ["2"]
    assert flag_value(argv, "--max-model-len") == ["131072"]
    assert flag_value(argv, "--quantization") == ["awq_marlin"]
    assert flag_value(argv, "--gpu-memory-utilization") == ["0.9"]
    assert flag_value(argv, "--distributed-executor-backend") == ["mp"]
    assert flag_value(argv, "--swap-space") == ["16"]
    # Every element is a string (no stray ints reach exec).
    assert all(isinstance(part, str) for part in argv)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert plan.env["HF_HUB_OFFLINE"] == "1"
    assert plan.env["HF_TOKEN"] == "hf_secret"
    assert plan.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert plan.probe_path == "/health"


def test_vllm_keeps_an_inherited_multiproc_method(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    plan = launch_plan(seed_spec(), tmp_path, HOST, PORT, [0, 1])
    assert "VLLM_WORKER_MULTIPROC_METHOD" not in plan.env
    assert "HF_TOKEN" not in plan.env


def test_vllm_executable_beside_the_gateway_python(tmp_path: Path) -> None:
    plan = launch_plan(seed_spec(python=None), tmp_path, HOST, PORT, [0, 1])
    assert plan.argv[0] == str(Path(sys.executable).parent / "vllm")
    assert vllm.vllm_executable(None) == plan.argv[0]
    assert vllm.vllm_executable("/envs/v/bin/python3") == "/envs/v/bin/vllm"


@pytest.mark.parametrize(("changes", "gpus", "flags", "absent"), [
    pytest.param({"gpus": None, "gpu_count": 4, "engine_args": {}}, [4, 5, 6, 7],
                 {"--tensor-parallel-size": ["4"], "--distributed-executor-backend": ["mp"]},
                 [], id="tensor-parallel-defaults-to-the-gpu-count"),
    pytest.param({"engine_args": {"distributed-executor-backend": "ray"}}, [0, 1],
                 {"--distributed-executor-backend": ["ray"]}, [],
                 id="the-executor-can-be-chosen"),
    pytest.param({"gpus": [3], "engine_args": {"max_model_len": 8192}}, [3],
                 {"--tensor-parallel-size": ["1"]}, ["--distributed-executor-backend"],
                 id="one-gpu-has-no-executor-flag"),
    pytest.param({"engine_args": {"tensor_parallel_size": 2}}, [0, 1],
                 {"--tensor-parallel-size": ["2"]}, [],
                 id="an-explicit-matching-tensor-parallel-size"),
])
def test_vllm_parallelism(tmp_path: Path, changes: dict[str, Any], gpus: list[int],
                          flags: dict[str, list[str]], absent: list[str]) -> None:
    plan = launch_plan(seed_spec(**changes), tmp_path, HOST, PORT, gpus)
    for flag, values in flags.items():
        assert flag_value(plan.argv, flag) == values
    for flag in absent:
        assert flag not in plan.argv
    assert plan.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, gpus))


# The models file demands GPUs; the plan still refuses when the GPUs actually placed
# (none, or fewer than the models file's agreeing 2 and 2) do not fit.
@pytest.mark.parametrize(("changes", "gpus", "fragments"), [
    pytest.param({"gpus": None, "gpu_count": 1}, [],
                 ["model 'qwen3-32b'", "needs an NVIDIA GPU"], id="no-gpu-placed"),
    pytest.param({"gpus": None, "gpu_count": 2, "engine_args": {"tensor_parallel_size": 2}},
                 [0], ["tensor_parallel_size=2 but 1 GPU(s)"],
                 id="tensor-parallel-size-above-the-placed-gpus"),
])
def test_vllm_refused_placements(tmp_path: Path, changes: dict[str, Any], gpus: list[int],
                                 fragments: list[str]) -> None:
    with pytest.raises(BackendConfigError) as info:
        launch_plan(seed_spec(**changes), tmp_path, HOST, PORT, gpus)
    for fragment in fragments:
        assert fragment in str(info.value), fragment


@pytest.mark.parametrize("key", ["host", "port", "served_model_name", "served-model-name",
                                 "model"])
def test_vllm_reserved_engine_args(tmp_path: Path, key: str) -> None:
    spec = seed_spec(engine_args={key: "x"})
    with pytest.raises(BackendConfigError, match="engine_args may not set"):
        launch_plan(spec, tmp_path, HOST, PORT, [0, 1])


def test_vllm_boolean_engine_args(tmp_path: Path) -> None:
    spec = seed_spec(engine_args={"enforce_eager": True, "enable_prefix_caching": False,
                                  "trust-remote-code": True})
    plan = launch_plan(spec, tmp_path, HOST, PORT, [0, 1])
    i = plan.argv.index("--enforce-eager")
    # A bare flag: nothing follows it, or the next flag does.
    assert i == len(plan.argv) - 1 or plan.argv[i + 1].startswith("--")
    assert "--trust-remote-code" in plan.argv
    assert not any("prefix-caching" in part for part in plan.argv)
    assert "True" not in plan.argv and "False" not in plan.argv


def test_vllm_module_plan_direct(tmp_path: Path) -> None:
    plan = vllm.plan(seed_spec(), tmp_path, "127.0.0.2", 9999, [0, 1])
    assert flag_value(plan.argv, "--host") == ["127.0.0.2"]
    assert flag_value(plan.argv, "--port") == ["9999"]


# --------------------------------------------------------------------------- command / remote


def test_command_substitutes_port_and_host() -> None:
    spec = ModelSpec(id="custom", backend=Backend.command,
                     command=["my-server", "--listen={host}:{port}", "--port", "{port}",
                              "--host", "{host}"])
    plan = launch_plan(spec, None, HOST, PORT, [])
    assert plan.argv == ["my-server", f"--listen={HOST}:{PORT}", "--port", str(PORT),
                         "--host", HOST]
    assert plan.env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.probe_path == "/v1/models"


def test_command_with_gpus() -> None:
    spec = ModelSpec(id="custom", backend=Backend.command, gpus=[2],
                     command=["srv", "{port}"])
    plan = launch_plan(spec, None, HOST, PORT, [2])
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "2"


def test_command_does_not_change_the_spec() -> None:
    spec = ModelSpec(id="custom", backend=Backend.command, command=["srv", "{port}"])
    launch_plan(spec, None, HOST, PORT, [])
    assert spec.command == ["srv", "{port}"]


def test_remote_does_not_start_a_process(tmp_path: Path) -> None:
    spec = ModelSpec(id="up", backend=Backend.remote,
                     source=UrlSource(url="http://10.0.0.5:8000/v1"))
    with pytest.raises(BackendConfigError, match="does not start processes"):
        launch_plan(spec, tmp_path, HOST, PORT, [])


def test_llamacpp_module_gguf_file_accepts_a_file(gguf: Path) -> None:
    spec = ModelSpec(id="f", backend=Backend.llamacpp, source=PathSource(path=gguf))
    assert llamacpp.gguf_file(spec, gguf) == gguf


# --------------------------------------------------------------------------- worker apps


@pytest.mark.parametrize(("backend", "task"), [("speech", "transcription"),
                                               ("diarization", "diarization")])
def test_audio_apps_get_the_audio_duration_cap(tmp_path: Path, backend: str,
                                               task: str) -> None:
    spec = ModelSpec(id="a", backend=Backend(backend), task=task,
                     source=PathSource(path=tmp_path))
    plan = launch_plan(spec, tmp_path, HOST, PORT, [], max_audio_seconds=3600.0)
    assert plan.argv[2] == f"modelhost.workers.apps.{backend}"
    assert flag_value(plan.argv, "--max-audio-seconds") == ["3600.0"]
    assert "--max-audio-seconds" not in launch_plan(spec, tmp_path, HOST, PORT, []).argv
    # The models file may set a model's own cap, in either spelling; it is passed once.
    for key in ("max_audio_seconds", "max-audio-seconds"):
        own = spec.model_copy(update={"engine_args": {key: 60}})
        argv = launch_plan(own, tmp_path, HOST, PORT, [], max_audio_seconds=3600.0).argv
        assert flag_value(argv, "--max-audio-seconds") == ["60"]


def test_embeddings_app_gets_no_audio_cap(tmp_path: Path) -> None:
    spec = ModelSpec(id="e", backend=Backend.embeddings, task="embedding",
                     source=PathSource(path=tmp_path))
    plan = launch_plan(spec, tmp_path, HOST, PORT, [], max_audio_seconds=3600.0)
    assert "--max-audio-seconds" not in plan.argv
