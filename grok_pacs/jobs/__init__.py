"""Run the work: the Celery app (`app`), the job publisher (`publisher`), the worker's resources
carried by its app and its Celery worker (`worker`), the tasks (`tasks`), a job's one read of the index
(`snapshot`), a job's copies of its instances from the object store (`fetch`), the backoff of its transient
errors (`retry`), the per-study pipeline
(`pipeline`, with its PDF step `pdf_report`) and the one-box service (`serve`).

May import every runtime package below it (config, domain, dicom, store, ops, model, analysis, report,
delivery, ingest); never `cli`, `training` or `export`.
"""
