"""Stage 2 (OCT/CFP-biomarker alignment): training, resume, held-out evaluation, heads, CLI.

Loop tests run on a synthetic `Stage2Data` (images whose patterns carry a few latent factors, biomarkers
linear in the same factors), so they take seconds; the end-to-end tests run on the phantom cohort.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from grok_pacs.domain.biomarkers import CFP_KEYS, OCT_KEYS
from grok_pacs.model.checkpoints import load_encoder
from grok_pacs.model.heads import BiomarkerHead
from training.stage2.checkpoint import read_meta
from training.stage2.config import Stage2Config
from training.stage2.data import BiomarkerStats, Stage2Data
from training.stage2.evaluate import ProbeSettings, evaluate_encoders, head_features, pooled_features
from training.stage2.model import BiomarkerEncoder
from training.stage2.probe import fit_ridge, probe_errors
from training.stage2.train import BEST, INIT_ENCODER, LAST, load_best_encoder, make_model, train

torch.set_num_threads(1)
CPU = torch.device("cpu")


def synthetic_data(n_subjects: int = 30, seed: int = 0, keys: tuple[str, ...] = CFP_KEYS) -> Stage2Data:
    """Two eyes per subject; 60 % train, 20 % val, 20 % test subjects; one biomarker value missing."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_subjects
    latent = torch.randn(n, 3, generator=g)
    patterns = F.interpolate(torch.randn(3, 1, 8, 8, generator=g), size=224, mode="bilinear")[:, 0]
    images = (latent[:, :, None, None] * patterns[None]).sum(1, keepdim=True).repeat(1, 3, 1, 1)
    images = images + 0.3 * torch.randn(n, 3, 224, 224, generator=g)
    values = 1.0 + 0.1 * latent @ torch.randn(3, len(keys), generator=g) + 0.01 * torch.randn(n, len(keys), generator=g)
    values[3, 1] = math.nan
    subjects = [f"S{i // 2:03d}" for i in range(n)]
    cut_train, cut_val = int(0.6 * n_subjects), int(0.8 * n_subjects)
    splits = ["train" if i // 2 < cut_train else "val" if i // 2 < cut_val else "test" for i in range(n)]
    return Stage2Data(tuple(keys), images.half(), values.float(), subjects, splits, [-1] * n)


def tiny_config(out_dir: Path, **changes) -> Stage2Config:
    base = Stage2Config.small(out_dir=str(out_dir), modality="CFP", epochs=3, batch_size=12, progress=False)
    return replace(base, **changes)


# ---- model pieces --------------------------------------------------------------------------------------
def test_biomarker_encoder_replaces_missing_values_by_the_learned_mask_token() -> None:
    torch.manual_seed(0)
    enc = BiomarkerEncoder(4, proj_dim=8).eval()
    with torch.no_grad():
        enc.mask_token.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    values = torch.tensor([[1.0, math.nan, 3.0, math.nan], [0.1, 0.2, 0.3, 0.4]])
    filled = torch.tensor([[1.0, -1.0, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    out = enc(values)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, enc(filled))
    out.sum().backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad[[1, 3]].abs().sum() > 0
    assert enc.mask_token.grad[[0, 2]].abs().sum() == 0  # known values never touch the token


def test_biomarker_stats_standardise_and_round_trip() -> None:
    values = torch.tensor([[10.0, 1.0], [20.0, math.nan], [30.0, 3.0]])
    stats = BiomarkerStats.fit(("a", "b"), values)
    z = stats.standardise(values)
    assert torch.isnan(z[1, 1])
    assert z[:, 0].mean().abs() < 1e-6 and (z[:, 0].std(unbiased=False) - 1).abs() < 1e-6
    assert BiomarkerStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_config_round_trips_through_json_and_refuses_unknown_fields(tmp_path: Path) -> None:
    cfg = Stage2Config.small(manifest="m.csv", out_dir="o", modality="CFP")
    assert Stage2Config.load(cfg.save(tmp_path / "c.json")) == cfg
    assert cfg.biomarker_keys == CFP_KEYS and Stage2Config.paper().biomarker_keys == OCT_KEYS
    with pytest.raises(ValueError, match="unknown stage-2 config fields"):
        Stage2Config.from_dict({**cfg.to_dict(), "lr_typo": 1})
    with pytest.raises(ValueError, match="modality"):
        replace(cfg, modality="MRI").check()


def test_augmentation_is_reproducible_mild_and_keeps_the_shape() -> None:
    from training.stage2.data import augment

    images = synthetic_data(n_subjects=2).images.float()
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    # Mild: the augmented image still looks much more like its source than like a left-right mirror.
    assert (a - images).abs().mean() < 0.5 * (a - images.flip(-1)).abs().mean()


# ---- ridge probe ---------------------------------------------------------------------------------------
def test_ridge_probe_recovers_a_linear_map_and_folds_into_one_linear_layer() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 10))
    y = x @ rng.normal(size=(10, 3)) * 5 + 100 + rng.normal(scale=0.1, size=(120, 3))
    y[7, 2] = np.nan
    probe = fit_ridge(
        x[:80], y[:80], ("mt_central", "mt_overall", "rnfl_average"), np.arange(80) // 2, (1e-3, 1.0, 1e3)
    )
    errors = probe_errors(probe, x[80:], y[80:])
    assert errors["overall"]["mae"] < 0.5  # noise 0.1 on values of SD ~15
    assert errors["overall"]["mae_std"] < 0.05
    weight, bias = probe.as_linear()
    assert np.allclose(x @ weight.T + bias, probe.predict(x))


# ---- training loop -------------------------------------------------------------------------------------
def test_a_few_epochs_on_a_tiny_encoder_lower_the_loss(tmp_path: Path) -> None:
    data = synthetic_data()
    cfg = tiny_config(tmp_path / "run", epochs=4)
    train(cfg, data)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    # The same loss in eval mode on the training eyes: trained model vs its initial weights.
    rows = data.rows("train")[:12]
    stats = BiomarkerStats.fit(data.keys, data.values[data.rows("train")])
    args = (data.images[rows].float(), stats.standardise(data.values[rows]))
    start, trained = make_model(cfg).eval(), make_model(cfg).eval()
    from training.stage2.checkpoint import load_checkpoint

    load_checkpoint(tmp_path / "run" / LAST, trained)
    with torch.no_grad():
        assert trained(*args) < start(*args)
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000


def test_resume_continues_from_the_same_step_with_the_same_state(tmp_path: Path) -> None:
    data = synthetic_data()
    whole = tiny_config(tmp_path / "whole", augment=True)
    train(whole, data)
    parts = tiny_config(tmp_path / "parts", augment=True)
    train(parts, data, stop_after=1)
    meta = read_meta(tmp_path / "parts" / LAST)
    steps_per_epoch = len(data.rows("train")) // parts.batch_size
    assert (meta["epoch"], meta["step"]) == (1, steps_per_epoch)
    outcome = train(parts, data)
    assert outcome.epochs_done == 3 and read_meta(tmp_path / "parts" / LAST)["step"] == 3 * steps_per_epoch
    a, b = load_file(str(tmp_path / "whole" / LAST)), load_file(str(tmp_path / "parts" / LAST))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"

    def strip(p):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in p.read_text().splitlines()]

    assert strip(tmp_path / "parts" / "metrics.jsonl") == strip(tmp_path / "whole" / "metrics.jsonl")


