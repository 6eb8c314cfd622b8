"""Cohort producers other than the phantom: `python -m training.cohort from-dicom` builds a manifest
(docs/cohort-manifest.md) from a PACS export of OP/OPT studies, a labels CSV and optional measurements;
`from-reviews` from the clinicians' reviews in grok-pacs' results register.

Modules: `scan` (headers of every file, classified), `pairing` (duplicates, CFP/OCT pairs per eye and visit),
`tables` (labels and measurements CSVs), `pseudonym` (salted subject ids), `from_dicom` (the whole build),
`report` (what was not used, and why), `fingerprint` (what a bundle records of its cohort),
`from_reviews` (reviewed eyes of the results register, with the clinician's label).
"""
