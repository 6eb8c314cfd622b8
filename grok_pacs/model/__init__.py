"""The GROK model definition shared by training (stages 2, 3), export and the runtime.

May import: `grok_pacs.config`, `grok_pacs.domain`.
"""