def test_resume_refuses_a_changed_config_and_restarts_when_asked(tmp_path: Path) -> None:
    data = synthetic_data(n_subjects=20)
    cfg = tiny_config(tmp_path / "run", epochs=1)
    train(cfg, data)
    with pytest.raises(ValueError, match="lr"):
        train(replace(cfg, lr=0.5), data)
    outcome = train(replace(cfg, lr=0.5, resume=False), data)
    assert outcome.epochs_done == 1 and read_meta(tmp_path / "run" / LAST)["config"]["lr"] == 0.5


def test_best_checkpoint_is_the_epoch_with_the_lowest_validation_metric(tmp_path: Path) -> None:
    data = synthetic_data()
    outcome = train(tiny_config(tmp_path / "run", epochs=3), data)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(records, key=lambda r: r["val_probe_mae_std"])
    assert outcome.best_epoch == best["epoch"] == read_meta(tmp_path / "run" / BEST)["epoch"]
    saved = BiomarkerStats.from_dict(read_meta(tmp_path / "run" / BEST)["biomarker_stats"])
    assert saved == BiomarkerStats.fit(CFP_KEYS, data.values[data.rows("train")])  # train split only


def test_standardisation_statistics_ignore_validation_and_test_values(tmp_path: Path) -> None:
    data = synthetic_data(n_subjects=20)
    moved = replace(data, values=data.values.clone())
    moved.values[data.rows("val")] += 5.0
    moved.values[data.rows("test")] *= 2.0
    train(tiny_config(tmp_path / "a", epochs=1), data)
    train(tiny_config(tmp_path / "b", epochs=1), moved)
    assert read_meta(tmp_path / "a" / LAST)["biomarker_stats"] == read_meta(tmp_path / "b" / LAST)["biomarker_stats"]


