"""Alembic migrations of the database schema (`grok_pacs.store.db`), applied by `grok-pacs db upgrade`
through `grok_pacs.store.schema`: `env` runs them on the connection it is handed; `versions/` holds one
script per schema revision (baseline 0001: the tables as the first release with a server database has them)."""
