"""Deliver (`sender`): write an SR or PDF to disk, send it to the PACS exactly once through the outbox,
and set the study state its outbox rows imply; where a result lives, a file or an object-store key the
outbox row holds (`results`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.store`, `grok_pacs.ops`.
"""
