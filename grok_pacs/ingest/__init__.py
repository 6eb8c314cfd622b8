"""Receive and assemble: the C-STORE listener (`listener`) with its pynetdicom receive set-up (`transport`:
streaming into the data directory, TLS), its defences against hostile peers (`guard`: PDU limits and
deadlines, admission before transfer; `connections`: connections read without threads until their
association request is whole), quiet-period assembly and crash recovery (`assembly`), the
per-host uploader into the object store (`uploader`), the reaper that queues lost work again (`reaper`) and
the process that runs them (`service`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.store`, `grok_pacs.ops`.
The job publisher is handed to `IngestService` by its caller (`grok_pacs.jobs.publisher.JobPublisher`).
"""
