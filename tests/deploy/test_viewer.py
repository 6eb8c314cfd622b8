"""What a clinician sees: our results opened in a real viewer (OHIF) in a real browser (Debian chromium).

One study (CFP + OCT per eye) is stored into Orthanc (DICOMweb plugin on), sent to `grok-pacs serve` with
the tiny test bundle, analysed and delivered back by grok-pacs itself; then OHIF, served locally in front
of that Orthanc, opens the study in headless chromium. Screenshots land in the test's tmp dir (and in
$VIEWER_SCREENSHOT_DIR when it is set, e.g. `VIEWER_SCREENSHOT_DIR=docs/images`).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
import pypdf
import pytest
from playwright.sync_api import expect
from pydicom.dataset import Dataset

from devtools.ports import free_port
from devtools.processes import wait_until
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write
from tests.helpers.orthanc import Orthanc, serve_for
from tests.helpers.viewer import TIMEOUT_MS, Browser, ohif_server, pixels, screen_text

GROK_AE = "GROK_PACS"
REPORT_DESCRIPTION = "GROK AI report"  # the SR series' description as the study browser shows it


class DeliveredStudy:
    """Orthanc holding a phantom study and what grok-pacs delivered into it."""

    def __init__(self, orthanc: Orthanc, patient: Patient, work_dir: Path) -> None:
        self.orthanc, self.patient, self.work_dir = orthanc, patient, work_dir

    def instances(self, modality: str, description: str = "") -> list[dict]:
        """Orthanc's instances of this modality in series whose description contains `description`."""
        (study_id,) = self.orthanc.get("/studies")
        return [
            inst
            for s in self.orthanc.get(f"/studies/{study_id}/series")
            if s["MainDicomTags"].get("Modality") == modality
            and description in s["MainDicomTags"].get("SeriesDescription", "")
            for inst in self.orthanc.get(f"/series/{s['ID']}/instances")
        ]

    def dataset(self, modality: str, description: str = "") -> Dataset:
        """The one instance of this modality (and series description) as stored in Orthanc."""
        (instance,) = self.instances(modality, description)
        return pydicom.dcmread(io.BytesIO(self.orthanc.file(instance["ID"])))


