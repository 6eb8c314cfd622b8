"""The PDF report's cost per study: what it adds between analysis and the SRs' delivery.

A two-eye study at clinical sizes (CFP 2048 x 1536 RGB, OCT B-scan 1024 x 496 of a 49-frame volume) with
all 37 biomarkers per eye: build the PDF (reportlab, JPEG thumbnails, embedded fonts) and its DICOM
Encapsulated PDF, then write it as the worker does. Not included: reading the two images again from
`incoming/` (the worker re-decodes the CFP and the OCT volume used, for the PDF and the SR's foveal point). Images
are smooth synthetic pictures (not noise, which
no camera produces and which would inflate JPEG sizes). Medians of several runs; writes
bench/results/pdf_report.json.

  python -m bench.pdf_report [--runs 7]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from devtools.sample_dicom import Patient, base_dataset
from grok_pacs.analysis.result import BiomarkerEstimate, Eye, Report, SourceImage
from grok_pacs.dicom.sop_classes import OP_8BIT, OPT
from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import Label
from grok_pacs.report.encapsulated import build_encapsulated_pdf
from grok_pacs.report.keys import ReportKey
from grok_pacs.report.pdf import ReportImages, build_pdf
from grok_pacs.report.study import StudyHeader

ROOT = Path(__file__).resolve().parents[1]


def _report(eye: Eye) -> Report:
    sources = (
        SourceImage(OP_8BIT, f"2.25.{1 + (eye is Eye.LEFT)}1", "2.25.9"),
        SourceImage(OPT, f"2.25.{1 + (eye is Eye.LEFT)}2", "2.25.9", 25),
    )
    return Report(
        eye=eye,
        label=Label.GLAUCOMA,
        narrative="The cup-to-disc ratio is 0.72. " * 6,
        impression="Findings are consistent with Glaucoma.",
        raw_text="",
        label_scores={"Glaucoma": 0.8},
        biomarkers=tuple(BiomarkerEstimate(b.key, sum(b.normal) / 2, b.unit) for b in BIOMARKERS),
        cited_numbers=(),
        missing_modalities=(),
        sources=sources,
        oct_frame_index=24,
        oct_frame_method="fovea",
        bundle_name="bench",
        bundle_version="1",
    )


def _images() -> ReportImages:
    yy, xx = np.mgrid[0:1536, 0:2048]
    fundus = 200 * np.exp(-((xx - 1024) ** 2 + (yy - 768) ** 2) / 4e5)
    cfp = np.stack([fundus, fundus * 0.5, fundus * 0.2], axis=-1).astype(np.uint8)
    rows = np.arange(496)[:, None] + np.zeros((1, 1024))
    bscan = (((rows > 150) & (rows < 330)) * 160 + 20).astype(np.uint8)
    return ReportImages(cfp=cfp, oct_bscan=bscan, oct_frames=49, oct_pit=(512.0, 150.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    patient = Patient()
    header_ds = base_dataset(patient, OP_8BIT, "OP", "2.25.9")  # the study's header, as any image carries it
    header = StudyHeader.from_dataset(header_ds, software="bench", made_at="now")
    reports = {eye: _report(eye) for eye in Eye}
    images = {eye: _images() for eye in Eye}
    key = ReportKey(patient.study_uid, 1, "1")
    sources = [s for r in reports.values() for s in r.sources]
    pdf_s, dicom_s, sizes = [], [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        pdf = build_pdf(header, reports, images)
        built = time.perf_counter()
        buffer = io.BytesIO()
        build_encapsulated_pdf(pdf, header_ds, sources, key, software_version="bench").save_as(
            buffer, enforce_file_format=True
        )
        pdf_s.append(built - start)
        dicom_s.append(time.perf_counter() - built)
        sizes.append(len(buffer.getvalue()))
    result = {
        "runs": args.runs,
        "pdf_build_s_median": statistics.median(pdf_s),
        "dicom_wrap_s_median": statistics.median(dicom_s),
        "total_s_median": statistics.median(p + d for p, d in zip(pdf_s, dicom_s)),
        "dicom_bytes": sizes[-1],
        "study": "2 eyes, CFP 2048x1536, OCT B-scan 1024x496, 37 biomarkers each",
        "machine": "shared 2-core CPU (other engineers' jobs running: figures are upper bounds)",
    }
    out = ROOT / "bench" / "results" / "pdf_report.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
