"""The results register on both dialects (the embedded SQLite file and a real PostgreSQL server): rows added
once, the worklist's filters, and each state change made once and refused from the wrong state."""

from __future__ import annotations

import time

import pytest

from grok_pacs.store.register import (
    RegisterError,
    ResultRecord,
    ResultRegister,
    ResultState,
    ReviewOutcome,
)


def _result(sr: str, study: str = "1.2.3", version: int = 1, eye: str = "R", **kw) -> ResultRecord:
    values = dict(
        label="referable_dr",
        probability=0.8,
        disposition="Refer within 2 weeks",
        gradability="gradable",
        pdf_uid=f"{study}.pdf.{version}",
        cfp_uid=f"{study}.cfp.{eye}",
        oct_uid="",
    )
    values.update(kw)
    return ResultRecord(sr, study, version, "bundle-1", eye, **values)


def test_add_many_is_idempotent_and_keeps_the_state(database) -> None:
    register = ResultRegister(database)
    register.add_many([_result("9.1"), _result("9.2", eye="L", label="", probability=None)])
    register.mark_delivered("9.1", at=123.0)
    register.add_many([_result("9.1", label="changed"), _result("9.2", eye="L")])  # a re-run of the job
    first, second = register.for_study("1.2.3")
    assert (first.sr_uid, first.state, first.label, first.delivered_at) == (
        "9.1",
        ResultState.DELIVERED,
        "referable_dr",
        123.0,
    )
    assert (second.state, second.label, second.probability, second.created_at > 0) == (
        ResultState.PENDING,
        "",
        None,
        True,
    )
    assert register.get("9.3") is None
    register.mark_delivered("9.1", at=999.0)  # already delivered: unchanged
    assert register.get("9.1").delivered_at == 123.0
    register.close()


def test_a_record_that_cannot_be_right_is_refused() -> None:
    with pytest.raises(ValueError, match="eye"):
        _result("9.1", eye="B")
    with pytest.raises(ValueError, match="probability"):
        _result("9.1", probability=1.5)


def test_worklist_filters_pages_and_counts(database) -> None:
    register = ResultRegister(database)
    for i in range(6):
        label = "referable_dr" if i % 2 else "no_referable_dr"
        register.add_many([_result(f"8.{i}", study=f"2.{i}", label=label, probability=i / 10)])
        register.mark_delivered(f"8.{i}", at=float(i))
        time.sleep(0.01)  # distinct created_at: the worklist is newest first
    register.add_many([_result("8.9", study="2.9")])  # pending: not awaiting review
    assert [r.sr_uid for r in register.worklist()] == ["8.5", "8.4", "8.3", "8.2", "8.1", "8.0"]
    assert [r.sr_uid for r in register.worklist(limit=2, offset=1)] == ["8.4", "8.3"]
    assert [r.sr_uid for r in register.worklist(label="referable_dr", min_probability=0.2)] == ["8.5", "8.3"]
    assert [r.sr_uid for r in register.worklist(max_probability=0.1)] == ["8.1", "8.0"]
    assert register.count(label="no_referable_dr") == 3
    assert register.count(states=(ResultState.PENDING, ResultState.DELIVERED)) == 7
    assert register.count(disposition="Refer within 2 weeks") == 6 and register.count(disposition="Routine") == 0
    middle = register.get("8.2").created_at
    assert [r.sr_uid for r in register.worklist(since=middle, until=register.get("8.4").created_at)] == ["8.3", "8.2"]
    assert [r.sr_uid for r in register.since(middle)] == ["8.2", "8.3", "8.4", "8.5", "8.9"]
    assert register.since(middle, bundle_version="bundle-2") == []
    register.close()


def test_replacement_and_withdrawal_are_made_once(database) -> None:
    register = ResultRegister(database)
    register.add_many([_result("7.1"), _result("7.2", eye="L")])
    register.mark_delivered("7.1", at=1.0)
    assert [r.sr_uid for r in register.replaceable("1.2.3", before_version=2)] == ["7.1", "7.2"]
    assert register.replaceable("1.2.3", before_version=1) == []
    register.add_many([_result("7.3", version=2), _result("7.4", version=2, eye="L")])
    register.mark_replaced(["7.1", "7.2"], by="7.3", rejection_uid="5.1")
    register.mark_replaced(["7.1", "7.2"], by="7.3", rejection_uid="5.1")  # a re-run: nothing changes
    old = register.get("7.1")
    assert (old.state, old.replaced_by, old.withdraw_reason, old.rejection_uid) == (
        ResultState.REPLACED,
        "7.3",
        "replaced",
        "5.1",
    )
    assert [r.sr_uid for r in register.current("1.2.3")] == ["7.3", "7.4"]
    with pytest.raises(RegisterError, match="7.1: cannot become WITHDRAWN, it is REPLACED"):
        register.mark_withdrawn(["7.1"], "quality", "5.2")
    register.mark_withdrawn(["7.3", "7.4"], "safety", "5.2")
    assert {(r.state, r.withdraw_reason, r.rejection_uid) for r in register.for_study("1.2.3")[2:]} == {
        (ResultState.WITHDRAWN, "safety", "5.2")
    }
    assert register.current("1.2.3") == []
    with pytest.raises(RegisterError, match="6.6: cannot become WITHDRAWN, it is not registered"):
        register.mark_withdrawn(["6.6"], "quality", "5.3")
    with pytest.raises(ValueError, match="reason"):
        register.mark_withdrawn(["7.3"], "boredom", "5.3")
    register.close()


def test_a_review_is_taken_only_from_delivered(database) -> None:
    register = ResultRegister(database)
    register.add_many([_result("6.1"), _result("6.2", eye="L"), _result("6.3", study="3.3")])
    with pytest.raises(RegisterError, match="6.1: cannot be reviewed, it is PENDING"):
        register.record_review("6.1", outcome=ReviewOutcome.ACCEPTED, reviewer="dr.a")
    for sr in ("6.1", "6.2", "6.3"):
        register.mark_delivered(sr, at=2.0)
    accepted = register.record_review("6.1", outcome=ReviewOutcome.ACCEPTED, reviewer="dr.a", verified_uid="4.1")
    assert (accepted.state, accepted.review_outcome, accepted.reviewed_label, accepted.verified_uid) == (
        ResultState.REVIEWED,
        "ACCEPTED",
        "referable_dr",
        "4.1",
    )
    assert accepted.reviewed_at is not None and register.get("6.1") == accepted
    corrected = register.record_review(
        "6.2", outcome=ReviewOutcome.CORRECTED, reviewer="dr.b", label="no_referable_dr", note="artefact"
    )
    assert (corrected.reviewed_label, corrected.review_note, corrected.reviewer) == (
        "no_referable_dr",
        "artefact",
        "dr.b",
    )
    with pytest.raises(RegisterError, match="it is REVIEWED"):
        register.record_review("6.2", outcome=ReviewOutcome.REJECTED, reviewer="dr.c")
    with pytest.raises(ValueError, match="label"):
        register.record_review("6.3", outcome=ReviewOutcome.CORRECTED, reviewer="dr.b")
    rejected = register.record_review("6.3", outcome=ReviewOutcome.REJECTED, reviewer="dr.c", rejection_uid="5.9")
    assert (rejected.reviewed_label, rejected.rejection_uid) == ("", "5.9")
    assert register.count(states=(ResultState.REVIEWED,)) == 3 and register.worklist() == []
    register.close()