# ---- evaluation ----------------------------------------------------------------------------------------
def _evaluate(data: Stage2Data, encoder) -> tuple[dict, dict]:
    return evaluate_encoders(data, {"aligned": encoder}, CPU, ProbeSettings((0.1, 10.0), 0, 64, False, "CFP"))


def test_evaluation_numbers_come_from_held_out_test_subjects_only() -> None:
    data = synthetic_data()
    encoder = make_model(tiny_config(Path("unused"))).encoder
    report, probes = _evaluate(data, encoder)
    test_rows = data.rows("test")
    assert report["n_test_eyes"] == len(test_rows) and report["n_test_subjects"] == len(test_rows) // 2
    assert report["encoders"]["aligned"]["per_biomarker"]["avr"]["n"] == len(test_rows)
    # Changing the test eyes' targets changes the scores but not the fitted probe (the head) ...
    shifted = replace(data, values=data.values.clone())
    shifted.values[test_rows] += 1.0
    report2, probes2 = _evaluate(shifted, encoder)
    assert np.array_equal(probes2["aligned"].coef, probes["aligned"].coef)
    assert report2["encoders"]["aligned"]["overall"]["mae"] > report["encoders"]["aligned"]["overall"]["mae"] + 0.5
    # ... while changing validation targets changes neither; changing training targets changes the probe.
    moved_val = replace(data, values=data.values.clone())
    moved_val.values[data.rows("val")] *= 3.0
    report3, probes3 = _evaluate(moved_val, encoder)
    assert np.array_equal(probes3["aligned"].coef, probes["aligned"].coef)
    assert report3["encoders"] == report["encoders"]
    moved_train = replace(data, values=data.values.clone())
    moved_train.values[data.rows("train")[::3]] += 0.2
    assert not np.array_equal(_evaluate(moved_train, encoder)[1]["aligned"].coef, probes["aligned"].coef)


def test_evaluation_refuses_subjects_shared_by_train_and_test() -> None:
    data = synthetic_data()
    leaky = replace(data, splits=list(data.splits))
    first_train_eye = int(data.rows("train")[0])
    leaky.splits[first_train_eye] = "test"  # the other eye of this subject stays in train
    with pytest.raises(ValueError, match="both the train and test splits"):
        _evaluate(leaky, make_model(tiny_config(Path("unused"))).encoder)


def test_saved_head_loads_in_the_bundle_format_and_predicts_like_the_probe(tmp_path: Path) -> None:
    from training.stage2.evaluate import save_head

    data = synthetic_data()
    encoder = make_model(tiny_config(Path("unused"))).encoder
    _report, probes = _evaluate(data, encoder)
    head = BiomarkerHead.load(save_head(probes["aligned"], "CFP", tmp_path))
    feats = pooled_features(encoder, data.images[:5], CPU, 8)
    assert head.keys == CFP_KEYS
    assert np.allclose(head.predict(feats), probes["aligned"].predict(feats), rtol=1e-4, atol=1e-4)


def test_best_encoder_and_plain_encoder_are_saved_and_differ(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", epochs=1)
    train(cfg, synthetic_data(n_subjects=20))
    plain = load_encoder(tmp_path / "run" / INIT_ENCODER)
    aligned = load_best_encoder(cfg, tmp_path / "run")
    fresh = make_model(cfg).encoder
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in plain.state_dict().items())
    assert not torch.equal(aligned.patch_embed.proj.weight, plain.patch_embed.proj.weight)


# ---- end to end on the phantom cohort ------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory) -> Path:
    from training.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("phantom"), 14, seed=3, dicom=False, workers=1, progress=False)


