"""Report: the DICOM SR built from an analysis result (`sr`), the coded concepts it uses (`codes`) and
the plain-text rendering of an SR for people (`render`).

May import: `grok_pacs.config`, `grok_pacs.domain`, `grok_pacs.dicom`, `grok_pacs.analysis` (the result
and its checks; never `analysis.engine` or `analysis.onnx_session`: building a report loads no model).
"""
