"""The test suite, by area (ingest, store, jobs, analysis, report, training, deploy, architecture), with shared
helpers in `tests.helpers` and fixtures for all in conftest.py. Every folder is a package: test code imports as
`tests.…`.

May import: `grok_pacs`, `export`, `training`, `devtools`, `bench` (the tests sit above all they check).
"""
