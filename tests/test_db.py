"""The database: migrations, the store's API, and what survives a restart or a kill -9.

Everything runs on a real SQLite file in tmp_path; the crash and concurrency tests run real
child processes. The portable tests also run on PostgreSQL when MODELHOST_TEST_DATABASE_URL
names an empty database that may be wiped (e.g. postgresql+psycopg://user@localhost/test).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from modelhost.config import ModelSpec
from modelhost.db.schema import Base
from modelhost.db.store import (
    DB_FILENAME,
    Store,
    StoreError,
    alembic_config,
    default_url,
    head_revision,
)

POSTGRES_URL = os.environ.get("MODELHOST_TEST_DATABASE_URL")
BACKENDS = ["sqlite", *(["postgresql"] if POSTGRES_URL else [])]
TABLES = {"models", "model_revisions", "desired_states", "downloads"}


def _wipe_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        assert POSTGRES_URL is not None
        _wipe_postgres(POSTGRES_URL)
        return POSTGRES_URL
    return f"sqlite:///{tmp_path / 'data' / DB_FILENAME}"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store.open(url) as opened:
        opened.migrate()
        yield opened


def remote_spec(model_id: str, **fields: object) -> str:
    spec = ModelSpec.model_validate(
        {"id": model_id, "backend": "remote", "source": {"url": "http://10.0.0.5:8000/v1"},
         **fields})
    return spec.model_dump_json()


def sqlite_integrity(path: Path) -> tuple[list[tuple[str]], list[tuple[object, ...]]]:
    with closing(sqlite3.connect(path)) as raw:
        return (raw.execute("PRAGMA integrity_check").fetchall(),
                raw.execute("PRAGMA foreign_key_check").fetchall())


# -- schema and migrations ---------------------------------------------------------------------


def test_migrate_fresh_database_then_again(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "data" / DB_FILENAME
    url = default_url(path.parent)
    assert url == f"sqlite:///{path}"
    with Store.open(url) as store:
        assert path.parent.is_dir()  # open() creates the folder
        assert store.schema_revision() is None
        assert store.migrate() == head_revision()
        assert store.schema_revision() == head_revision()
        assert set(sa.inspect(store.engine).get_table_names()) >= TABLES
        store.upsert_model(remote_spec("a"), "a", "api", "test")
        assert store.migrate() == head_revision()  # idempotent, and keeps the data
        assert [m.model_id for m in store.models()] == ["a"]
    with Store.open(url) as again:
        assert again.migrate() == head_revision()
        assert [m.model_id for m in again.models()] == ["a"]


def test_sqlite_settings(tmp_path: Path) -> None:
    with Store.open(default_url(tmp_path)) as store, store.engine.connect() as connection:
        def pragma(name: str) -> object:
            return connection.exec_driver_sql(f"PRAGMA {name}").scalar()

        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 30000


def test_migration_head_matches_the_models(store: Store) -> None:
    """The migrations and schema.py never drift: autogenerate finds nothing to do."""
    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_heads() == [head_revision()]  # one line of history, no branches
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_to_base_and_upgrade_again(url: str) -> None:
    with Store.open(url) as store:
        store.migrate()
        command.downgrade(alembic_config(url), "base")
        assert not TABLES & set(sa.inspect(store.engine).get_table_names())
        assert store.schema_revision() is None
        store.migrate()
        assert set(sa.inspect(store.engine).get_table_names()) >= TABLES


def test_database_from_a_newer_modelhost_is_refused(store: Store) -> None:
    with store.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00d'")
    with pytest.raises(StoreError, match="newer version of modelhost"):
        store.migrate()


def test_migrations_render_for_postgresql() -> None:
    """Without a server: the migration renders as PostgreSQL DDL (portable types only)."""
    config = alembic_config("postgresql+psycopg://modelhost@localhost/modelhost")
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "CREATE TABLE models" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "CREATE INDEX ix_downloads_model_id_state" in sql
    assert "COMMIT" in sql


# -- model specs -------------------------------------------------------------------------------


def test_upsert_versions_history_and_rollback(store: Store) -> None:
    v1 = remote_spec("m")
    assert store.upsert_model(v1, "m", "file", "config-file") == 1
    # The same spec, keys in another order: no new version, no new revision.
    reordered = json.dumps(dict(reversed(list(json.loads(v1).items()))))
    assert store.upsert_model(reordered, "m", "file", "config-file") == 1
    v2 = remote_spec("m", idle_ttl=60)
    assert store.upsert_model(v2, "m", "api", "admin-api") == 2
    assert store.upsert_model(v2, "m", "api", "admin-api") == 2

    [row] = store.models()
    assert (row.model_id, row.version, row.source, row.deleted) == ("m", 2, "api", False)
    assert ModelSpec.model_validate_json(row.spec_json).idle_ttl == 60
    assert row.spec()["idle_ttl"] == 60
    assert store.model("m") == row

    history = store.history("m")
    assert [(r.version, r.action, r.actor) for r in history] == [
        (1, "created", "config-file"), (2, "updated", "admin-api")]
    assert ModelSpec.model_validate_json(v1) == ModelSpec.model_validate(history[0].spec())

    # Roll back to version 1: a new version whose spec is version 1's.
    old = store.revision("m", 1)
    assert old is not None and old.spec_json is not None
    assert store.upsert_model(old.spec_json, "m", "api", "admin-api") == 3
    current = store.model("m")
    assert current is not None and current.spec() == old.spec()
    assert store.revision("m", 99) is None
    assert store.revision("nope", 1) is None
    assert store.history("nope") == []


def test_delete_is_a_revision_and_keeps_the_history(store: Store) -> None:
    store.upsert_model(remote_spec("m"), "m", "api", "admin-api")
    store.upsert_model(remote_spec("keep"), "keep", "file", "config-file")
    assert store.delete_model("m", "admin-api") == 2
    assert store.delete_model("m", "admin-api") is None  # already deleted
    assert store.delete_model("unknown", "admin-api") is None

    assert [m.model_id for m in store.models()] == ["keep"]
    deleted = [m for m in store.models(include_deleted=True) if m.model_id == "m"]
    assert [(m.version, m.deleted) for m in deleted] == [(2, True)]
    deletion = store.revision("m", 2)
    assert deletion is not None
    assert (deletion.action, deletion.spec_json, deletion.spec()) == ("deleted", None, None)

    # Adding it again, even with the same spec, is a change: version 3, "created".
    assert store.upsert_model(remote_spec("m"), "m", "api", "admin-api") == 3
    assert [r.action for r in store.history("m")] == ["created", "deleted", "created"]
    assert [m.model_id for m in store.models()] == ["keep", "m"]


def test_source_change_alone_adds_no_revision(store: Store) -> None:
    store.upsert_model(remote_spec("m"), "m", "file", "config-file")
    assert store.upsert_model(remote_spec("m"), "m", "api", "admin-api") == 1
    row = store.model("m")
    assert row is not None and row.source == "api"
    assert len(store.history("m")) == 1


@pytest.mark.parametrize(("spec_json", "model_id", "source", "match"), [
    ("{not json", "m", "api", "not valid JSON"),
    ("[1, 2]", "m", "api", "JSON object"),
    (remote_spec("other"), "m", "api", "stored as model 'm'"),
    (remote_spec("m"), "m", "somewhere", "source must be one of"),
    (remote_spec("m"), "", "api", "model_id"),
])
def test_invalid_specs_are_refused_and_write_nothing(
        store: Store, spec_json: str, model_id: str, source: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.upsert_model(spec_json, model_id, source, "admin-api")
    assert store.models(include_deleted=True) == []


def test_timestamps_are_aware_utc(store: Store) -> None:
    before = datetime.now(UTC)
    store.upsert_model(remote_spec("m"), "m", "api", "t")
    row = store.model("m")
    assert row is not None
    for stamp in (row.created_at, row.updated_at, store.history("m")[0].created_at):
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


def test_one_store_from_many_threads(store: Store) -> None:
    """The gateway calls the store through asyncio.to_thread: many threads, one Store."""
    def change(i: int) -> int:
        return store.upsert_model(remote_spec("t", max_queue=i), "t", "api", "admin-api")

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(change, range(40)))
    assert sorted(versions) == list(range(1, 41))
    assert [r.version for r in store.history("t")] == list(range(1, 41))


# -- desired states ----------------------------------------------------------------------------


def test_desired_states_round_trip(store: Store) -> None:
    assert store.desired_states() == {}
    store.set_desired("a", "loaded", [0, 1])
    store.set_desired("b", "unloaded")
    first = store.desired_states()
    assert first["a"].desired == "loaded" and first["a"].gpu_device_ids == (0, 1)
    assert first["b"].desired == "unloaded" and first["b"].gpu_device_ids is None

    store.set_desired("a", "unloaded", None)
    store.set_desired("b", "loaded", [3])
    second = store.desired_states()
    assert (second["a"].desired, second["a"].gpu_device_ids) == ("unloaded", None)
    assert (second["b"].desired, second["b"].gpu_device_ids) == ("loaded", (3,))
    assert second["a"].updated_at >= first["a"].updated_at

    with pytest.raises(ValueError, match="desired must be one of"):
        store.set_desired("a", "ready")
    with pytest.raises(ValueError, match="distinct"):
        store.set_desired("a", "loaded", [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        store.set_desired("a", "loaded", [-1])
    assert store.desired_states() == second


# -- downloads ---------------------------------------------------------------------------------


def test_download_lifecycle(store: Store) -> None:
    first = store.create_download("qwen", "Qwen/Qwen3-32B-AWQ", "main", ["*.json"], 100)
    second = store.create_download("qwen", "Qwen/Qwen3-32B-AWQ")
    other = store.create_download("llama", "org/llama", "v1")
    queued = store.download(first)
    assert queued is not None
    assert (queued.state, queued.bytes_done, queued.bytes_total, queued.patterns,
            queued.finished_at, queued.finished) == ("queued", 0, 100, ("*.json",), None, False)
    assert [d.id for d in store.interrupted_downloads()] == [first, second, other]

    assert store.update_download(first, state="running", bytes_total=120)
    for done in (10, 60, 120):
        assert store.update_download(first, bytes_done=done)
    assert store.update_download(first, state="completed")
    assert store.update_download(second, state="cancelled")
    assert store.update_download(other, state="running")
    assert store.update_download(other, state="failed", error="403 gated repository")

    completed = store.download(first)
    assert completed is not None and completed.finished
    assert (completed.state, completed.bytes_done, completed.bytes_total) == (
        "completed", 120, 120)
    assert completed.finished_at is not None and completed.finished_at >= completed.created_at
    failed = store.download(other)
    assert failed is not None and (failed.state, failed.error) == ("failed", "403 gated repository")

    # A finished download never changes again: a late progress update cannot undo a cancel.
    assert not store.update_download(second, bytes_done=5)
    assert not store.update_download(second, state="running")
    cancelled = store.download(second)
    assert cancelled is not None and (cancelled.state, cancelled.bytes_done) == ("cancelled", 0)

    assert [d.id for d in store.downloads("qwen")] == [first, second]
    assert [d.id for d in store.downloads(states=["failed", "cancelled"])] == [second, other]
    assert [d.id for d in store.downloads("qwen", states=["completed"])] == [first]
    assert store.interrupted_downloads() == []
    assert store.download(999) is None


def test_download_updates_are_checked(store: Store) -> None:
    download = store.create_download("m", "org/repo")
    with pytest.raises(KeyError):
        store.update_download(download + 1, bytes_done=1)
    with pytest.raises(ValueError, match="state must be one of"):
        store.update_download(download, state="paused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        store.update_download(download, bytes_done=-1)
    with pytest.raises(TypeError, match="unknown fields"):
        store.update_download(download, repo="x/y")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="states must be"):
        store.downloads(states="running")
    with pytest.raises(ValueError, match="patterns"):
        store.create_download("m", "org/repo", patterns="*.gguf")
    unchanged = store.download(download)
    assert unchanged is not None and (unchanged.state, unchanged.bytes_done) == ("queued", 0)


# -- restarts ----------------------------------------------------------------------------------


def test_reopened_store_has_everything(url: str) -> None:
    with Store.open(url) as store:
        store.migrate()
        store.upsert_model(remote_spec("a"), "a", "file", "config-file")
        store.upsert_model(remote_spec("a", idle_ttl=5), "a", "api", "admin-api")
        store.upsert_model(remote_spec("b"), "b", "api", "admin-api")
        store.delete_model("b", "admin-api")
        store.set_desired("a", "loaded", [2])
        running = store.create_download("a", "org/a", patterns=["*.gguf"])
        store.update_download(running, state="running", bytes_done=42, bytes_total=100)
        store.update_download(store.create_download("a", "org/a"), state="completed")
        before = (store.models(include_deleted=True), store.history("a"), store.history("b"),
                  store.desired_states(), store.downloads())

    with Store.open(url) as store:
        store.migrate()
        after = (store.models(include_deleted=True), store.history("a"), store.history("b"),
                 store.desired_states(), store.downloads())
        assert after == before
        [interrupted] = store.interrupted_downloads()
        assert (interrupted.id, interrupted.bytes_done, interrupted.patterns) == (
            running, 42, ("*.gguf",))


CRASH_CHILD = r"""
import json, sys
from modelhost.db.store import Store

