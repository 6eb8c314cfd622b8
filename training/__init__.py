"""Training: the GROK model's three stages on a cohort, and what measures the bundle they produce.

Not in the runtime wheel: installed from the checkout with the other development packages
(docs/CONTRIBUTING.md, Packages). Stage 3 hands its parts to `export` to build the bundle.

May import: `grok_pacs`, `export`.

Layers inside training, lowest first: a module may import its own layer and the layers listed before it
(tests/architecture/test_layers.py reads this table):

    shared     `manifest` (the cohort manifest), `records` (predictions and references), `cache_keys`,
               `tokenizer`, `contrastive`, `pattern`, `calibration` (fit on predictions handed in),
               `decision` (the decision classifier's fit and operating point),
               `phantom` (the synthetic cohort), `cohort` (a cohort from a PACS export; its fingerprint),
               `distributed` (torchrun data parallelism: process group, rank 0 writes, barriers)
               `sharding` (FSDP2: a model sharded over the ranks, its checkpoints gathered onto rank 0)
    stage1     `stage1` (teachers write each eye's report; instruction records)
    stage2     `stage2` (image encoders aligned with the biomarkers)
    stage3     `stage3` (the multimodal LLM's fine-tuning, the bundle and its calibration run)
    benchmark  `benchmark` (scores a bundle's predictions; safety and honesty figures; the LM beside
               the guideline teacher)
    top        `quality_head` (a learned gradability head on a bundle), `ood` (a bundle's device-shift
               check, fitted on its cohort's features), `estimate_error` (each biomarker estimate's
               typical error on the validation eyes), `pipeline` (every step, cached),
               `pipeline_config` (its settings and each step's cache key), `pipeline_cli` (its command
               line), `compare` (a candidate bundle against the serving one)

`data/` holds the Eye-Guideline knowledge the stage-1 teachers read.
"""
