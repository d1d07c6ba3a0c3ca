"""A synthetic 3-plane knee MR study for the MRI result builders: pydicom headers with pixel data, and a label
volume drawn from simple shapes in patient coordinates (so every plane sees the same anatomy).

Independent of engines/training (the builders' tests must not depend on the phantom generator).
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from node.results.mri_model import FindingResult, MRIStudyResult, PlaneSeries, SegmentationResult
from node.results.model import ModelInfo

STUDY_UID = "1.2.826.0.1.3680043.8.498.71"
FRAME_OF_REFERENCE = "1.2.826.0.1.3680043.8.498.72"
CREATED_AT = datetime(2026, 12, 2, 9, 15, 30, 250000)

# (row direction cosines, column direction cosines): LPS patient axes.
ORIENTATIONS = {
    "sagittal": ([0.0, 1.0, 0.0], [0.0, 0.0, -1.0]),
    "coronal": ([1.0, 0.0, 0.0], [0.0, 0.0, -1.0]),
    "axial": ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
}
SERIES_NUMBERS = {"sagittal": 3, "coronal": 4, "axial": 5}
LABEL_VALUES = {"femur": 1, "tibia": 2, "patella": 3, "femoral_cartilage": 4, "tibial_cartilage": 5,
                "patellar_cartilage": 6, "medial_meniscus": 7, "lateral_meniscus": 8, "acl": 9, "pcl": 10,
                "collateral_ligaments": 11}


def knee_labels(points: np.ndarray, with_collaterals: bool = False) -> np.ndarray:
    """Label value at patient points [..., 3] (mm, LPS; knee centre at 0): bones, cartilage, menisci, cruciates."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    radius = np.hypot(x, y)
    labels = np.zeros(points.shape[:-1], dtype=np.uint8)
    inside = radius < 22
    labels[inside & (z > 5)] = LABEL_VALUES["femur"]
    labels[inside & (z > 2) & (z <= 5)] = LABEL_VALUES["femoral_cartilage"]
    labels[inside & (z < -5)] = LABEL_VALUES["tibia"]
    labels[inside & (z >= -5) & (z < -2)] = LABEL_VALUES["tibial_cartilage"]
    patella = (np.abs(x) < 10) & (np.abs(z - 10) < 7)
    labels[patella & (y < -28) & (y > -36)] = LABEL_VALUES["patella"]
    labels[patella & (y >= -28) & (y < -25)] = LABEL_VALUES["patellar_cartilage"]
    band = (z >= -2) & (z <= 2) & (radius > 12) & (radius < 22)
    labels[band & (x > 0)] = LABEL_VALUES["medial_meniscus"]
    labels[band & (x < 0)] = LABEL_VALUES["lateral_meniscus"]
    cruciate = (z >= -2) & (z <= 2) & (np.abs(x) < 4)
    labels[cruciate & (y > -8) & (y < -2)] = LABEL_VALUES["acl"]
    labels[cruciate & (y > 2) & (y < 8)] = LABEL_VALUES["pcl"]
    if with_collaterals:
        labels[(np.abs(z) < 6) & (np.abs(x) > 22) & (np.abs(x) < 26) & (np.abs(y) < 4)] = \
            LABEL_VALUES["collateral_ligaments"]
    return labels


def plane_series(plane: str, *, slices: int = 12, size: int = 40, spacing: float = 2.0,
                 slice_spacing: float = 4.0, study_uid: str = STUDY_UID, reverse: bool = False) -> PlaneSeries:
    """One plane's series centred on the knee: headers (with pixel data) sorted along the slice normal."""
    row_cosines, column_cosines = (np.array(v) for v in ORIENTATIONS[plane])
    normal = np.cross(row_cosines, column_cosines)
    number = SERIES_NUMBERS[plane]
    half = (size - 1) * spacing / 2.0
    headers, images = [], []
    order = range(slices - 1, -1, -1) if reverse else range(slices)
    for index in order:
        offset = (index - (slices - 1) / 2.0) * slice_spacing
        origin = -half * row_cosines - half * column_cosines + offset * normal
        rows, columns = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        points = (origin + rows[..., None] * spacing * column_cosines + columns[..., None] * spacing * row_cosines)
        labels = knee_labels(points)
        image = (200 + 300 * (labels > 0) + 40 * labels).astype(np.uint16)
        ds = _header(plane, number, len(headers) + 1, origin, row_cosines, column_cosines, size, spacing,
                     slice_spacing, study_uid)
        ds.PixelData = image.tobytes()
        headers.append(ds)
        images.append(image)
    return PlaneSeries(plane=plane, slices=headers, sha256=[f"{number:02d}{i:062x}" for i in range(len(headers))],
                       volume=np.stack(images), reason=f"{plane} PD-weighted series (test)")


