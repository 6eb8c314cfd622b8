"""Durable state: the database (`db`: SQLAlchemy Core tables, the embedded SQLite file or PostgreSQL), the
study index (`index`), the SR outbox (`outbox`) and atomic, fsynced file writes (`files`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.ops`.
"""
