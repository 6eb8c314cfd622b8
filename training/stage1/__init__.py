"""Training stage 1 (docs/domain.md, The GROK model): cohort manifest -> knowledge-guided instruction records.

`run` (each eye's report from a teacher, validated; instructions.jsonl, rejected.jsonl, stage1.json) and the
teachers that write the reports (`teachers`: the deterministic guideline teacher and an OpenAI-compatible
chat model, with the Eye-Guideline knowledge they share). Run it with `python -m training.stage1 --help`.
"""
