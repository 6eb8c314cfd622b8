"""The ophthalmic vocabulary: the diagnostic labels (`labels`), the 37 biomarkers with units and ranges
(`biomarkers`) and the names the model may use for them (`aliases`).

The lowest layer: imports nothing else from `grok_pacs`.
"""
