"""Durable state on this host: the study index (`index`, SQLite), the SR outbox (`outbox`), atomic,
fsynced file writes (`files`) and the group commit of received instances (`group_commit`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.ops`.
"""