def test_oct_images_are_the_runtime_foveal_bscan_preprocessed_by_the_runtime(
    phantom_manifest: Path, tmp_path: Path
) -> None:
    from grok_pacs.analysis.imaging import read_oct_volume
    from grok_pacs.analysis.preprocess import preprocess_oct, select_foveal_bscan
    from training.manifest import load_manifest
    from training.stage2.data import load_data

    data = load_data(phantom_manifest, "OCT", OCT_KEYS, tmp_path, progress=False, workers=2)
    records = load_manifest(phantom_manifest)
    assert data.images.shape == (len(records), 3, 224, 224) and data.values.shape == (len(records), 31)
    for i in (0, len(records) - 1):
        volume = read_oct_volume(records[i].oct_path)
        index, _ = select_foveal_bscan(volume)
        assert data.frames[i] == index
        expected = torch.from_numpy(preprocess_oct(volume[index])).half()
        assert torch.equal(data.images[i], expected)
        assert data.values[i, OCT_KEYS.index("mt_central")] == pytest.approx(records[i].biomarkers["mt_central"])
    # Found the fovea on most eyes (the phantom records where it rendered it).
    agree = sum(f == r.fovea_frame for f, r in zip(data.frames, records))
    assert agree >= 0.8 * len(records)
    # Second call: from the cache (same tensors, no decoding).
    again = load_data(phantom_manifest, "OCT", OCT_KEYS, tmp_path, progress=False, workers=1)
    assert torch.equal(again.images, data.images) and len(list(tmp_path.glob("oct-*.safetensors"))) == 1


def test_cli_turns_a_cohort_into_checkpoint_report_and_heads(phantom_manifest: Path, tmp_path: Path, capsys) -> None:
    from training.stage2.__main__ import main

    out = tmp_path / "stage2"
    assert (
        main(
            [
                "--manifest",
                str(phantom_manifest),
                "--out",
                str(out),
                "--epochs",
                "2",
                "--no-progress",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for modality, keys in (("OCT", OCT_KEYS), ("CFP", CFP_KEYS)):
        run_dir = out / modality.lower()
        assert f"{modality}: test MAE aligned" in printed
        meta = read_meta(run_dir / BEST)
        assert meta["config"]["modality"] == modality and len(meta["biomarker_stats"]["mean"]) == len(keys)
        encoder = load_encoder(run_dir / "encoder.safetensors")
        head = BiomarkerHead.load(run_dir / f"{modality.lower()}-head.safetensors")
        # The preset's head reads the pooled feature and a 4x4 grid of token cells (where, not only what).
        assert head.keys == keys and head.grid == 4 and head.feature_dim == 17 * encoder.embed_dim
        report = json.loads((run_dir / "eval.json").read_text())
        assert set(report["encoders"]) == {"aligned", "plain"}
        assert set(report["encoders"]["aligned"]["per_biomarker"]) <= set(keys)
        assert report["n_test_subjects"] >= 1 and report["epochs"] == 2
        # The shipped head is the aligned encoder's probe: it reproduces the report's test MAE.
        from training.stage2.data import load_data

        data = load_data(phantom_manifest, modality, keys, tmp_path / "cache", progress=False)
        test = data.rows("test")
        pred = head.predict(head_features(encoder, data.images[test], CPU, 16, False, head.grid))
        truth = data.values[test].double().numpy()
        mae = np.nanmean(np.abs(pred - truth), axis=0)
        assert np.mean(mae) == pytest.approx(report["encoders"]["aligned"]["overall"]["mae"], rel=1e-3)
        assert "| aligned |" in (run_dir / "eval.md").read_text()
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert (run_dir / "curve.png").is_file()


def test_cli_help_explains_the_command(capsys) -> None:
    from training.stage2.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--manifest" in text and "--preset" in text and "heads" in text


def test_cli_reports_a_broken_manifest_without_a_traceback(tmp_path: Path, capsys) -> None:
    from training.stage2.__main__ import main

    bad = tmp_path / "manifest.csv"
    bad.write_text("subject_id,eye,label,split,cfp_path,oct_path\nS1,R,Flu,train,missing.png,missing\n")
    assert main(["--manifest", str(bad), "--out", str(tmp_path / "out"), "--modality", "OCT", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stage 2 (OCT) failed" in err and "row 2" in err and "unknown label 'Flu'" in err
