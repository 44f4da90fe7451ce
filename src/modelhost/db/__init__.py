"""The gateway's database: model specs and their history, desired states, downloads.

SQLite by default (``sqlite:///<data_dir>/modelhost.db``), through SQLAlchemy with Alembic
migrations, so that a PostgreSQL URL (``postgresql+psycopg://...``) can serve several gateway
replicas instead. ``schema`` holds the tables, ``migrations`` the Alembic environment,
``engine`` how a database is opened (SQLite's durability settings), and ``store.Store`` the
only API the rest of the gateway uses: short synchronous transactions that return plain
frozen dataclasses (``rows``), never ORM objects.
"""
