"""Training stage 2 (docs/domain.md, The GROK model): contrastive alignment of an image encoder with its biomarker
vector.

Entry points: `training.stage2.train.run(Stage2Config) -> Stage2Result` and the CLI
`python -m training.stage2 --help`.
"""
