"""Full round trip with Orthanc as the hospital PACS and `grok-pacs serve` as the one-box service.

A study (right eye CFP + OCT, left eye CFP) is stored into Orthanc; Orthanc sends it to grok-pacs through
its REST API (/modalities/grok/store); grok-pacs analyses it on its embedded broker and C-STOREs one SR
per eye back; the SRs appear in Orthanc in the same study (same patient), checked through the REST API,
and each passes dciodvfy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom

from devtools.ports import free_port
from devtools.processes import wait_until
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write
from tests.helpers.orthanc import Orthanc, serve_for
from tests.helpers.srcheck import assert_valid_sr, dciodvfy_errors, pdf_text, sr_eye

GROK_AE = "GROK_PACS"


def test_study_from_orthanc_comes_back_with_srs_in_the_same_study(tmp_path, tiny_bundle):
    grok_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"grok": (GROK_AE, "127.0.0.1", grok_port)})
    orthanc.start()
    serve = serve_for(orthanc, tmp_path, tiny_bundle, grok_port, GROK_AE)
    try:
        serve.wait_ready("worker ready")
        patient = Patient()
        datasets = [make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L")]
        for ds in datasets:
            orthanc.upload(write(ds, tmp_path / "study" / f"{ds.SOPInstanceUID}.dcm"))
        (study_id,) = orthanc.get("/studies")
        orthanc.send_to_modality("grok", [study_id])

        def sr_instances() -> list[dict]:
            series = orthanc.get(f"/studies/{study_id}/series")
            return [
                inst
                for s in series
                if s["MainDicomTags"].get("Modality") == "SR"
                for inst in orthanc.get(f"/series/{s['ID']}/instances")
            ]

        def all_results() -> bool:  # two SRs and the PDF report (delivered after the SRs)
            return len(sr_instances()) >= 2 and len(orthanc.get(f"/studies/{study_id}")["Series"]) >= 6

        wait_until(all_results, 180, "two SRs and the PDF in Orthanc", interval=0.5)
        srs = sr_instances()
        assert orthanc.get("/studies") == [study_id]  # no new study: the SRs filed into the original one
        study = orthanc.get(f"/studies/{study_id}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == patient.study_uid
        assert study["PatientMainDicomTags"]["PatientID"] == patient.patient_id
        # CFP R, OCT R, CFP L, one SR series per eye (OHIF opens only the last SR of a series) and the PDF
        # report's series, dated (Orthanc Explorer files an undated series under "?").
        assert len(study["Series"]) == 6
        (pdf_series,) = [
            s for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"]["Modality"] == "DOC"
        ]
        (pdf_id,) = pdf_series["Instances"]
        assert pdf_series["MainDicomTags"].get("SeriesDate")
        pdf_path = tmp_path / "report.dcm"
        pdf_path.write_bytes(orthanc.file(pdf_id))
        assert dciodvfy_errors(pdf_path) == []
        text = pdf_text(pydicom.dcmread(pdf_path).EncapsulatedDocument)
        assert "Right eye (OD)" in text and "Left eye (OS)" in text and "Glaucoma" in text
        sr_series = [s for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"]["Modality"] == "SR"]
        assert len(sr_series) == 2 and all(len(s["Instances"]) == 1 for s in sr_series)
        assert all(s["MainDicomTags"].get("SeriesDate") for s in sr_series)
        laterality_texts = set()
        for inst in srs:
            path = tmp_path / f"{inst['ID']}.dcm"
            path.write_bytes(orthanc.file(inst["ID"]))
            assert_valid_sr(path, "Glaucoma", "must be reviewed by a clinician")
            sr = pydicom.dcmread(path)
            assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
            laterality_texts.add(sr_eye(sr))
        assert laterality_texts == {"R", "L"}
        studies = subprocess.run(
            [sys.executable, "-m", "grok_pacs.cli", "studies", "--json"],
            env=serve.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        (row,) = json.loads(studies.stdout)
        assert row["study_uid"] == patient.study_uid and row["state"] == "DONE"
        assert "2 SR(s) and the PDF report delivered to ORTHANC@" in row["detail"]
    finally:
        serve.stop()
        orthanc.stop()
    assert serve.proc.returncode == 0, serve.log()[-3000:]
