"""Inputs of the result builders: what the worker knows after the engine ran, as plain typed values.

The builders are pure functions of these objects (no clock, no randomness, no I/O), which is what makes a retry
produce byte-identical DICOM. Everything time-like therefore comes in through :attr:`StudyResult.created_at`,
which the worker must persist with the job (not take from ``now()`` on each attempt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

Activation = Literal["sigmoid", "softmax", "identity"]
PRIORITIES = ("ROUTINE", "HIGH", "URGENT")
# SC InstanceNumber = revision * SC_BLOCK + position must fit DICOM IS (2**31 - 1).
SC_BLOCK = 10_000
MAX_REVISION = (2**31 - 1) // SC_BLOCK - 1


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced the results, with the error-map parameters that make them reproducible.

    ``passes`` and ``mask_ratio`` are None (both) for a model without an error map (e.g. a DINOv3 encoder with
    heads): its algorithm identification then carries no error-map parameters."""

    name: str
    version: str
    encoder_sha256: str
    passes: int | None
    mask_ratio: float | None
    seed: int | None
    backend: str
    manufacturer: str = "msknode"

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("model name and version are required")
        if len(self.encoder_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.encoder_sha256):
            raise ValueError("encoder_sha256 must be 64 lower-case hex digits")
        if (self.passes is None) != (self.mask_ratio is None):
            raise ValueError("passes and mask_ratio are given together (error map) or both None (no error map)")
        if self.passes is not None and (self.passes < 1 or not 0.0 < self.mask_ratio < 1.0):
            raise ValueError("passes must be >= 1 and mask_ratio in (0, 1)")

    @property
    def has_error_map(self) -> bool:
        return self.passes is not None

    @property
    def identity(self) -> str:
        """One string naming these exact weights and error-map settings (feeds the deterministic UIDs)."""
        return f"{self.name}|{self.version}|{self.encoder_sha256}|{self.passes}|{self.mask_ratio!r}|{self.seed}"


@dataclass(frozen=True)
class HeadOutput:
    """One head's activated output on one image (binary sigmoid heads: one label and one probability).

    ``identity`` heads (engines allow them, e.g. a regression probe) report raw finite values, not probabilities.
    """

    name: str
    labels: list[str]
    probabilities: list[float]
    activation: Activation
    unit: str = ""  # UCUM code of an identity head's values (e.g. "a" for years); empty: "{value}"
    # The categorical result a model's own rule decided (e.g. a region-guided classifier's "present" / "malignant");
    # the SR writes it as a qualitative evaluation. None: softmax heads report their argmax, others nothing.
    finding: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ("sigmoid", "softmax", "identity"):
            raise ValueError(f"head {self.name!r}: activation must be sigmoid, softmax or identity")
        if not self.labels or len(self.labels) != len(self.probabilities):
            raise ValueError(f"head {self.name!r}: one value per label is required")
        for p in self.probabilities:
            if not math.isfinite(p):
                raise ValueError(f"head {self.name!r}: value {p!r} is not finite")
            if self.activation != "identity" and not 0.0 <= p <= 1.0:
                raise ValueError(f"head {self.name!r}: probability {p!r} outside [0, 1]")
        if self.finding is not None and not self.finding.strip():
            raise ValueError(f"head {self.name!r}: an empty finding")

    @property
    def top_label(self) -> str:
        """The most probable label (first one on ties, so the choice is stable)."""
        return self.labels[int(np.argmax(np.asarray(self.probabilities)))]


@dataclass(frozen=True, eq=False)
class ImageResult:
    """The engine's outputs for one analysed frame of one source instance.

    ``source`` is the received header (pixel data not needed and never copied). ``region`` is the closed
    highest-error outline in *source* pixel coordinates (column, row); ``display`` and ``error_map`` share one
    size: the source aspect ratio with the long side at most 2048 px. A model without an error map gives
    ``score``, ``error_map`` (and ``percentile``, ``region``) None: its group holds the heads' values only.
    """

    source: Dataset
    score: float | None
    percentile: float | None
    heads: list[HeadOutput]
    region: np.ndarray | None
    display: np.ndarray
    error_map: np.ndarray | None
    frame_index: int = 0
    source_sha256: str = ""  # hash of the stored instance; distinguishes a replaced instance with the same UID
    model: ModelInfo | None = None  # the model that produced this result; None: the study's model

    def __post_init__(self) -> None:
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError("score must be finite")
        if self.percentile is not None and not (math.isfinite(self.percentile) and 0.0 <= self.percentile <= 100.0):
            raise ValueError("percentile must be in [0, 100]")
        if self.display.ndim != 2 or self.display.dtype != np.uint8:
            raise ValueError("display must be a 2-D uint8 grey image")
        if self.error_map is not None and self.error_map.shape != self.display.shape:
            raise ValueError("error_map must have the display's shape")
        if max(self.display.shape) > 2048:
            raise ValueError("display long side must be <= 2048 px")
        if self.region is not None:
            region = np.asarray(self.region)
            if region.ndim != 2 or region.shape[1] != 2 or region.shape[0] < 2:
                raise ValueError("region must be an [N, 2] (column, row) array")
            if not np.all(np.isfinite(region)):
                raise ValueError("region coordinates must be finite")
        if self.frame_index < 0:
            raise ValueError("frame_index must be >= 0")


@dataclass(frozen=True)
class DocumentReference:
    """Identifiers of an SR sent earlier, enough to supersede it without its full dataset."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> DocumentReference:
        return cls(
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID),
            str(dataset.SOPClassUID),
        )


@dataclass(frozen=True, eq=False)
class StudyResult:
    """Everything the SR/SC builders need about one study's analysis."""

    study_instance_uid: str
    images: list[ImageResult]
    not_analysed: list[tuple[Dataset, str]]
    priority: str
    model: ModelInfo
    created_at: datetime
    node_name: str = "MSKNODE"
    # The study revision these results describe (the worker's job revision, >= 1). It numbers the objects so a
    # viewer that picks by InstanceNumber shows the newest: SR InstanceNumber = revision, SC = revision * 10000 + n.
    revision: int = 1

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}")
        if not 1 <= self.revision <= MAX_REVISION:
            raise ValueError(f"revision must be in 1..{MAX_REVISION}")
        seen = set()
        for image in self.images:
            key = (str(image.source.SOPInstanceUID), image.frame_index, self.model_of(image).identity)
            if key in seen:
                raise ValueError("one result per (image, frame, model)")
            seen.add(key)
        for image in self.images:
            if str(image.source.StudyInstanceUID) != self.study_instance_uid:
                raise ValueError("every analysed image must belong to the study")
        for source, reason in self.not_analysed:
            if str(source.StudyInstanceUID) != self.study_instance_uid:
                raise ValueError("every not-analysed instance must belong to the study")
            if not reason:
                raise ValueError("a reason is required for every not-analysed instance")

    def model_of(self, image: ImageResult) -> ModelInfo:
        """The model that produced ``image`` (several models may report on one image; default: the study's)."""
        return image.model if image.model is not None else self.model

    @property
    def models(self) -> list[ModelInfo]:
        """Every model with a result in this study, the study's model first, then by identity."""
        others = {self.model_of(im).identity: self.model_of(im) for im in self.images}
        others.pop(self.model.identity, None)
        return [self.model] + [others[key] for key in sorted(others)]
