"""The review page as a Flask application (server-side Jinja2 templates in `templates/`, CSRF by Flask-WTF).

Pages: the worklist of results awaiting review (filters: date, label, disposition, probability; 50 a page),
one study's page (each eye's result, its source images, the PDF report inline, and the Accept / Reject /
Correct forms), the login. A reviewer goes from the worklist to an accepted result in two clicks: the
worklist row, then Accept.

Who is asking: the signed session cookie of a login against `accounts` (HttpOnly, SameSite=Lax, Secure
unless review_cookie_secure is off, 8 hours), or, with review_trusted_user_header set, the user name and role
headers of the trusted reverse proxy in front (then the page has no login of its own). Every POST carries
the session's CSRF token; a POST without a valid one is refused (400) and audited, as is a review by
someone without the role (403), a login, a failed login and a logout.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, abort, flash, g, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.wrappers import Response as BaseResponse

from grok_pacs.config import Settings
from grok_pacs.domain.labels import Label
from grok_pacs.ops import audit
from grok_pacs.review.accounts import Accounts, Reviewer, Role
from grok_pacs.review.actions import REJECTION_REASONS, Decision, ReviewError, Reviews
from grok_pacs.review.images import ImageUnavailable, instance_path, render_png
from grok_pacs.store.index import StudyIndex
from grok_pacs.store.register import ResultState, ReviewOutcome

log = logging.getLogger("grok_pacs.review.app")

PAGE_SIZE = 50
SESSION_HOURS = 8
CORRECTABLE = [label for label in Label if label is not Label.INDETERMINATE]
SHOWN_STATES = (ResultState.DELIVERED, ResultState.REVIEWED, ResultState.PENDING)


def create_app(settings: Settings, reviews: Reviews, accounts: Accounts, index: StudyIndex) -> Flask:
    app = Flask("grok_pacs.review")
    app.config.update(
        SECRET_KEY=settings.review_secret_key.get_secret_value(),
        SESSION_COOKIE_NAME="grok_review",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.review_cookie_secure,
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=SESSION_HOURS),
        WTF_CSRF_TIME_LIMIT=SESSION_HOURS * 3600,
        MAX_CONTENT_LENGTH=64 * 1024,  # the forms are small; anything bigger is not ours
        TRUSTED_PROXY=bool(settings.review_trusted_user_header),
    )
    CSRFProtect(app)
    _routes(app, settings, reviews, accounts, index)
    app.register_error_handler(CSRFError, _csrf_refused)
    app.after_request(_security_headers)
    app.jinja_env.globals.update(labels=list(Label), correctable=CORRECTABLE, reasons=sorted(REJECTION_REASONS))
    app.jinja_env.filters["when"] = _when
    return app


# --- who is asking ---------------------------------------------------------------------------------
def _current_user(settings: Settings, accounts: Accounts) -> Reviewer | None:
    header = settings.review_trusted_user_header
    if header:  # the proxy authenticated them; its headers are the identity (docs/deploy.md)
        name = request.headers.get(header, "").strip()
        role = request.headers.get(settings.review_trusted_role_header, "").strip().lower()
        if not name or role not in set(Role):
            return None
        return Reviewer(name[:64], Role(role))
    username = session.get("user")
    return accounts.get(username) if username else None


def _login_required(settings: Settings, accounts: Accounts) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g.user = _current_user(settings, accounts)
            if g.user is None:
                if request.method == "POST":
                    audit.review_refused("", _peer(), f"{request.path}: not logged in")
                    abort(403)
                if settings.review_trusted_user_header:
                    abort(403)
                return redirect(url_for("login", next=request.full_path))
            return view(*args, **kwargs)

        return wrapper

    return decorate


def _peer() -> str:
    return request.remote_addr or ""


# --- the routes --------------------------------------------------------------------------------------
def _routes(app: Flask, settings: Settings, reviews: Reviews, accounts: Accounts, index: StudyIndex) -> None:
    views = _Views(settings, reviews, accounts, index)
    required = _login_required(settings, accounts)
    open_rules = [("/login", "login", "GET"), ("/login", "login_post", "POST"), ("/", "home", "GET")]
    for rule, name, method in open_rules:
        app.add_url_rule(rule, name, getattr(views, name), methods=[method])
    guarded = [
        ("/logout", "logout", "POST"),
        ("/worklist", "worklist", "GET"),
        ("/study/<study_uid>", "study", "GET"),
        ("/study/<study_uid>/report/<pdf_uid>.pdf", "report_pdf", "GET"),
        ("/study/<study_uid>/image/<sop_uid>.png", "image", "GET"),
        ("/result/<sr_uid>/review", "review", "POST"),
    ]
    for rule, name, method in guarded:
        app.add_url_rule(rule, name, required(getattr(views, name)), methods=[method])


class _Views:
    def __init__(self, settings: Settings, reviews: Reviews, accounts: Accounts, index: StudyIndex) -> None:
        self.settings, self.reviews, self.accounts, self.index = settings, reviews, accounts, index

    def login(self) -> Any:
        return render_template("login.html", proxy=bool(self.settings.review_trusted_user_header))

    def login_post(self) -> BaseResponse:
        if self.settings.review_trusted_user_header:
            abort(404)
        username = request.form.get("username", "").strip()
        user = self.accounts.authenticate(username, request.form.get("password", ""))
        audit.user_authenticated(username[:64], _peer(), success=user is not None)
        if user is None:
            log.warning("failed review login from %s", _peer())
            flash("Wrong user name or password.", "error")
            return redirect(url_for("login"))
        session.clear()  # a new session for the logged-in user (no fixation)
        session.permanent = True
        session["user"] = user.username
        target = request.args.get("next", "")
        return redirect(target if target.startswith("/") and not target.startswith("//") else url_for("worklist"))

    def logout(self) -> BaseResponse:
        audit.user_authenticated(g.user.username, _peer(), success=True, logout=True)
        session.clear()
        return redirect(url_for("login"))

    def home(self) -> BaseResponse:
        return redirect(url_for("worklist"))

    def worklist(self) -> Any:
        filters, shown = _worklist_filters(request.args)
        page = max(1, request.args.get("page", 1, type=int) or 1)
        rows = self.reviews.register.worklist(**filters, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        total = self.reviews.register.count(**filters)
        pages = max(1, -(-total // PAGE_SIZE))
        return render_template("worklist.html", rows=rows, total=total, page=page, pages=pages, shown=shown)

    def study(self, study_uid: str) -> Any:
        records = [r for r in self.reviews.register.for_study(study_uid) if r.state in SHOWN_STATES]
        if not records:
            abort(404)
        header = _study_header(self.reviews, records[0].sr_uid)
        pdf_uid = next((r.pdf_uid for r in reversed(records) if r.pdf_uid), "")
        return render_template("study.html", study_uid=study_uid, records=records, header=header, pdf_uid=pdf_uid)

    def report_pdf(self, study_uid: str, pdf_uid: str) -> Response:
        if not any(r.pdf_uid == pdf_uid for r in self.reviews.register.for_study(study_uid)):
            abort(404)
        try:
            document = bytes(self.reviews.result_dataset(pdf_uid).EncapsulatedDocument)
        except ReviewError:
            abort(404)
        response = Response(document, mimetype="application/pdf")
        response.headers["Content-Disposition"] = f'inline; filename="report-{pdf_uid}.pdf"'
        return response

    def image(self, study_uid: str, sop_uid: str) -> Response:
        records = self.reviews.register.for_study(study_uid)
        if sop_uid not in {uid for r in records for uid in (r.cfp_uid, r.oct_uid) if uid}:
            abort(404)
        try:
            png = render_png(instance_path(self.index, self.settings.data_dir, study_uid, sop_uid))
        except ImageUnavailable:
            abort(404)
        response = Response(png, mimetype="image/png")
        response.headers["Cache-Control"] = "private, max-age=3600"  # an instance never changes
        return response

    def review(self, sr_uid: str) -> BaseResponse:
        user: Reviewer = g.user
        if not user.may_review:
            audit.review_refused(user.username, _peer(), f"review of {sr_uid}: role {user.role}")
            abort(403)
        record = self.reviews.register.get(sr_uid)
        if record is None:
            abort(404)
        try:
            self.reviews.review(sr_uid, user, _decision(request.form), _peer())
            flash(_done_message(request.form.get("action", "")), "ok")
        except ReviewError as exc:
            flash(f"Not done: {exc}", "error")
        return redirect(url_for("study", study_uid=record.study_uid))


def _decision(form: Any) -> Decision:
    action, note = form.get("action", ""), form.get("note", "").strip()
    if action == "accept":
        return Decision(ReviewOutcome.ACCEPTED, note=note)
    if action == "reject":
        return Decision(ReviewOutcome.REJECTED, reason=form.get("reason", ""), note=note)
    if action == "correct":
        try:
            label = Label(form.get("label", ""))
        except ValueError:
            raise ReviewError("pick the label the result should have") from None
        return Decision(ReviewOutcome.CORRECTED, label=label, note=note)
    raise ReviewError(f"unknown action {action!r}")


def _done_message(action: str) -> str:
    return {
        "accept": "Accepted: a verified SR is on its way to the PACS.",
        "correct": "Corrected: a verified SR with your label is on its way to the PACS.",
        "reject": "Rejected: a rejection note withdrawing the AI result is on its way to the PACS.",
    }.get(action, "Done.")


def _worklist_filters(args: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The register's worklist filters from the query string, and the values to show in the form."""
    shown = {key: args.get(key, "").strip() for key in ("since", "until", "label", "disposition", "min_p", "max_p")}
    filters: dict[str, Any] = {}
    for key, name in (("since", "since"), ("until", "until")):
        day = _day(shown[key])
        if day is not None:
            filters[name] = day + (86400.0 if key == "until" else 0.0)  # until: the whole day
    if shown["label"] in {label.value for label in Label}:
        filters["label"] = shown["label"]
    if shown["disposition"]:
        filters["disposition"] = shown["disposition"]
    for key, name in (("min_p", "min_probability"), ("max_p", "max_probability")):
        value = _float(shown[key])
        if value is not None:
            filters[name] = value
    return filters, shown


def _day(text: str) -> float | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def _study_header(reviews: Reviews, sr_uid: str) -> dict[str, str]:
    """Patient and study as the AI SR states them (for the clinician: they must know whose study it is)."""
    try:
        ds = reviews.result_dataset(sr_uid)
    except ReviewError:
        return {}
    return {
        "patient": str(ds.get("PatientName", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "study_date": str(ds.get("StudyDate", "")),
        "accession": str(ds.get("AccessionNumber", "")),
        "description": str(ds.get("StudyDescription", "")),
    }


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _csrf_refused(error: CSRFError) -> tuple[str, int]:
    audit.review_refused(session.get("user", ""), _peer(), f"{request.path}: {error.description}")
    return render_template("error.html", message=f"Refused: {error.description}"), 400


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")  # the PDF frame is our own
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")  # patient data stays out of shared caches
    return response