store = Store.open(sys.argv[1])
download_id = int(sys.argv[2])
pad = "x" * 6000  # a revision spans several pages: a torn write would show
current = store.model("crash")
version = current.version if current is not None else 0
while True:
    spec = json.dumps({"id": "crash", "backend": "remote", "n": version + 1, "pad": pad})
    version = store.upsert_model(spec, "crash", "api", "crash-test")
    store.update_download(download_id, bytes_done=version)
    store.set_desired("crash", "loaded" if version % 2 else "unloaded", [version % 8])
    print(version, flush=True)
"""


def test_kill_9_mid_write_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    url = f"sqlite:///{path}"
    with Store.open(url) as store:
        store.migrate()
        download_id = store.create_download("crash", "org/repo")
        store.update_download(download_id, state="running")

    rng = random.Random(9)
    reported = 0  # the last version the child reported committed (with its progress)
    for _round in range(4):
        target = reported + rng.randint(15, 60)
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, url, str(download_id)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stderr is not None
        for line in child.stdout:
            reported = int(line)
            if reported >= target:
                break
        time.sleep(rng.random() * 0.005)  # land anywhere in the next writes
        child.send_signal(signal.SIGKILL)
        child.wait()
        stderr = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL, stderr
        assert reported >= target, stderr

        assert sqlite_integrity(path) == ([("ok",)], [])
        with Store.open(url) as store:
            assert store.migrate() == head_revision()
            history = store.history("crash")
            versions = [r.version for r in history]
            assert versions == list(range(1, len(versions) + 1))  # contiguous
            assert len(versions) >= reported  # nothing committed is lost
            for revision in history:  # every revision whole
                spec = revision.spec()
                assert spec is not None and spec["n"] == revision.version
                assert len(spec["pad"]) == 6000
            model = store.model("crash")
            assert model is not None
            assert (model.version, model.spec_json) == (versions[-1], history[-1].spec_json)
            download = store.download(download_id)
            assert download is not None and download.state == "running"
            assert reported <= download.bytes_done <= versions[-1]
            desired = store.desired_states()["crash"]
            assert desired.gpu_device_ids is not None and len(desired.gpu_device_ids) == 1
            assert [d.id for d in store.interrupted_downloads()] == [download_id]


CONCURRENT_CHILD = r"""
import json, sys, time
from pathlib import Path
from modelhost.db.store import Store

