"""Run the work: the Celery app (`app`), the job publisher (`publisher`), the worker's resources
carried by its app and its Celery worker (`worker`), the tasks (`tasks`), a job's one read of the index
(`snapshot`), a job's copies of its instances from the object store (`fetch`), the backoff of its transient
errors (`retry`), the per-study job (`study_job`: its eyes analysed by `eye_analysis`, its PDF written by
`pdf_report`; the results it registers, the earlier results they replace and an administrator's withdrawal
in `withdrawal`) and the one-box service (`serve`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.store`, `grok_pacs.ops`,
`grok_pacs.model`, `grok_pacs.analysis`, `grok_pacs.report`, `grok_pacs.delivery`, `grok_pacs.ingest`,
`grok_pacs.review` (every room below it; serve starts the review page). Never: `grok_pacs.cli`, `training`, `export`.
"""
