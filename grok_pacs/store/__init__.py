"""Durable state on this host: the study index (`index`, SQLite), the SR outbox (`outbox`) and atomic,
fsynced file writes (`files`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.ops`.
"""
