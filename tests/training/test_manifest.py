"""The cohort manifest loader reports every broken row with its row number, and refuses or drops them."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from PIL import Image

from grok_pacs.domain.biomarkers import BIOMARKERS
from grok_pacs.domain.labels import Label
from training.manifest import MANIFEST_COLUMNS, CohortRecord, ManifestError, load_manifest, write_manifest


def _row(tmp: Path, subject: str, eye: str = "R", label: str = "Glaucoma", **changes: str) -> dict[str, str]:
    """A valid manifest row whose image files exist; `changes` override columns."""
    folder = tmp / subject / eye
    (folder / "oct").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "cfp.png")
    for k in range(3):
        Image.new("L", (8, 8)).save(folder / "oct" / f"{k:03d}.png")
    row = {c: "" for c in MANIFEST_COLUMNS}
    row.update(
        subject_id=subject,
        eye=eye,
        label=label,
        split="train",
        cfp_path=f"{subject}/{eye}/cfp.png",
        oct_path=f"{subject}/{eye}/oct",
        fovea_frame="1",
    )
    for b in BIOMARKERS:
        row[b.key] = str(sum(b.normal) / 2)
    row.update(changes)
    return row


def _write(tmp: Path, rows: list[dict[str, str]], columns=MANIFEST_COLUMNS) -> Path:
    path = tmp / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_valid_manifest_loads_with_paths_nan_and_fovea(tmp_path: Path) -> None:
    rows = [_row(tmp_path, "S1", "R"), _row(tmp_path, "S1", "L", avr="", fovea_frame="")]
    records = load_manifest(_write(tmp_path, rows))
    assert [(r.subject_id, r.eye, r.label, r.row) for r in records] == [
        ("S1", "R", Label.GLAUCOMA, 2),
        ("S1", "L", Label.GLAUCOMA, 3),
    ]
    assert records[0].cfp_path == tmp_path / "S1" / "R" / "cfp.png"
    assert records[0].oct_path.is_dir() and records[0].fovea_frame == 1
    assert records[1].fovea_frame is None
    assert math.isnan(records[1].biomarkers["avr"]) and list(records[1].biomarkers) == [b.key for b in BIOMARKERS]


def test_every_kind_of_broken_row_is_reported_with_its_row(tmp_path: Path) -> None:
    rows = [
        _row(tmp_path, "S1"),  # row 2: fine
        _row(tmp_path, "S2", cfp_path="S2/R/missing.png"),  # row 3: missing file
        _row(tmp_path, "S3", label="Cataract"),  # row 4: unknown label
        _row(tmp_path, "S4", cup_to_disc="1.7"),  # row 5: out of plausible range
        _row(tmp_path, "S1"),  # row 6: duplicate subject/eye
        _row(tmp_path, "S5", mt_central="thick"),  # row 7: not a number
        _row(tmp_path, "S6", fovea_frame="9"),  # row 8: fovea past the last of 3 frames
        _row(tmp_path, "S7", eye="X", split="holdout"),  # row 9: bad eye and split
    ]
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, rows))
    found = {(p.row, p.column) for p in err.value.problems}
    assert found == {
        (3, "cfp_path"),
        (4, "label"),
        (5, "cup_to_disc"),
        (6, "subject_id"),
        (7, "mt_central"),
        (8, "fovea_frame"),
        (9, "eye"),
        (9, "split"),
    }
    text = str(err.value)
    assert "row 3, cfp_path: file not found" in text and "Cataract" in text and "first at row 2" in text
    assert "row 5, cup_to_disc: value 1.7 out of the plausible range 0-1" in text


def test_drop_bad_keeps_good_rows_only(tmp_path: Path) -> None:
    rows = [_row(tmp_path, "S1"), _row(tmp_path, "S2", label="Cataract"), _row(tmp_path, "S3")]
    records = load_manifest(_write(tmp_path, rows), drop_bad=True)
    assert [r.subject_id for r in records] == ["S1", "S3"]
    with pytest.raises(ManifestError, match="no usable rows"):
        load_manifest(_write(tmp_path, [_row(tmp_path, "S2", label="Cataract")]), drop_bad=True)


def test_header_problems_are_row_one_and_not_droppable(tmp_path: Path) -> None:
    columns = [c for c in MANIFEST_COLUMNS if c != "label"] + ["rnfl_avg", "meta_site"]
    row = _row(tmp_path, "S1")
    row.pop("label")
    row.update(rnfl_avg="30", meta_site="A")
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, [row], columns), drop_bad=True)
    assert {(p.row, p.column) for p in err.value.problems} == {(1, "label"), (1, "rnfl_avg")}


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    row = _row(tmp_path, "S1")
    values = {b.key: float(sum(b.normal) / 2) for b in BIOMARKERS}
    values["avr"] = math.nan
    record = CohortRecord(
        "S1",
        "R",
        Label.AMD,
        "test",
        tmp_path / row["cfp_path"],
        tmp_path / row["oct_path"],
        values,
        2,
        None,
        0,
        {"age": "71"},
    )
    path = write_manifest(tmp_path / "out" / "manifest.csv", [record])
    (loaded,) = load_manifest(path)
    assert loaded.label == Label.AMD and loaded.split == "test" and loaded.fovea_frame == 2
    assert loaded.cfp_path.resolve() == record.cfp_path.resolve() and loaded.meta == {"age": "71"}
    assert math.isnan(loaded.biomarkers["avr"])
    assert loaded.biomarkers["mt_central"] == pytest.approx(values["mt_central"], abs=0.05)
