"""The Alembic environment of modelhost's database; ``Store.migrate()`` runs it."""
