"""Analyse: one eye's images in, one `result.Report` out.

Owns the model bundle (`bundle`), pixel reading (`imaging`), preprocessing shared with training
(`preprocess`), the gradability gate every image passes before any diagnosis (`quality`; its pixel
measures, `quality_measures`; its optional learned head on encoder features, `quality_head`), the
out-of-distribution check on encoder features (`ood`: an image unlike the training images), the ONNX
encoder sessions (`onnx_session`), the engine that runs encoders, heads and the language model (`engine`;
the language model's device and loading, `llm_loading`), each estimate's typical error (`estimate_error`),
batched generation and label scoring (`decoding`) under the guards of every generation (`guards`), the
validator every generation passes (`validation`), the second attempt at findings that failed it
(`rewrite`), parsing the generated text (`parsing`), tying its numbers to the estimates (`grounding`),
calibrated label probabilities (`label_calibration`) and which label a report states (`label_rule`).
`result` holds the typed result every later step reads.

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.model`, `grok_pacs.ops`.
Never: ingest, store, report, delivery, jobs, cli (nor `training` / `export`).
"""
