"""Real DICOM for a phantom subject: one study, an OP (JPEG baseline) and an OPT (multi-frame) per eye.

The patient and study attributes are plausible but invented (patient name PHANTOM^..., institution
"grok-pacs phantom"), and every instance says in ImageComments / StudyDescription that it is synthetic.
UIDs are derived from the cohort seed and the subject, so the same seed writes the same files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from grok_pacs.report.codes import EYE, FUNDUS_CAMERA, OCT_SCANNER, RETINA, Code
from training.phantom.cfp_render import PX_PER_MM
from training.phantom.oct_render import AXIAL_UM_PER_PX, LATERAL_UM_PER_PX, OCT_HEIGHT, OCT_WIDTH
from training.phantom.sampling import SCAN_MM, SubjectTruth, frame_y

OP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  #: Ophthalmic Photography 8 Bit Image Storage
OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  #: Ophthalmic Tomography Image Storage
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  #: pydicom's registered root, for generated UIDs
SYNTHETIC_NOTE = "SYNTHETIC PHANTOM - rendered by grok-pacs training.phantom, not clinical data"
JPEG_QUALITY = 92


@dataclass(frozen=True)
class StudyFiles:
    study_dir: Path
    op: dict[str, Path]  #: eye -> OP file
    opt: dict[str, Path]  #: eye -> OPT file
    study_uid: str


def _code(value: Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value[0], value[1], value[2]
    return item


def _uid(seed: int, subject_id: str, what: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[f"grok-pacs phantom {seed}", subject_id, what])


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    if array.ndim == 3:
        Image.fromarray(array).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=1)  # 4:2:2
    else:
        Image.fromarray(array).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_study(
    out_dir: Path,
    truth: SubjectTruth,
    seed: int,
    cfp: dict[str, np.ndarray],
    octs: dict[str, np.ndarray],
    device: str = "reference",
) -> StudyFiles:
    """Write the subject's study (OP + OPT per eye) under out_dir; returns the paths. A device other than the
    reference (training.phantom.devices) is named in ManufacturerModelName, as a real camera's model is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = _uid(seed, truth.subject_id, "study")
    rng = np.random.default_rng([seed, int.from_bytes(truth.subject_id.encode()[-6:], "big")])
    study_date = date(2021, 1, 1) + timedelta(days=int(rng.integers(0, 3 * 365)))
    birth = date(study_date.year - truth.age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    common = _patient_study(truth, study_uid, study_date, birth, seed)
    if device != "reference":
        common.ManufacturerModelName = f"training.phantom {device}"
    op_files, opt_files = {}, {}
    for number, eye_truth in enumerate(truth.eyes):
        eye = eye_truth.eye
        op = _op_dataset(common, truth, seed, eye, cfp[eye], number)
        op_files[eye] = out_dir / f"OP_{eye}.dcm"
        op.save_as(op_files[eye], enforce_file_format=True)
        opt = _opt_dataset(common, truth, seed, eye, octs[eye], number)
        opt_files[eye] = out_dir / f"OPT_{eye}.dcm"
        opt.save_as(opt_files[eye], enforce_file_format=True)
    return StudyFiles(out_dir, op_files, opt_files, study_uid)


def _patient_study(truth: SubjectTruth, study_uid: str, study_date: date, birth: date, seed: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = f"PHANTOM^{truth.subject_id}"
    ds.PatientID = truth.subject_id
    ds.IssuerOfPatientID = "GROK-PACS-PHANTOM"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = truth.sex
    ds.PatientAge = f"{truth.age:03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = f"{9 + int(study_uid[-2:]) % 8:02d}{int(study_uid[-4:-2]) % 60:02d}00"
    ds.StudyID = truth.subject_id[-8:]
    ds.AccessionNumber = f"PH{seed % 1000:03d}{truth.subject_id[-6:]}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic phantom eye study (CFP + OCT), not clinical data"
    ds.Manufacturer = "grok-pacs phantom"
    ds.InstitutionName = "grok-pacs phantom"
    ds.ManufacturerModelName = "training.phantom"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = "1"
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = SYNTHETIC_NOTE
    return ds


def _base(
    common: Dataset, sop_class: str, sop_uid: str, series_uid: str, modality: str, series_number: int, eye: str
) -> Dataset:
    ds = Dataset()
    ds.update(common)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = UID_PREFIX + "1"
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.SeriesDate = ds.ContentDate = common.StudyDate
    ds.SeriesTime = ds.ContentTime = common.StudyTime
    ds.AcquisitionDateTime = common.StudyDate + common.StudyTime
    ds.ImageLaterality = eye
    ds.AnatomicRegionSequence = Sequence([_code(EYE)])
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelRepresentation = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return ds


def _op_dataset(common: Dataset, truth: SubjectTruth, seed: int, eye: str, rgb: np.ndarray, number: int) -> Dataset:
    """Ophthalmic Photography 8 Bit: one colour JPEG baseline frame (YBR_FULL_422)."""
    sop_uid = _uid(seed, truth.subject_id, f"op-{eye}")
    ds = _base(
        common, OP_SOP_CLASS, sop_uid, _uid(seed, truth.subject_id, f"op-series-{eye}"), "OP", 1 + 2 * number, eye
    )
    ds.SeriesDescription = f"Colour fundus photograph {eye} (synthetic)"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.PatientOrientation = ""
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time (a single frame)
    ds.FrameTime = 0.0
    ds.SynchronizationFrameOfReferenceUID = _uid(seed, truth.subject_id, "synchronization")
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.PixelSpacing = [f"{1 / PX_PER_MM:.6f}", f"{1 / PX_PER_MM:.6f}"]
    ds.HorizontalFieldOfView = 45.0
    ds.PatientEyeMovementCommanded = "NO"
    ds.EmmetropicMagnification = 1.0
    ds.IntraOcularPressure = 15.0
    ds.PupilDilated = "YES"
    ds.DegreeOfDilation = 7.0
    ds.DetectorType = "CCD"
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code(FUNDUS_CAMERA)])
    for keyword in (
        "IlluminationTypeCodeSequence",
        "LightPathFilterTypeStackCodeSequence",
        "ImagePathFilterTypeStackCodeSequence",
        "LensesCodeSequence",
        "RefractiveStateSequence",
        "MydriaticAgentSequence",
    ):
        setattr(ds, keyword, Sequence())
    encoded = _jpeg(rgb)
    ds.LossyImageCompressionRatio = f"{rgb.nbytes / len(encoded):.2f}"
    ds.PixelData = encapsulate([encoded])
    ds["PixelData"].VR = "OB"
    return ds


