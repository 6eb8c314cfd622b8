"""Deliver: write an SR to disk and send it to the PACS exactly once through the outbox.

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.store`, `grok_pacs.ops`.
"""
