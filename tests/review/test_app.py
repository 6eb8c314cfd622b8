"""The review page's application against a real database and real result files (Flask's test client in place of
the browser, which tests/review/test_review_page.py drives against `grok-pacs serve`): accept, correct and reject
queue the right instance once, with the verdict in the register and the audit trail; the worklist filters and
pages; no review without the role, the session or the CSRF token."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest

from grok_pacs.analysis.result import Eye
from grok_pacs.config import SettingsError, load_settings
from grok_pacs.delivery.sender import write_result
from grok_pacs.domain.labels import Label
from grok_pacs.ops import audit
from grok_pacs.report.sr import SRKey, build_sr
from grok_pacs.report.verified import Verification, verified_uid
from grok_pacs.review.accounts import Accounts, Role
from grok_pacs.review.actions import Reviews
from grok_pacs.review.app import create_app
from grok_pacs.store import db
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.outbox import Outbox, OutboxRow, ResultKind
from grok_pacs.store.register import ResultRecord, ResultRegister, ResultState, ReviewOutcome
from tests.helpers.ophthalmic_dicom import Patient, make_cfp, make_oct
from tests.report.test_sr import _report, _source

PASSWORD = "correct horse battery"
SECRET = "s" * 40


@pytest.fixture
def site(tmp_path):
    """A data directory with two delivered AI results (right eye Glaucoma, left eye AMD) of one study."""
    settings = load_settings(
        data_dir=tmp_path / "data",
        review_port=8080,
        review_secret_key=SECRET,
        review_organization="Eye Clinic North",
        review_cookie_secure=False,
        audit_syslog=f"file:{tmp_path / 'audit.log'}",
    )
    audit.configure(settings)
    engine = db.open_engine(settings.resolved_database_url)
    patient = Patient(patient_id="REVIEW-1")
    register, outbox, records = ResultRegister(engine), Outbox(engine), []
    for eye, label in ((Eye.RIGHT, Label.GLAUCOMA), (Eye.LEFT, Label.AMD)):
        cfp, oct_ds = make_cfp(patient, eye.value), make_oct(patient, eye.value)
        key = SRKey(patient.study_uid, 1, "0.1.0", eye)
        sr = build_sr(_report(eye, label, [_source(cfp), _source(oct_ds, frame=4)]), [cfp, oct_ds], key)
        path = str(write_result(settings.data_dir, sr))
        outbox.put_many([OutboxRow(key.sop_instance_uid, patient.study_uid, 1, "0.1.0", eye.value, path)])
        records.append(
            ResultRecord(
                key.sop_instance_uid,
                patient.study_uid,
                1,
                "0.1.0",
                eye.value,
                label.value,
                0.8,
                "Routine follow-up",
                "gradable",
                "",
                str(cfp.SOPInstanceUID),
                str(oct_ds.SOPInstanceUID),
            )
        )
    register.add_many(records)
    for record in records:
        register.mark_delivered(record.sr_uid, 1.0e9)
    accounts = Accounts(engine)
    accounts.set("meredith", PASSWORD, Role.REVIEWER, "Grey^Meredith")
    accounts.set("trainee", PASSWORD, Role.VIEWER)
    sent: list[str] = []
    reviews = Reviews(settings, engine, None, sent.append)
    app = create_app(settings, reviews, accounts, StudyIndex(engine))
    yield app, reviews, records, sent, tmp_path / "audit.log"
    audit.configure(load_settings(data_dir=tmp_path / "data"))
    engine.dispose()


def _token(page: bytes) -> str:
    return re.search(rb'name="csrf_token" value="([^"]+)"', page).group(1).decode()


def _login(client, username: str) -> str:
    token = _token(client.get("/login").data)
    answer = client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": token})
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/worklist")
    return _token(client.get("/worklist").data)  # the login started a new session, with its own token


def test_accept_queues_one_verified_sr_and_records_the_review(site):
    app, reviews, records, sent, audit_log = site
    client = app.test_client()
    assert client.get("/worklist").status_code == 302  # not logged in: to the login page
    _login(client, "meredith")
    worklist = client.get("/worklist").data.decode()
    assert "Results awaiting review <small>(2)" in worklist and "Glaucoma" in worklist and "AMD" in worklist
    study = client.get(f"/study/{records[0].study_uid}")
    page = study.data.decode()
    assert "REVIEW-1" in page and page.count('class="accept"') == 2
    token = _token(study.data)
    answer = client.post(f"/result/{records[0].sr_uid}/review", data={"action": "accept", "csrf_token": token})
    assert answer.status_code == 302
    reviewed = reviews.register.get(records[0].sr_uid)
    assert (reviewed.state, reviewed.review_outcome, reviewed.reviewer) == (
        ResultState.REVIEWED,
        "ACCEPTED",
        "meredith",
    )
    assert sent == [reviewed.verified_uid]
    entry = reviews.outbox.get(reviewed.verified_uid)
    assert entry.kind is ResultKind.VSR and entry.eye == "R"
    vsr = pydicom.dcmread(Path(reviews.settings.data_dir) / entry.path)
    assert (
        vsr.VerificationFlag == "VERIFIED"
        and str(vsr.VerifyingObserverSequence[0].VerifyingObserverName) == "Grey^Meredith"
    )
    assert (
        vsr.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == records[0].sr_uid
    )
    # The same click again (a double submit) queues nothing more: the result is no longer awaiting review.
    client.post(f"/result/{records[0].sr_uid}/review", data={"action": "accept", "csrf_token": token})
    assert sent == [reviewed.verified_uid]
    assert "Results awaiting review <small>(1)" in client.get("/worklist").data.decode()
    log = audit_log.read_text()
    assert "110114" in log and f"ACCEPTED {records[0].sr_uid}" in log


def test_correct_and_reject(site):
    app, reviews, records, sent, _ = site
    client = app.test_client()
    token = _login(client, "meredith")
    client.post(
        f"/result/{records[0].sr_uid}/review",
        data={"action": "correct", "label": "Normal", "note": "physiological cupping", "csrf_token": token},
    )
    corrected = reviews.register.get(records[0].sr_uid)
    assert (corrected.review_outcome, corrected.reviewed_label) == ("CORRECTED", "Normal")
    client.post(
        f"/result/{records[1].sr_uid}/review",
        data={"action": "reject", "reason": "safety", "note": "wrong eye", "csrf_token": token},
    )
    rejected = reviews.register.get(records[1].sr_uid)
    assert rejected.review_outcome == "REJECTED" and rejected.review_note == "[safety] wrong eye"
    note = reviews.outbox.get(rejected.rejection_uid)
    assert note.kind is ResultKind.KOS
    kos = pydicom.dcmread(Path(reviews.settings.data_dir) / note.path)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113037"
    assert (
        kos.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == records[1].sr_uid
    )
    assert sent == [corrected.verified_uid, rejected.rejection_uid]


def test_no_review_without_role_session_or_csrf_token(site):
    app, reviews, records, sent, audit_log = site
    anonymous = app.test_client()
    token = _token(anonymous.get("/login").data)
    assert (
        anonymous.post(
            f"/result/{records[0].sr_uid}/review", data={"action": "accept", "csrf_token": token}
        ).status_code
        == 403
    )
    trainee = app.test_client()
    token = _login(trainee, "trainee")
    assert 'class="accept"' not in trainee.get(f"/study/{records[0].study_uid}").data.decode()
    assert (
        trainee.post(f"/result/{records[0].sr_uid}/review", data={"action": "accept", "csrf_token": token}).status_code
        == 403
    )
    reviewer = app.test_client()
    _login(reviewer, "meredith")
    assert reviewer.post(f"/result/{records[0].sr_uid}/review", data={"action": "accept"}).status_code == 400
    assert sent == [] and reviews.register.get(records[0].sr_uid).state is ResultState.DELIVERED
    wrong = app.test_client()
    token = _token(wrong.get("/login").data)
    assert (
        wrong.post("/login", data={"username": "meredith", "password": "nope", "csrf_token": token}).status_code == 302
    )
    assert "Wrong user name or password" in wrong.get("/login").data.decode()
    log = audit_log.read_text()
    assert log.count("110132") == 3 and "CSRF" in log  # no session, no role, no CSRF token
    assert re.search(r'EventOutcomeIndicator="4".*110122', log)  # the failed login


def test_worklist_filters_and_pages(site):
    app, _, records, _, _ = site
    client = app.test_client()
    _login(client, "meredith")
    only_amd = client.get("/worklist?label=AMD").data.decode()
    assert "(1)" in only_amd and records[1].study_uid[-16:] in only_amd
    assert "Nothing awaits review" in client.get("/worklist?min_p=0.9").data.decode()
    assert (
        client.get(f"/study/{records[0].study_uid}/image/{records[0].cfp_uid}.png").status_code == 404
    )  # not stored here


def test_the_page_needs_a_secret_key_and_an_organisation(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="review_secret_key"):
        load_settings(data_dir=tmp_path, review_port=8080, review_organization="Clinic")
    with pytest.raises(SettingsError, match="review_organization"):
        load_settings(data_dir=tmp_path, review_port=8080, review_secret_key=SECRET)
    with pytest.raises(SettingsError, match="header name"):
        load_settings(data_dir=tmp_path, review_trusted_user_header="X User")
    secret = tmp_path / "key"
    secret.write_text(SECRET + "\n")
    monkeypatch.setenv("GROK_PACS_REVIEW_SECRET_KEY_FILE", str(secret))  # like the other secrets
    settings = load_settings(data_dir=tmp_path, review_port=8080, review_organization="Clinic")
    assert settings.review_secret_key.get_secret_value() == SECRET


def test_identity_from_a_trusted_proxy_header(site):
    """With review_trusted_user_header, the proxy's headers say who asks and in which role; no login page."""
    app, reviews, records, sent, _ = site
    settings = reviews.settings.model_copy(update={"review_trusted_user_header": "X-Remote-User"})
    accounts = Accounts(reviews.register.engine)
    proxied = create_app(settings, reviews, accounts, StudyIndex(reviews.register.engine)).test_client()
    assert proxied.get("/worklist").status_code == 403  # no header: not through the proxy
    study, review = f"/study/{records[0].study_uid}", f"/result/{records[0].sr_uid}/review"
    reviewer = {"X-Remote-User": "sso-meredith", "X-Remote-Role": "reviewer"}
    token = _token(proxied.get(study, headers=reviewer).data)  # the browser's session: same token for both
    viewer = {"X-Remote-User": "sso-trainee", "X-Remote-Role": "viewer"}
    assert 'class="accept"' not in proxied.get(study, headers=viewer).data.decode()
    assert proxied.post(review, data={"action": "accept", "csrf_token": token}, headers=viewer).status_code == 403
    proxied.post(review, data={"action": "accept", "csrf_token": token}, headers=reviewer)
    assert reviews.register.get(records[0].sr_uid).reviewer == "sso-meredith" and len(sent) == 1
    login = {"username": "meredith", "password": PASSWORD, "csrf_token": token}
    assert proxied.post("/login", data=login).status_code == 404  # no login of its own


def test_a_review_whose_outbox_row_a_crash_lost_is_queued_at_start(site):
    """The register recorded the verdict, then the process died before the outbox row: the page's start (or the
    same click again) queues the same verified SR, once."""
    _, reviews, records, sent, _ = site
    uid = verified_uid(records[0].sr_uid, Verification("anyone", "anywhere"))
    reviews.register.record_review(
        records[0].sr_uid, outcome=ReviewOutcome.ACCEPTED, reviewer="meredith", verified_uid=uid
    )
    assert reviews.outbox.get(uid) is None
    accounts = Accounts(reviews.register.engine)
    assert reviews.requeue_missing(accounts.get) == [uid] and sent == [uid]
    assert reviews.outbox.get(uid).kind is ResultKind.VSR
    assert reviews.requeue_missing(accounts.get) == []  # once
    vsr = pydicom.dcmread(Path(reviews.settings.data_dir) / reviews.outbox.get(uid).path)
    assert str(vsr.VerifyingObserverSequence[0].VerifyingObserverName) == "Grey^Meredith"
