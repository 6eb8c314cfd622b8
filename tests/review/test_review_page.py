"""The review page end to end: DCMTK storescu -> `grok-pacs serve` (tiny bundle, review_port set) -> DCMTK storescp
as the PACS, and a clinician in headless chromium (Playwright). They log in, open the worklist, accept the right
eye's result in two clicks (worklist row, Accept) and reject the left eye's; the PACS receives one verified SR
(VERIFIED, the AI SR as its predecessor) and one rejection note, each exactly once. A review without a session,
or without the CSRF token, is refused; the login and the reviews are in the audit trail."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from contextlib import contextmanager

import pydicom
import pytest

from devtools.ports import free_port
from devtools.processes import GrokProcess, grok_env, wait_until
from devtools.storescp import StoreSCP
from grok_pacs.store.register import ResultRegister, ResultState
from tests.helpers.ingest_support import storescu
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct, write
from tests.helpers.orthanc import Orthanc
from tests.helpers.viewer import Browser

PASSWORD = "correct horse battery"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _add_reviewer(env: dict[str, str], tmp_path, name: str, role: str) -> None:
    secret = tmp_path / f"{name}.password"
    secret.write_text(PASSWORD + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grok_pacs.cli",
            "reviewer",
            "add",
            name,
            "--role",
            role,
            "--password-file",
            str(secret),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"reviewer {name}: role {role}"


def _section(sr_uid: str) -> str:
    return f'section[id="result-{sr_uid}"]'


@contextmanager
def running_site(tmp_path, bundle, destination: str):
    """`grok-pacs serve` with the review page and a reviewer account, delivering to `destination`, after a
    two-eye study went through it (both results delivered); yields (browser, page URL, register, patient)."""
    review_port = free_port()
    settings = dict(
        data_dir=tmp_path / "grok",
        bundle=bundle,
        port=free_port(),
        bind_address="127.0.0.1",
        quiet_period=1,
        destination=destination,
        review_port=review_port,
        review_secret_key="k" * 40,
        review_organization="Eye Clinic North",
        review_cookie_secure=False,  # plain HTTP on loopback in this test
        audit_syslog=f"file:{tmp_path / 'audit.log'}",
    )
    env = grok_env(**settings)
    _add_reviewer(env, tmp_path, "meredith", "reviewer")
    serve = GrokProcess(["serve"], env, tmp_path / "serve.log")
    browser = None
    try:
        serve.wait_ready("worker ready")
        patient = Patient(patient_id="REVIEW-E2E")
        files = [
            write(ds, tmp_path / "send" / f"{i}.dcm")
            for i, ds in enumerate([make_cfp(patient, "R"), make_oct(patient, "R"), make_cfp(patient, "L")])
        ]
        sent = storescu(settings["port"], *files, calling="MODALITY", timeout=120)
        assert sent.returncode == 0, sent.stderr
        register = ResultRegister(settings["data_dir"] / "index.sqlite")
        delivered = lambda: [r for r in register.for_study(patient.study_uid) if r.state is ResultState.DELIVERED]  # noqa: E731
        wait_until(lambda: len(delivered()) == 2, 240, "both eyes' results delivered", interval=0.5)
        browser = Browser(tmp_path / "profile")
        yield browser, f"http://127.0.0.1:{review_port}", register, patient
    finally:
        if browser is not None:
            browser.close()
        serve.stop()
    assert serve.proc.returncode == 0, serve.log()[-3000:]


@pytest.fixture
def site(tmp_path, tiny_bundle):
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    try:
        with running_site(tmp_path, tiny_bundle, f"PACS@127.0.0.1:{pacs.port}") as (browser, url, register, patient):
            yield browser, url, pacs, register, patient, tmp_path
    finally:
        pacs.stop()


def _log_in(page, url: str) -> None:
    page.goto(f"{url}/worklist")  # not logged in: the login page
    page.fill("input[name=username]", "meredith")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/worklist")


def _accept(page, sr_uid: str) -> int:
    """Accept the result from the worklist, as a clinician would; returns the clicks it took."""
    clicks = 0
    page.click(f'tr[data-sr="{sr_uid}"] a')  # the worklist row's study
    clicks += 1
    page.click(f"{_section(sr_uid)} button.accept")
    clicks += 1
    page.wait_for_selector("p.flash-ok")
    assert "verified SR is on its way" in page.inner_text("p.flash-ok")
    return clicks


def test_a_clinician_accepts_and_rejects_results_that_reach_the_pacs_once(site):
    browser, url, pacs, register, patient, tmp_path = site
    page = browser.open_tab()
    _log_in(page, url)
    assert "Results awaiting review (2)" in page.inner_text("h1")
    right, left = sorted(register.for_study(patient.study_uid), key=lambda r: r.eye, reverse=True)
    assert _accept(page, right.sr_uid) <= 3
    assert "REVIEW-E2E" in page.inner_text("main")  # the study page names the patient
    # ... and shows the images the model used (3: the right eye's CFP and OCT, the left's CFP) and the PDF.
    page.wait_for_function("[...document.querySelectorAll('.images img')].every(i => i.complete && i.naturalWidth)")
    assert page.locator(".images img").count() == 3
    pdf = page.request.get(url + page.get_attribute("iframe.pdf", "src"))
    assert pdf.status == 200 and pdf.headers["content-type"] == "application/pdf" and pdf.body()[:5] == b"%PDF-"

    def verified():
        return [ds for ds in pacs.received_srs() if ds.get("VerificationFlag") == "VERIFIED"]

    wait_until(lambda: verified(), 120, "the verified SR at the PACS", interval=0.5)
    vsr = verified()[0]
    assert str(vsr.VerifyingObserverSequence[0].VerifyingObserverName) == "meredith"
    assert vsr.VerifyingObserverSequence[0].VerifyingOrganization == "Eye Clinic North"
    predecessor = vsr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == right.sr_uid

    left_section = _section(left.sr_uid)
    page.select_option(f"{left_section} select[name=reason]", "quality")
    page.fill(f"{left_section} form:has(input[value=reject]) input[name=note]", "not this patient's eye")
    page.click(f"{left_section} form:has(input[value=reject]) button")
    page.wait_for_selector("p.flash-ok")

    def notes():
        return [ds for ds in pacs.received() if ds.SOPClassUID == KOS]

    wait_until(lambda: notes(), 120, "the rejection note at the PACS", interval=0.5)
    evidence = notes()[0].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == left.sr_uid
    assert {r.eye: r.review_outcome for r in register.for_study(patient.study_uid)} == {
        "R": "ACCEPTED",
        "L": "REJECTED",
    }

    # Refused: a POST without a session, and one with the session but without the CSRF token.
    anonymous = browser._playwright.request.new_context()  # its own cookies: a session, but no login
    token = re.search(r'name="csrf_token" value="([^"]+)"', anonymous.get(f"{url}/login").text()).group(1)
    refused = anonymous.post(f"{url}/result/{left.sr_uid}/review", form={"action": "accept", "csrf_token": token})
    assert refused.status == 403
    anonymous.dispose()
    assert page.request.post(f"{url}/result/{left.sr_uid}/review", form={"action": "accept"}).status == 400
    page.goto(f"{url}/worklist")
    assert "Nothing awaits review" in page.inner_text("main")

    received = pacs.received_sop_uids()
    assert received.count(vsr.SOPInstanceUID) == 1 and received.count(notes()[0].SOPInstanceUID) == 1
    audit = (tmp_path / "audit.log").read_text()
    assert "110122" in audit and f"ACCEPTED {right.sr_uid}" in audit and f"REJECTED {left.sr_uid}" in audit


def test_the_verified_sr_reaches_orthanc(tmp_path, tiny_bundle):
    """The same accept, with Orthanc as the PACS: it stores the verified SR in the study, beside the AI SR."""
    orthanc = Orthanc(tmp_path / "orthanc", {"grok": ("GROK_PACS", "127.0.0.1", free_port())}).start()
    try:
        with running_site(tmp_path, tiny_bundle, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}") as site:
            browser, url, register, patient = site
            page = browser.open_tab()
            _log_in(page, url)
            right = next(r for r in register.for_study(patient.study_uid) if r.eye == "R")
            _accept(page, right.sr_uid)
            verified_uid = register.get(right.sr_uid).verified_uid

            def stored() -> list[dict]:
                answer = orthanc.http.post("/tools/lookup", content=verified_uid)
                answer.raise_for_status()
                return [found for found in answer.json() if found["Type"] == "Instance"]

            wait_until(stored, 120, "the verified SR in Orthanc", interval=0.5)
            vsr = pydicom.dcmread(io.BytesIO(orthanc.file(stored()[0]["ID"])))
            assert vsr.VerificationFlag == "VERIFIED" and vsr.StudyInstanceUID == patient.study_uid
            predecessor = vsr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert predecessor.ReferencedSOPInstanceUID == right.sr_uid
            assert len(orthanc.get("/studies")) == 1  # filed into the patient's study, no new one
    finally:
        orthanc.stop()
