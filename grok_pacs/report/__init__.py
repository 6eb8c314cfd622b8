"""Report: the DICOM SR built from an analysis result (`sr`; its measurement groups in `sr_groups`), the
study's PDF report (`pdf`, wrapped as a DICOM Encapsulated PDF by `encapsulated`; patient/study header in
`study`), the idempotency keys and UIDs of both (`keys`), the coded concepts they use (`codes`), the SR's
safety content (`safety`: gradability, dispositions, probabilities), the disposition table
(`dispositions`), the plain-text rendering for people (`render`) and the clinician-verified copy of an
SR that a reviewer accepted or corrected (`verified`), and the IOCM rejection note that withdraws
results from the PACS (`rejection`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.analysis` (the result
and its checks). Never: `grok_pacs.analysis.engine`, `grok_pacs.analysis.onnx_session` (building a report
loads no model).
"""
