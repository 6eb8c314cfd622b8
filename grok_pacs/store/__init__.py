"""Durable state: the database (`db`: SQLAlchemy Core tables on the embedded SQLite file or PostgreSQL;
`schema`: its Alembic revision, migrations in `migrations/`), the study index (`index`; its row types
in `records`), the SR outbox (`outbox`), the results register (`register`: each eye's result after delivery: replaced,
withdrawn, reviewed), atomic, fsynced file writes (`files`) and the group commit of
received instances (`group_commit`); the blob store of immutable, content-addressed objects (`blobs`:
keys, errors, the local backend; `s3`: the S3-compatible backend; `storage`: which one the settings
select) and each received instance's upload state (`uploads`); expired leases of unfinished work, for the
reaper (`leases`); what is deleted when, by the retention policy (`retention`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.ops`.
"""
