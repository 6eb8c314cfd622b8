"""The ophthalmic vocabulary: the diagnostic labels (`labels`), the 37 biomarkers with units and ranges
(`biomarkers`), the names the model may use for them (`aliases`) and AMD's subtype as the estimates show it
(`subtypes`: one criterion for the narrative validator and the referral).

The lowest layer: imports nothing else from `grok_pacs`.
"""
