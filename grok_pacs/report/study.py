"""The patient and study a report is about, read once from a source image's header."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

#: Patient and study attributes every result copies from its source images: Type 2 (present, maybe empty)
#: in the SR, the encapsulated PDF and the rejection note alike.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True)
class StudyHeader:
    """What the PDF's header shows; `from_dataset` reads it from any image of the study."""

    study_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    accession: str
    software: str  #: e.g. "grok-pacs 0.1.0"
    made_at: str  #: when the report was made, as text

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise ValueError("StudyHeader: study_uid is required")

    @classmethod
    def from_dataset(cls, ds: Dataset, *, software: str, made_at: str) -> StudyHeader:
        def text(name: str) -> str:
            return str(ds.get(name) or "").strip()

        name = text("PatientName").replace("^", " ").strip()
        return cls(
            study_uid=text("StudyInstanceUID"),
            patient_id=text("PatientID") or "unknown",
            patient_name=name or "name not recorded",
            birth_date=_date(text("PatientBirthDate")),
            sex=text("PatientSex"),
            study_date=_date(text("StudyDate")),
            accession=text("AccessionNumber"),
            software=software,
            made_at=made_at,
        )


def _date(da: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else da
