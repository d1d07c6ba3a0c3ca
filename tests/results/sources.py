"""Synthetic CR/DX source headers (no pixel data needed) and engine-like outputs for the result builders."""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.results.model import HeadOutput, ImageResult, ModelInfo, StudyResult

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
XA = "1.2.840.10008.5.1.4.1.1.12.1"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
CREATED_AT = datetime(2026, 11, 22, 10, 30, 15, 123000)


def source_header(
    number: int = 1,
    *,
    sop_class: str = DX,
    modality: str = "DX",
    rows: int = 2500,
    columns: int = 2048,
    study_uid: str = STUDY_UID,
    charset: str | list[str] | None = None,
    patient_name: str = "Doe^Jane",
    drop: tuple[str, ...] = (),
) -> Dataset:
    """A received radiograph header: Type 2 attributes present unless named in ``drop``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.2.{number}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = "PID-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-42"
    ds.StudyID = "S1"
    ds.StudyDate = "20261120"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.Manufacturer = "ACME Radiography"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.BodyPartExamined = "KNEE"
    ds.Laterality = "L"
    ds.PatientOrientation = ["A", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def model_info(**overrides) -> ModelInfo:
    values = dict(name="demo-mae", version="0.1.0", encoder_sha256="ab" * 32, passes=10, mask_ratio=0.75,
                  seed=1234, backend="torch-cpu")
    values.update(overrides)
    return ModelInfo(**values)


def heads() -> list[HeadOutput]:
    return [
        HeadOutput("fracture", ["fracture"], [0.8125], "sigmoid"),
        HeadOutput("tumour", ["none", "benign", "malignant"], [0.1, 0.7, 0.2], "softmax"),
        HeadOutput("kl_grade", ["0", "1", "2", "3", "4"], [0.05, 0.1, 0.15, 0.6, 0.1], "softmax"),
    ]


def display_and_map(source: Dataset, long_side: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey display image at the source aspect ratio and an error map with one hot spot."""
    rows, columns = int(source.Rows), int(source.Columns)
    scale = long_side / max(rows, columns)
    h, w = max(1, round(rows * scale)), max(1, round(columns * scale))
    rng = np.random.default_rng(seed)
    display = (np.linspace(0, 255, w)[None, :] * np.ones((h, 1))).astype(np.uint8)
    error = rng.random((h, w), dtype=np.float32) * 0.01
    error[h // 4: h // 2, w // 4: w // 2] += 0.5
    return display, error


REGION = np.array([[512.0, 625.0], [1024.0, 625.0], [1024.0, 1250.0], [512.0, 1250.0], [512.0, 625.0]])


def image_result(source: Dataset, *, score: float = 0.0123, percentile: float | None = 97.5,
                 region: np.ndarray | None = REGION, frame_index: int = 0) -> ImageResult:
    display, error = display_and_map(source)
    return ImageResult(source=source, score=score, percentile=percentile, heads=heads(), region=region,
                       display=display, error_map=error, frame_index=frame_index,
                       source_sha256=f"{int(source.InstanceNumber):064x}")


def study_result(images: list[ImageResult], not_analysed=(), priority: str = "HIGH", revision: int = 1,
                 **model) -> StudyResult:
    return StudyResult(study_instance_uid=STUDY_UID, images=images, not_analysed=list(not_analysed),
                       priority=priority, model=model_info(**model), created_at=CREATED_AT, revision=revision)


def new_uid() -> str:
    return generate_uid()