@pytest.fixture(scope="module")
def delivered(tmp_path_factory, tiny_bundle):
    """The study in Orthanc after grok-pacs delivered one SR per eye into it; grok-pacs is stopped after."""
    work = tmp_path_factory.mktemp("viewer")
    grok_port = free_port()
    orthanc = Orthanc(work / "orthanc", {"grok": (GROK_AE, "127.0.0.1", grok_port)}, dicomweb=True).start()
    serve = serve_for(orthanc, work, tiny_bundle, grok_port, GROK_AE)
    try:
        serve.wait_ready("worker ready")
        patient = Patient()
        for ds in (make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L"), make_oct(patient, "L")):
            orthanc.upload(write(ds, work / "study" / f"{ds.SOPInstanceUID}.dcm"))
        (study_id,) = orthanc.get("/studies")
        orthanc.send_to_modality("grok", [study_id])
        study = DeliveredStudy(orthanc, patient, work)
        wait_until(
            lambda: len(study.instances("SR")) >= 2 and study.instances("DOC"),
            180,
            "one SR per eye and the PDF report in Orthanc",
            interval=0.5,
        )
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
    chromium.close()


@pytest.fixture
def page(browser, delivered, request):
    """A fresh tab for one test; what it showed at the end is kept beside the study's work files."""
    tab = browser.open_tab()
    yield tab
    tab.screenshot(path=str(delivered.work_dir / f"last-{request.node.name}.png"))
    tab.close()


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


def test_the_study_opens_with_its_images_and_our_report_listed(delivered, viewer, browser, page, tmp_path):
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


def pdf_lines(document: Dataset) -> list[str]:
    """The text lines of an Encapsulated PDF instance."""
    reader = pypdf.PdfReader(io.BytesIO(document.EncapsulatedDocument))
    return [line.strip() for page in reader.pages for line in page.extract_text().splitlines()]


def test_the_pdf_report_shows_the_disposition_and_diagnosis(delivered, viewer, browser, page, tmp_path):
    # What the report says, read from the PDF grok-pacs delivered (pypdf), e.g. "Refer to ophthalmology:
    # glaucoma suspicion [...]" after the patient-level heading and "Glaucoma (model score ...)" after "Diagnosis".
    lines = pdf_lines(delivered.dataset("DOC"))
    disposition = lines[lines.index("Patient-level disposition") + 1].split(" [")[0]
    diagnosis = lines[lines.index("Diagnosis") + 1].split(" (")[0]
    page.goto(viewer.study_url(delivered.patient.study_uid))
    thumbnail(page, "DOC").first.dblclick()
    page.locator('object[type="application/pdf"]').wait_for()
    pane = page.locator('[data-cy="viewport-pane"]')

    # What the clinician reads on screen (OCR of the browser's PDF viewer inside OHIF's viewport). The
    # browser draws the PDF in tiles, so one screenshot may hold the headings but not yet every line: read
    # again until every expected line is there (or the time is up, then show the last reading in full).
    expected = ["UNVERIFIED", "AI-generated", f"Patient-level disposition {disposition}", f"Diagnosis {diagnosis}"]
    readings: list[str] = []

    def drawn_report() -> bool:
        readings.append(screen_text(pane.screenshot(), tmp_path).replace("Al-", "AI-"))  # OCR reads AI as Al
        return all(line in readings[-1] for line in expected)

    try:
        wait_until(drawn_report, 120, "the PDF report drawn in the viewer", interval=1)
    except AssertionError:
        pass  # timed out: the assertion below names what was never read, with the last reading in full
    browser.screenshot(tmp_path / "viewer-pdf-report.png")
    missing = [line for line in expected if line not in readings[-1]]
    assert not missing, (missing, readings[-1])


def content_items(item: Dataset):
    """Every content item under `item`, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from content_items(child)


def sr_measurements(sr: Dataset) -> dict[str, float]:
    """Every NUM of an SR: concept name -> value."""
    return {
        item.ConceptNameCodeSequence[0].CodeMeaning: float(item.MeasuredValueSequence[0].NumericValue)
        for item in content_items(sr)
        if item.ValueType == "NUM"
    }


def sr_diagnosis(sr: Dataset) -> str:
    """The SR's coded diagnosis (its meaning), e.g. "Glaucoma" or "Indeterminate"."""
    (meaning,) = [
        item.ConceptCodeSequence[0].CodeMeaning
        for item in content_items(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Diagnosis"
    ]
    return meaning


def shown_measurements(page) -> dict[str, float]:
    """The measurement labels OHIF draws on the viewport ("name: value unit", one SVG tspan per line)."""
    labels = page.locator('[data-cy="viewport-pane"] svg tspan').filter(has_text=re.compile(r": [-\d.]+ \S+$"))
    shown = {}
    for label in labels.all_text_contents():  # SVG has no innerText
        name, value = label.rsplit(": ", 1)
        shown[name] = float(value.split()[0])
    return shown


def open_sr(page, study_url: str, series_text: str, attempts: int = 3) -> dict[str, float]:
    """Open the study, double-click the SR series, and return the measurements OHIF draws from it.

    OHIF 3.13.2 sometimes opens an SR on the right image and draws nothing (seen 1 time in 8 with the same
    SR, the other 7 drawn within 3 s; moving the mouse does not help, reloading does): like a clinician,
    the test reloads and opens it again, at most `attempts` times; an SR that never draws still fails.
    """
    for _ in range(attempts):
        page.goto(study_url)
        thumbnail(page, "SR").filter(has_text=series_text).dblclick()
        try:
            return wait_until(lambda: shown_measurements(page), 30, f"measurements drawn from the {series_text} SR")
        except AssertionError as missing:
            failure = missing
    raise failure


@pytest.mark.parametrize("eye", ["right", "left"])
def test_each_eye_s_sr_opens_on_its_oct_b_scan_with_diagnosis_and_measurements(
    delivered, viewer, browser, page, tmp_path, eye
):
    sr = delivered.dataset("SR", f"{eye} eye")  # each eye's SR in its own series: neither hides the other
    measurements = sr_measurements(sr)
    diagnosis = sr_diagnosis(sr)
    frame = next(int(e.value) for e in sr.iterall() if e.keyword == "ReferencedFrameNumber")
    # OHIF's SR viewport opens the B-scan the report used and draws this SR's measurements beside its point.
    shown = open_sr(page, viewer.study_url(delivered.patient.study_uid), f"{eye} eye")
    expect(page.locator('[data-cy="viewport-overlay-bottom-right"]')).to_contain_text(f"({frame}/")
    assert set(shown) <= set(measurements), (shown, sorted(measurements))
    assert all(abs(shown[name] - measurements[name]) < 0.01 for name in shown), (shown, measurements)
    # The diagnosis, drawn as its score ("Probability of Glaucoma (AI): 87 %"; Indeterminate names no label),
    # and at least one biomarker measurement beside it.
    assert [name for name in shown if diagnosis in name and name.endswith(("(AI)", "probability", "score"))], (
        diagnosis,
        shown,
    )
    assert [name for name in shown if "(AI)" not in name], shown
    browser.screenshot(tmp_path / f"viewer-sr-{eye}-eye.png")
