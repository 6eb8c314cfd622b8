"""Run the work: the Celery app (`app`), the job publisher (`publisher`), the worker's resources
carried by its app and its Celery worker (`worker`), the tasks (`tasks`), the per-study pipeline
(`pipeline`) and the one-box service (`serve`).

May import every runtime package below it (config, domain, dicom, store, ops, model, analysis, report,
delivery, ingest); never `cli`, `training` or `export`.
"""
