"""The learned quality head: trained on the bundle's encoder features of phantom images and degraded copies
(training.quality_head), stored in the bundle (hashed), loaded by the engine and applied by the pipeline's
gate after the rule-based checks."""

from __future__ import annotations

import numpy as np
import pytest

from devtools.tiny_bundle import copy_bundle
from grok_pacs.analysis.bundle import BundleError, load_bundle
from grok_pacs.analysis.engine import Engine
from grok_pacs.analysis.quality import QualityThresholds, assess_cfp, with_learned
from grok_pacs.analysis.quality_head import QUALITY_HEAD_FILE, QualityHead
from grok_pacs.analysis.result import Gradability
from training.benchmark.safety import phantom_eyes
from training.quality_head import add_to_bundle, fit_logistic, train_head


def test_logistic_fit_separates_separable_features():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(3, 1, (40, 5))])
    y = np.array([0] * 40 + [1] * 40)
    model = fit_logistic(x, y)
    assert model.probability(np.full(5, 3.0)) > 0.9 and model.probability(np.zeros(5)) < 0.1


def test_head_trained_stored_loaded_and_applied(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    engine = Engine.from_bundle(tiny_bundle)
    assert (
        engine.quality_head is None and engine.learned_ungradability("CFP", np.zeros((256, 256, 3), np.uint8)) is None
    )
    eyes = phantom_eyes(8, seed=2)
    head, report = train_head(engine, eyes, seed=2)
    assert set(report) == {"CFP", "OCT"} and all(0.0 <= r["held_out_auroc"] <= 1.0 for r in report.values())
    add_to_bundle(bundle, head, version="0.0.1-test+qh")
    assert load_bundle(bundle).manifest["quality_head"]["file"] == QUALITY_HEAD_FILE
    served = Engine.from_bundle(bundle)
    assert isinstance(served.quality_head, QualityHead)
    cfp = eyes[0][0]
    p = served.learned_ungradability("CFP", cfp)
    assert p == pytest.approx(head.models["CFP"].probability(engine.pooled_feature("CFP", cfp)))
    verdict = assess_cfp(cfp, QualityThresholds())
    assert with_learned(verdict, 0.99, 0.5).gradability is Gradability.UNGRADABLE
    assert with_learned(verdict, 0.99, 0.5).reasons[0].code == "learned-quality"
    assert with_learned(verdict, 0.10, 0.5).measures["learned_ungradable"] == 0.10
    (bundle / QUALITY_HEAD_FILE).write_bytes(b"tampered")
    with pytest.raises(BundleError, match="quality_head.npz"):
        load_bundle(bundle)


def test_worker_gate_uses_the_bundles_head(tiny_bundle, tmp_path):
    """A head whose threshold every image reaches: the eye's SR has no diagnosis and names the learned reason."""
    from pathlib import Path

    from devtools.ports import free_port
    from devtools.storescp import StoreSCP
    from grok_pacs.config import load_settings
    from grok_pacs.dicom.uids import instance_relpath
    from grok_pacs.ingest.assembly import recover
    from grok_pacs.jobs import worker
    from grok_pacs.jobs.tasks import analyze_study
    from tests.helpers.ophthalmic_dicom import Patient, make_cfp, write
    from tests.helpers.srcheck import assert_valid_sr

    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    engine = Engine.from_bundle(tiny_bundle)
    head, _ = train_head(engine, phantom_eyes(4, seed=3), seed=3)
    add_to_bundle(bundle, QualityHead(head.models, threshold=1e-9), version="0.0.1-test+qh0")
    pacs = StoreSCP(free_port(), tmp_path / "pacs").start()
    settings = load_settings(
        data_dir=tmp_path / "data",
        bundle=bundle,
        quiet_period=0,
        destination=f"PACS@127.0.0.1:{pacs.port}",
        dimse_timeout=20,
    )
    app = worker.worker_app(settings)
    try:
        ctx = worker.context_of(app)
        ds = make_cfp(Patient(), "R")
        write(
            ds, Path(settings.data_dir) / instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        )
        recover(settings, ctx.index)
        study = ctx.index.study(ds.StudyInstanceUID)
        assert ctx.index.mark_queued(ds.StudyInstanceUID, 1, study.last_received_at)
        analyze_study(study_uid=ds.StudyInstanceUID, version=1)
        sr_row = next(e for e in ctx.outbox.for_study(ds.StudyInstanceUID) if e.eye == "R")
        text = assert_valid_sr(
            Path(settings.data_dir) / sr_row.path,
            "Learned quality model: image likely ungradable",
            "Image quality insufficient: retake, or refer",
        )
        assert "No diagnosis: the images of this eye are ungradable" in text
    finally:
        app.close()
        pacs.stop()
