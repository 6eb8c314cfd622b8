"""Development tools, not shipped in the runtime wheel: the demo (`demo`), synthetic DICOM builders
(`sample_dicom`), loopback ports (`ports`), required executables (`tools`), real peers as processes
(`processes`: redis-server, `grok-pacs` subprocesses; `storescp`: DCMTK as a destination PACS;
`seaweedfs`: SeaweedFS as an S3-compatible store; `postgres`: a PostgreSQL server) and the tiny
model bundle with its cache (`tiny_bundle`, `bundle_cache`), the OHIF viewer served in front of Orthanc
(`ohif_server`, its config in `ohif/`). Used by `make demo`, bench/ and tests/;
nothing in grok_pacs imports it. Not in the runtime wheel: installed from the checkout with the other
development packages (docs/CONTRIBUTING.md, Packages).

May import: `grok_pacs`, `export`, `training`.
"""