def _header(plane: str, series_number: int, instance: int, origin: np.ndarray, row_cosines: np.ndarray,
            column_cosines: np.ndarray, size: int, spacing: float, slice_spacing: float, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = f"{study_uid}.3.{series_number}.{instance}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = f"{study_uid}.4.{series_number}"
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    ds.PositionReferenceIndicator = ""
    ds.Modality = "MR"
    ds.PatientName = "Knee^Test"
    ds.PatientID = "PID-MR-1"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "M"
    ds.AccessionNumber = "ACC-MR-7"
    ds.StudyID = "MR1"
    ds.StudyDate = "20261201"
    ds.StudyTime = "083000"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "ACME MR"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"PD {plane}"
    ds.InstanceNumber = instance
    ds.BodyPartExamined = "KNEE"
    ds.Laterality = "R"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 3000
    ds.EchoTime = 30
    ds.EchoTrainLength = 8
    ds.SliceThickness = slice_spacing * 0.9
    ds.SpacingBetweenSlices = slice_spacing
    ds.ImagePositionPatient = [float(f"{v:.4f}") for v in origin]
    ds.ImageOrientationPatient = [float(v) for v in (*row_cosines, *column_cosines)]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def labels_on(series: PlaneSeries, with_collaterals: bool = False) -> np.ndarray:
    """The shapes' labels at the voxel centres of ``series`` (the model's label volume on that grid)."""
    affine = series.index_to_patient()
    k, r, c = np.meshgrid(*(np.arange(n) for n in series.shape), indexing="ij")
    indices = np.stack([k, r, c, np.ones_like(k)], axis=-1).astype(np.float64)
    points = indices @ affine.T
    return knee_labels(points[..., :3], with_collaterals=with_collaterals)


def mri_model_info(**overrides) -> ModelInfo:
    values = dict(name="orthodiffusion-knee", version="0.2.0", encoder_sha256="cd" * 32, passes=None,
                  mask_ratio=None, seed=None, backend="torch-cpu")
    values.update(overrides)
    return ModelInfo(**values)


PROBABILITIES = {"ACL": 0.91, "PCL": 0.04, "MM": 0.62, "LM": 0.12, "MCL": 0.30, "LCL": 0.02, "PD": 0.07,
                 "EFFU": 0.55}


def findings(probabilities: dict[str, float] | None = None) -> list[FindingResult]:
    return [FindingResult(label, p) for label, p in (probabilities or PROBABILITIES).items()]


def mri_study(*, planes: tuple[str, ...] = ("sagittal", "coronal", "axial"),
              segmentation_plane: str | None = "sagittal", labels: np.ndarray | None = None,
              priority: str = "HIGH", revision: int = 1, probabilities: dict[str, float] | None = None,
              study_uid: str = STUDY_UID, **model) -> MRIStudyResult:
    series = [plane_series(plane, study_uid=study_uid) for plane in planes]
    segmentation = None
    if segmentation_plane is not None:
        grid = next(s for s in series if s.plane == segmentation_plane)
        segmentation = SegmentationResult(plane=segmentation_plane,
                                          labels=labels_on(grid) if labels is None else labels)
    return MRIStudyResult(study_instance_uid=study_uid, planes=series, findings=findings(probabilities),
                          segmentation=segmentation, model=mri_model_info(**model), created_at=CREATED_AT,
                          priority=priority, revision=revision)
