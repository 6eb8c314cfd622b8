"""grok-pacs: the hospital runtime. CFP + OCT arrive by C-STORE, a grounded DICOM SR goes back.

The sub-packages follow the data flow, lowest layer first (tests/architecture/test_layers.py checks each package's
imports against its `__init__` docstring, and that there are no import cycles):

    config, domain, dicom      settings (secrets read from files: secret_files; peers and storage URLs:
                               addresses); labels and biomarkers; DICOM vocabulary and SCU
    ops, store, model          metrics/health/logs; index, outbox, files; the GROK network
    ingest, analysis, report   receive and assemble; run the model; build the SR
    delivery                   send each SR to the PACS exactly once
    review                     the clinicians' review page (accept, reject, correct a result)
    jobs                       Celery app, tasks, the per-study job, the one-box service
    cli                        the `grok-pacs` command

Nothing here imports `training` or `export`; development helpers live in `devtools/` (not shipped).
May import: no other package of the repository (the runtime wheel ships grok_pacs alone).
"""
