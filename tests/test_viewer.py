"""What a clinician sees: our results opened in a real viewer (OHIF) in a real browser (Debian chromium).

One study (CFP + OCT per eye) is stored into Orthanc (DICOMweb plugin on), sent to `grok-pacs serve` with
the tiny test bundle, analysed and delivered back by grok-pacs itself; then OHIF, served locally in front
of that Orthanc, opens the study in headless chromium. Screenshots land in the test's tmp dir (and in
$VIEWER_SCREENSHOT_DIR when it is set, e.g. `VIEWER_SCREENSHOT_DIR=docs/images`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from devtools.ports import free_port
from ophthalmic_dicom import Patient, make_cfp, make_oct, write
from orthanc import Orthanc
from viewer import TIMEOUT_MS, Browser, ohif_server, pixels
from devtools.processes import GrokProcess, grok_env, wait_until

GROK_AE = "GROK_PACS"
REPORT_DESCRIPTION = "GROK AI report"  # the SR series' description as the study browser shows it


class DeliveredStudy:
    """Orthanc holding a phantom study and what grok-pacs delivered into it."""

    def __init__(self, orthanc: Orthanc, patient: Patient, work_dir: Path) -> None:
        self.orthanc, self.patient, self.work_dir = orthanc, patient, work_dir

    def instances(self, modality: str) -> list[dict]:
        (study_id,) = self.orthanc.get("/studies")
        return [inst for s in self.orthanc.get(f"/studies/{study_id}/series")
                if s["MainDicomTags"].get("Modality") == modality
                for inst in self.orthanc.get(f"/series/{s['ID']}/instances")]


@pytest.fixture(scope="module")
def delivered(tmp_path_factory, tiny_bundle):
    """The study in Orthanc after grok-pacs delivered one SR per eye into it; grok-pacs is stopped after."""
    work = tmp_path_factory.mktemp("viewer")
    grok_port = free_port()
    orthanc = Orthanc(work / "orthanc", {"grok": (GROK_AE, "127.0.0.1", grok_port)}, dicomweb=True).start()
    settings = dict(data_dir=work / "grok", bundle=tiny_bundle, port=grok_port, bind_address="127.0.0.1",
                    ae_title=GROK_AE, allowed_aes="ORTHANC", quiet_period=1,
                    destination=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    serve = GrokProcess(["serve"], grok_env(**settings), work / "serve.log")
    try:
        serve.wait_ready("worker ready")
        patient = Patient()
        for ds in (make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L"), make_oct(patient, "L")):
            orthanc.upload(write(ds, work / "study" / f"{ds.SOPInstanceUID}.dcm"))
        (study_id,) = orthanc.get("/studies")
        orthanc.send_to_modality("grok", [study_id])
        study = DeliveredStudy(orthanc, patient, work)
        wait_until(lambda: len(study.instances("SR")) >= 2, 180, "one SR per eye in Orthanc", interval=0.5)
    except BaseException:
        orthanc.stop()
        raise
    finally:
        serve.stop()  # the viewer runs on the same two cores
    yield study
    orthanc.stop()


@pytest.fixture(scope="module")
def viewer(delivered):
    """OHIF served in front of the study's Orthanc."""
    server = ohif_server(delivered.orthanc.url, delivered.work_dir / "ohif.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(delivered, viewer):
    """Chromium with a fresh profile."""
    chromium = Browser(delivered.work_dir / "chromium-profile")
    yield chromium
    chromium.page.screenshot(path=str(delivered.work_dir / "viewer-last.png"))  # what it showed at the end
    chromium.close()


def thumbnail(page, modality: str):
    """The study browser's thumbnails of series with this modality (exact: OP is not OPT)."""
    label = page.locator('[data-cy="series-modality-label"]').get_by_text(modality, exact=True)
    return page.locator('[data-cy^="study-browser-thumbnail"]').filter(has=label)


def viewport(page):
    """The active viewport as the user sees it (RGB array)."""
    return pixels(page.locator('[data-cy="viewport-pane"]').screenshot())


def colour_fundus(page):
    """The viewport when it shows a fundus photograph in colour (orange retina: red well above blue)."""
    image = viewport(page)
    lit = image[image.sum(-1) > 90]
    drawn = len(lit) > 0.1 * image.shape[0] * image.shape[1]
    return image if drawn and lit[:, 0].mean() > lit[:, 2].mean() + 60 else None


def test_the_study_opens_with_its_images_and_our_report_listed(delivered, viewer, browser, tmp_path):
    page = browser.page
    # The study list (QIDO-RS through the proxy) shows the patient's study with our report's modality in it.
    page.goto(f"{viewer.url}/")
    row = page.locator("tr", has_text=delivered.patient.patient_id)
    modalities = row.get_by_text(re.compile(r"^[A-Z]+(\\[A-Z]+)+$"))  # the cell "SR\OP\OPT" (any order)
    expect(modalities).to_be_visible(timeout=TIMEOUT_MS)
    assert {"SR", "OP", "OPT"} <= set(modalities.inner_text().split("\\")), modalities.inner_text()
    browser.screenshot(tmp_path / "viewer-study-list.png")
    page.goto(viewer.study_url(delivered.patient.study_uid))
    # Both eyes' fundus photographs and OCT volumes are in the study browser, with our report beside them.
    thumbnail(page, "OPT").nth(1).wait_for()
    assert thumbnail(page, "OP").count() == 2 and thumbnail(page, "OPT").count() == 2
    reports = thumbnail(page, "SR")
    assert REPORT_DESCRIPTION in reports.first.inner_text(), reports.first.inner_text()
    # An OCT volume opens with all 8 B-scans, a retina drawn (not a black viewport).
    thumbnail(page, "OPT").first.dblclick()
    overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]')
    expect(overlay).to_have_text(re.compile(r"\b1/8\b"), timeout=TIMEOUT_MS)
    oct_view = viewport(page)
    assert oct_view.mean() > 10 and oct_view.std() > 20, (oct_view.mean(), oct_view.std())
    browser.screenshot(tmp_path / "viewer-oct.png")
    # A fundus photograph opens in colour (the overlay updates before the image's first paint: poll).
    thumbnail(page, "OP").first.dblclick()
    expect(overlay).to_have_text(re.compile(r"\b1/1\b"), timeout=TIMEOUT_MS)
    wait_until(lambda: colour_fundus(page) is not None, 60, "the fundus photograph drawn in colour", interval=1)
    browser.screenshot(tmp_path / "viewer-cfp.png")
    assert not [line for line in browser.console if line.startswith("pageerror")], browser.console
