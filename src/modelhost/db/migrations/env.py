"""Alembic environment of modelhost's database.

Run programmatically by ``modelhost.db.store.Store.migrate()``, which passes its own connection
in ``config.attributes["connection"]``. Without one (``alembic_config(url)`` with
``alembic.command``, e.g. to autogenerate a new revision), a connection is opened on
``sqlalchemy.url`` with the same settings the store uses.

The whole upgrade is one transaction, on SQLite as well (it has transactional DDL): a gateway
killed in the middle of a migration leaves the database at its previous revision, never
half-migrated. Concurrent migrations serialize: on SQLite the transaction starts with
``BEGIN IMMEDIATE`` (the store's migration engine), on PostgreSQL it takes an advisory lock,
so that several gateway replicas starting together upgrade the schema once.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

from modelhost.db.schema import Base, UTCDateTime

# Any constant: the key of the PostgreSQL advisory lock held while migrating.
PG_MIGRATION_LOCK = 0x6D6F64656C686F  # "modelho"

config = context.config
target_metadata = Base.metadata


def render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes the application's column types as plain SQLAlchemy types.

    A migration must not depend on application classes that may change after it is written;
    ``UTCDateTime`` is only Python-side behaviour over ``DateTime(timezone=True)``.
    """
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
        transactional_ddl=True,
        render_item=render_item,
        **options,
    )


def run_migrations_offline() -> None:
    """Write the SQL to stdout (``alembic upgrade head --sql``) for a DBA to review and run."""
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            # The store migrates with foreign keys off (SQLite's procedure for rebuilding a
            # table); check them all before committing.
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration broke foreign keys: {broken[:10]}")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from modelhost.db.engine import migration_engine

    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url in the Alembic config")
    engine = migration_engine(url)
    try:
        with engine.connect() as new_connection:
            _run(new_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
