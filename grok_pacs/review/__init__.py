"""The clinicians' review page (issue #34): a worklist of delivered AI results, one study's page with its images
and PDF report, and Accept / Reject / Correct. The Flask application and its routes (`app`, Jinja2 templates in
`templates/`), the accounts with hashed passwords and roles (`accounts`), what a review does: the verified SR or
the rejection note queued in the outbox, the register's verdict, the audit message (`actions`), the source images
as PNG (`images`), and serving it all with waitress (`server`), in `grok-pacs serve` or `grok-pacs review`.

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.store`, `grok_pacs.ops`,
`grok_pacs.report`, `grok_pacs.delivery` (it queues results as the study job does; jobs imports it).
"""