def _opt_dataset(common: Dataset, truth: SubjectTruth, seed: int, eye: str, volume: np.ndarray, number: int) -> Dataset:
    """Ophthalmic Tomography: one multi-frame instance of B-scans (JPEG baseline frames)."""
    sop_uid = _uid(seed, truth.subject_id, f"opt-{eye}")
    ds = _base(
        common, OPT_SOP_CLASS, sop_uid, _uid(seed, truth.subject_id, f"opt-series-{eye}"), "OPT", 2 + 2 * number, eye
    )
    n = volume.shape[0]
    ds.SeriesDescription = f"Macular cube 6x6 mm {eye} (synthetic)"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "IDENTITY"
    ds.Rows, ds.Columns = OCT_HEIGHT, OCT_WIDTH
    ds.NumberOfFrames = n
    ds.FrameOfReferenceUID = _uid(seed, truth.subject_id, f"for-{eye}")
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDuration = 1.5
    # The OPT Image module makes these Type 1 (a single, unconcatenated instance: 0, 1, 1), although the
    # Multi-frame Functional Groups module calls them concatenation-only; dciodvfy reports that conflict.
    ds.ConcatenationFrameOffsetNumber = 0
    ds.InConcatenationNumber = 1
    ds.InConcatenationTotalNumber = 1
    ds.InstanceNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.AxialLengthOfTheEye = 23.5
    ds.HorizontalFieldOfView = 20.0
    ds.EmmetropicMagnification = 1.0
    ds.IntraOcularPressure = 15.0
    ds.PupilDilated = "YES"
    ds.DegreeOfDilation = 7.0
    ds.DetectorType = "CCD"
    ds.IlluminationWaveLength = 840.0
    ds.IlluminationPower = 0.7
    ds.IlluminationBandwidth = 50.0
    ds.DepthSpatialResolution = AXIAL_UM_PER_PX
    ds.MaximumDepthDistortion = 0.0
    ds.AlongScanSpatialResolution = LATERAL_UM_PER_PX
    ds.MaximumAlongScanDistortion = 0.0
    ds.AcrossScanSpatialResolution = SCAN_MM * 1000.0 / n
    ds.MaximumAcrossScanDistortion = 0.0
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code(OCT_SCANNER)])
    ds.AnatomicRegionSequence = Sequence([_code(RETINA)])
    for keyword in (
        "RefractiveStateSequence",
        "MydriaticAgentSequence",
        "AcquisitionContextSequence",
        "LightPathFilterTypeStackCodeSequence",
    ):
        setattr(ds, keyword, Sequence())
    _functional_groups(ds, n, _uid(seed, truth.subject_id, f"dimensions-{eye}"), eye)
    frames = [_jpeg(volume[k]) for k in range(n)]
    ds.LossyImageCompressionRatio = f"{volume.nbytes / sum(len(f) for f in frames):.2f}"
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def _functional_groups(ds: Dataset, n: int, dim_uid: str, eye: str) -> None:
    """Shared pixel measures/orientation; per-frame position (superior -> inferior) and dimension index."""
    measures = Dataset()
    measures.PixelSpacing = [f"{AXIAL_UM_PER_PX / 1000:.6f}", f"{LATERAL_UM_PER_PX / 1000:.6f}"]  # row, column mm
    measures.SliceThickness = f"{SCAN_MM / n:.6f}"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = Sequence([_code(RETINA)])
    anatomy.FrameLaterality = eye
    shared = Dataset()
    shared.FrameAnatomySequence = Sequence([anatomy])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    index = Dataset()
    index.DimensionOrganizationUID = dim_uid
    index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    index.DimensionDescriptionLabel = "B-scan (superior to inferior)"
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    ds.DimensionIndexSequence = Sequence([index])
    per_frame = []
    start = datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S")
    for k in range(n):
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [k + 1]
        stamp = (start + timedelta(milliseconds=60 * k)).strftime("%Y%m%d%H%M%S.%f")  # 60 ms per B-scan
        content.FrameAcquisitionDateTime = content.FrameReferenceDateTime = stamp
        content.FrameAcquisitionDuration = 60.0
        position = Dataset()
        position.ImagePositionPatient = [-SCAN_MM / 2, round(frame_y(k, n), 4), 0.0]
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
