"""Phantom cohort: synthetic subjects whose CFP and OCT images are rendered from their biomarkers.

Synthetic data for building, testing and demonstrating every training stage; never clinical data.
`generate_cohort(out_dir, n_subjects, seed)` writes the images (PNG, and DICOM OP/OPT studies) and a
manifest (docs/cohort-manifest.md) and returns the manifest's path. CLI: `python -m training.phantom`.
Each subject is acquired on a device (`devices`: exposure, colour, blur, resolution, noise, JPEG,
B-scan spacing); `reference` renders what the generator always rendered, a held-out device only an
all-test evaluation cohort.
"""

from training.phantom.cohort import generate_cohort, plan_cohort

__all__ = ["generate_cohort", "plan_cohort"]