url, name, go, count = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
store = Store.open(url)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
store.migrate()  # both processes migrate the fresh database at once
download_id = store.create_download(name, "org/" + name)
store.update_download(download_id, state="running")
for i in range(count):
    store.upsert_model(json.dumps({"id": name, "backend": "remote", "n": i}), name, "api", name)
    spec = json.dumps({"id": "shared", "backend": "remote", "by": name, "n": i})
    store.upsert_model(spec, "shared", "api", name)
    store.set_desired("shared", "loaded", [i % 8])
    store.update_download(download_id, bytes_done=i)
store.update_download(download_id, state="completed")
store.close()
print("done", flush=True)
"""


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    url = f"sqlite:///{path}"
    go = tmp_path / "go"
    count = 120
    children = {
        name: subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, url, name, str(go),
                                str(count)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("alpha", "beta")
    }
    for child in children.values():
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
    go.touch()
    for name, child in children.items():
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, f"{name}: {err}"
        assert out == "done\n" and "locked" not in err

    assert sqlite_integrity(path) == ([("ok",)], [])
    with Store.open(url) as store:
        assert store.schema_revision() == head_revision()
        versions = {m.model_id: m.version for m in store.models()}
        assert versions == {"alpha": count, "beta": count, "shared": 2 * count}
        shared = store.history("shared")
        assert [r.version for r in shared] == list(range(1, 2 * count + 1))
        authors = [r.actor for r in shared]
        assert authors.count("alpha") == authors.count("beta") == count
        assert all((r.spec() or {})["by"] == r.actor for r in shared)
        downloads = store.downloads()
        assert sorted(d.model_id for d in downloads) == ["alpha", "beta"]
        assert {(d.state, d.bytes_done) for d in downloads} == {("completed", count - 1)}
        assert store.interrupted_downloads() == []


# -- privacy: file modes, secrets out of the files, bounded waits ------------------------------


def test_database_file_and_folder_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    with Store.open(default_url(data)) as store:
        store.migrate()
        store.upsert_model(remote_spec("m"), "m", source="api", actor="t")
        files = sorted(data.iterdir())
        assert {f.name for f in files} >= {DB_FILENAME, DB_FILENAME + "-wal"}
        for f in files:  # the log and shared-memory files too (SQLite copies the mode)
            assert f.stat().st_mode & 0o777 == 0o600, f
    assert data.stat().st_mode & 0o777 == 0o700
    # An existing database that others could read is made private.
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / DB_FILENAME).touch(mode=0o644)
    (loose / DB_FILENAME).chmod(0o644)
    Store.open(default_url(loose)).close()
    assert (loose / DB_FILENAME).stat().st_mode & 0o777 == 0o600
    assert loose.stat().st_mode & 0o777 == 0o755  # a folder it did not create is left alone


def test_rewrite_specs_leaves_no_old_bytes(tmp_path: Path) -> None:
    """Specs rewritten in place (secrets moved out) are gone from the file, history too."""
    secret = "sk-old-version-kept-this-1234"
    path = tmp_path / DB_FILENAME
    with Store.open(default_url(tmp_path)) as store:
        store.migrate()
        for version in range(3):
            spec = {"id": "m", "backend": "remote", "max_queue": version, "source": {
                "url": "http://10.0.0.5:8000/v1", "api_key": f"{secret}{version}"}}
            store.upsert_model(json.dumps(spec), "m", source="api", actor="t")
        assert secret.encode() in path.read_bytes() + path.with_name(
            DB_FILENAME + "-wal").read_bytes()

        def rewrite(model_id: str, text: str) -> str:
            spec = json.loads(text)
            spec["source"]["api_key"] = "***"
            return json.dumps(spec)

        assert store.rewrite_specs(rewrite) == 4  # the current row and 3 revisions
        assert store.rewrite_specs(rewrite) == 0
        specs = [r.spec() for r in store.history("m")]
        assert [s["source"]["api_key"] for s in specs if s is not None] == ["***"] * 3
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in blob


def test_a_write_that_must_answer_soon_waits_a_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with Store.open(default_url(tmp_path)) as store:
        store.migrate()
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                store.waiting_at_most(0.5).upsert_model(remote_spec("m"), "m", source="api",
                                                        actor="t")
            assert time.monotonic() - started < 10
        finally:
            holder.rollback()
            holder.close()
        assert store.model("m") is None
        store.upsert_model(remote_spec("m"), "m", source="api", actor="t")
        assert store.model("m") is not None
