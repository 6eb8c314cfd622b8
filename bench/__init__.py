"""Benchmarks: each module measures one part against real peers or a trained bundle and writes its figures
to `results/` (docs/benchmarks.md). Run one as `python -m bench.NAME` (`make bench`, `make benchmark`).

Runtime: ingest (`ingest`, its receivers `ingest_targets` and `null_scp`; `ingest_profile`; the hostile
network, `hostile`; a full disk, `disk_full`), the object store (`blobstore`, `upload`), the database
(`database`), the PDF report (`pdf_report`), the end-to-end path (`e2e`), the review page (`review`).
Model: encoders (`encoders`), generation (`generate`), the quality gate (`gate`), calibration
(`calibration`, `calibration_study`), the phantom cohort (`phantom_cohort`), the benchmark on a trained
bundle (`phantom`, its Markdown `phantom_report`) and on the demo's (`demo_cohort`), the decision classifier
alone on a pipeline's test eyes (`decision_classifier`), acquisition-device shift (`shift`).
Not in the runtime wheel: installed from the checkout with the other development packages
(docs/CONTRIBUTING.md, Packages).

May import: `grok_pacs`, `export`, `training`, `devtools`.
"""
