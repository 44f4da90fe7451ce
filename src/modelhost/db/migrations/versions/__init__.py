"""Alembic revisions, oldest first; Alembic itself skips this file."""
