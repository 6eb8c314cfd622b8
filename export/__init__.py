"""Model export: trained parts in, a verified model bundle out (the runtime's only way to receive a model).

Owns the ONNX export of the image encoders (`onnx_export`), their parity check against torch (`parity`)
and the bundle builder (`build_bundle`); `python -m export` runs them. Not in the runtime wheel: installed
from the checkout with the other development packages (docs/CONTRIBUTING.md, Packages).

May import: `grok_pacs`.
"""
