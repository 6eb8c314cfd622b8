"""Model export: trained parts in, a verified model bundle out (the runtime's only way to receive a model).

Owns the ONNX export of the image encoders (`onnx_export`), their parity check against torch (`parity`)
the bundle builder (`build_bundle`) and adding one file to a built bundle (`bundle_files`: what training's
later fits write); `python -m export` runs them. Not in the runtime wheel: installed
from the checkout with the other development packages (docs/CONTRIBUTING.md, Packages).

May import: `grok_pacs`.
"""
