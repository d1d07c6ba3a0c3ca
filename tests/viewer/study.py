"""The study the viewer tests show: two phantom knee CRs, our SR and SC built by node.results, in Part 10 bytes.

Image 1 has no region (its group outlines the whole image); image 2 has a lytic lesion whose outline is the
region, and a second model's whole-image group (several models on one image).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from pydicom.dataset import Dataset

from engines.training import phantoms
from node.results import build_not_analysed_sr, build_sc, build_sr
from node.results.model import DocumentReference, HeadOutput, ImageResult, ModelInfo, StudyResult
from node.results.uids import tracking_uid

MODEL = ModelInfo(name="demo-mae", version="0.1.0", encoder_sha256="ab" * 32, passes=10, mask_ratio=0.75, seed=0,
                  backend="torch-cpu/fp32")
SECOND_MODEL = ModelInfo(name="fracture-net", version="2.0", encoder_sha256="cd" * 32, passes=1, mask_ratio=0.5,
                         seed=0, backend="torch-cpu/fp32")


def part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def lesion_outline(mask: np.ndarray, margin: int = 6) -> np.ndarray:
    """A closed rectangle around the lesion, (column, row) in source pixels."""
    rows, columns = np.nonzero(mask)
    left, right = columns.min() - margin, columns.max() + margin
    top, bottom = rows.min() - margin, rows.max() + margin
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=np.float64)


@dataclass
class ViewerStudy:
    study_uid: str
    images: list[Dataset]  # the two CRs (with pixel data)
    region: np.ndarray  # image 2's region

    def result(self, revision: int, fracture: float, created_at: datetime) -> StudyResult:
        first, second = self.images
        results = []
        for source, region, probability in ((first, None, 0.05), (second, self.region, fracture)):
            display = (source.pixel_array.astype(np.float32) / 16).astype(np.uint8)
            error = np.zeros(display.shape, dtype=np.float32)
            if region is not None:
                (left, top), (right, bottom) = region.min(axis=0).astype(int), region.max(axis=0).astype(int)
                error[top:bottom, left:right] = 1.0
            results.append(ImageResult(
                source=source, score=0.0123, percentile=96.5 if region is not None else 41.0,
                heads=[HeadOutput("fracture", ["fracture"], [probability], "sigmoid"),
                       HeadOutput("kl_grade", ["0", "1", "2", "3", "4"], [0.1, 0.2, 0.4, 0.2, 0.1], "softmax")],
                region=region, display=display, error_map=error, source_sha256=f"{source.InstanceNumber:064x}",
            ))
        results.append(ImageResult(
            source=second, score=0.5, percentile=None, heads=[HeadOutput("fracture", ["fracture"], [0.125], "sigmoid")],
            region=None, display=results[1].display, error_map=results[1].error_map, model=SECOND_MODEL,
        ))
        return StudyResult(study_instance_uid=self.study_uid, images=results, not_analysed=[], priority="HIGH",
                           model=MODEL, created_at=created_at, revision=revision)

    def region_tracking_uid(self) -> str:
        return tracking_uid(self.study_uid, str(self.images[1].SOPInstanceUID), 0, f"image|{MODEL.name}")

    def objects(self, revision: int, fracture: float, created_at: datetime,
                previous: list[DocumentReference] | None = None) -> tuple[Dataset, list[Dataset]]:
        """(SR, SCs) of one result revision, as the worker builds them."""
        study = self.result(revision, fracture, created_at)
        sr = build_sr(study, 9000, previous)
        scs = [build_sc(image, study, 9001, position) for position, image in enumerate(study.images, start=1)
               if image.model is None]
        return sr, scs


def viewer_study(study_key: str = "ohif") -> ViewerStudy:
    plain = phantoms.generate("knee", seed=200)
    lesion = phantoms.generate("knee", seed=201, findings=("lytic",))
    images = [phantoms.to_dataset(phantom, patient_index=11, study_key=study_key, instance_number=number)
              for number, phantom in ((1, plain), (2, lesion))]
    images[1].SeriesInstanceUID = images[0].SeriesInstanceUID  # one series of two radiographs
    return ViewerStudy(str(images[0].StudyInstanceUID), images, lesion_outline(lesion.lesion_mask))


def not_analysed_study(study_key: str = "ohif-na") -> tuple[Dataset, Dataset]:
    """(a CR whose body part is not eligible, the not-analysed SR that says so)."""
    image = phantoms.to_dataset(phantoms.generate("knee", seed=300), patient_index=12, study_key=study_key)
    image.BodyPartExamined = "CHEST"
    study = StudyResult(study_instance_uid=str(image.StudyInstanceUID), images=[],
                        not_analysed=[(image, "body part CHEST not eligible")], priority="ROUTINE", model=MODEL,
                        created_at=datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc), revision=1)
    return image, build_not_analysed_sr(study, 9000)
