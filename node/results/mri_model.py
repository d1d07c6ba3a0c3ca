"""Inputs of the knee MRI result builders (SEG, findings SR, overlay SCs), as plain typed values.

Like :mod:`node.results.model`, these hold everything the builders need, so the builders stay pure functions
(no clock, no randomness, no I/O) and a retry builds byte-identical objects. The worker fills them after the
series selection (one series per plane, with the reason it was chosen) and the engine's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from node.results.knee_codes import FINDINGS_BY_LABEL, STRUCTURES, Structure
from node.results.model import MAX_REVISION, PRIORITIES, ModelInfo

Plane = Literal["sagittal", "coronal", "axial"]
PLANE_NAMES: tuple[Plane, ...] = ("sagittal", "coronal", "axial")


def _floats(dataset: Dataset, keyword: str, count: int) -> np.ndarray:
    value = dataset.get(keyword)
    if value is None or len(value) != count:
        raise ValueError(f"every slice needs {keyword} with {count} values")
    numbers = np.array([float(v) for v in value], dtype=np.float64)
    if not np.all(np.isfinite(numbers)):
        raise ValueError(f"{keyword} must be finite")
    return numbers


@dataclass(frozen=True, eq=False)
class PlaneSeries:
    """The series chosen for one plane: its slice headers in order along the slice normal (one per slice).

    ``sha256`` (one per slice, stored-instance hash) tells a replaced instance with the same UID apart in the
    deterministic UIDs; ``volume`` (the decoded pixel values, [slices, rows, columns]) is needed only for the
    overlay SCs; ``reason`` is the series-selection rule that chose it (written into the SR).

    An Enhanced MR series (one multi-frame instance) has ``multiframe``, that instance's header (without pixels),
    and ``frame_numbers``, the 1-based frame of each slice; its ``slices`` are then per-frame views
    (:func:`frame_view`) of that instance, so the builders reference (SOP instance, frame) pairs.
    """

    plane: Plane
    slices: list[Dataset]
    sha256: list[str] = field(default_factory=list)
    volume: np.ndarray | None = None
    reason: str = ""
    frame_numbers: list[int] = field(default_factory=list)
    multiframe: Dataset | None = None

    def __post_init__(self) -> None:
        if self.plane not in PLANE_NAMES:
            raise ValueError(f"plane must be one of {PLANE_NAMES}")
        if not self.slices:
            raise ValueError(f"{self.plane}: a series needs at least one slice")
        first = self.slices[0]
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
            values = {str(ds.get(keyword, "")) for ds in self.slices}
            if len(values) != 1 or values == {""}:
                raise ValueError(f"{self.plane}: every slice needs the same, non-empty {keyword}")
        if (self.multiframe is None) != (not self.frame_numbers):
            raise ValueError(f"{self.plane}: frame_numbers and the multi-frame header go together")
        if self.frame_numbers:
            if len(self.frame_numbers) != len(self.slices) or min(self.frame_numbers) < 1:
                raise ValueError(f"{self.plane}: one frame number (>= 1) per slice")
            if {str(ds.SOPInstanceUID) for ds in self.slices} != {str(self.multiframe.SOPInstanceUID)}:
                raise ValueError(f"{self.plane}: every slice must be a frame of the multi-frame instance")
        if len(set(self.references)) != len(self.slices):
            raise ValueError(f"{self.plane}: one header per slice (a SOP Instance UID / frame appears twice)")
        orientation = _floats(first, "ImageOrientationPatient", 6)
        for ds in self.slices:
            if not np.allclose(_floats(ds, "ImageOrientationPatient", 6), orientation, atol=1e-4):
                raise ValueError(f"{self.plane}: slices with different ImageOrientationPatient")
            _floats(ds, "PixelSpacing", 2)
        offsets = self.offsets
        if len(offsets) > 1:
            steps = np.diff(offsets)
            if not (np.all(steps > 1e-6) or np.all(steps < -1e-6)):
                raise ValueError(f"{self.plane}: slices are not sorted along the slice normal "
                                 "(or two share a position)")
        if self.sha256 and len(self.sha256) != len(self.slices):
            raise ValueError(f"{self.plane}: one sha256 per slice (or none)")
        if self.volume is not None and self.volume.shape != self.shape:
            raise ValueError(f"{self.plane}: volume shape {self.volume.shape} != slices x rows x columns {self.shape}")

    @property
    def series_instance_uid(self) -> str:
        return str(self.slices[0].SeriesInstanceUID)

    @property
    def references(self) -> list[tuple[str, int | None]]:
        """(SOP Instance UID, frame number or None for a single-frame instance) of each slice."""
        frames: list[int | None] = list(self.frame_numbers) or [None] * len(self.slices)
        return [(str(ds.SOPInstanceUID), frame) for ds, frame in zip(self.slices, frames)]

    def frame_of(self, index: int) -> int | None:
        """The frame number of slice ``index`` (None: a single-frame instance)."""
        return self.frame_numbers[index] if self.frame_numbers else None

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.slices), int(self.slices[0].Rows), int(self.slices[0].Columns)

    @property
    def normal(self) -> np.ndarray:
        orientation = _floats(self.slices[0], "ImageOrientationPatient", 6)
        return np.cross(orientation[:3], orientation[3:])

    @property
    def offsets(self) -> np.ndarray:
        """Each slice's position along the slice normal (mm)."""
        return np.array([float(_floats(ds, "ImagePositionPatient", 3) @ self.normal) for ds in self.slices])

    @property
    def slice_spacing(self) -> float:
        """Distance between slice centres (mm): from the positions; one slice: SpacingBetweenSlices or thickness."""
        if len(self.slices) > 1:
            return float(np.median(np.abs(np.diff(self.offsets))))
        first = self.slices[0]
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(keyword)
            if value not in (None, "") and float(value) > 0:
                return float(value)
        raise ValueError(f"{self.plane}: one slice without SpacingBetweenSlices or SliceThickness: no voxel depth")

    @property
    def voxel_volume_mm3(self) -> float:
        row_spacing, column_spacing = _floats(self.slices[0], "PixelSpacing", 2)
        return float(row_spacing * column_spacing * self.slice_spacing)

    def index_to_patient(self) -> np.ndarray:
        """4x4 affine from (slice, row, column) indices to patient coordinates (mm, LPS)."""
        orientation = _floats(self.slices[0], "ImageOrientationPatient", 6)
        row_spacing, column_spacing = _floats(self.slices[0], "PixelSpacing", 2)
        origin = _floats(self.slices[0], "ImagePositionPatient", 3)
        if len(self.slices) > 1:
            last = _floats(self.slices[-1], "ImagePositionPatient", 3)
            step = (last - origin) / (len(self.slices) - 1)
        else:
            step = self.normal * self.slice_spacing
        affine = np.eye(4)
        affine[:3, 0] = step
        affine[:3, 1] = orientation[3:] * row_spacing  # down a column: the column direction cosines
        affine[:3, 2] = orientation[:3] * column_spacing  # along a row
        affine[:3, 3] = origin
        return affine


@dataclass(frozen=True)
class FindingResult:
    """One classifier label's probability on the study (all planes together) and the threshold that calls it."""

    label: str
    probability: float
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.label not in FINDINGS_BY_LABEL:
            raise ValueError(f"unknown finding label {self.label!r}: add it to node/results/knee_codes.py")
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise ValueError(f"{self.label}: probability {self.probability!r} outside [0, 1]")
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"{self.label}: threshold {self.threshold!r} outside (0, 1]")

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """The model's label volume on the grid of one plane's series: 0 background, else a structure's label value.

    ``structures`` are the segments the SEG describes, in segment-number order; a structure the model did not
    find stays a described, empty segment (readers then know it was looked for).
    """

    plane: Plane
    labels: np.ndarray
    structures: tuple[Structure, ...] = STRUCTURES

    def __post_init__(self) -> None:
        if self.labels.ndim != 3 or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError("labels must be a 3-D integer array [slices, rows, columns]")
        if not self.structures:
            raise ValueError("at least one structure is described")
        values = [structure.label_value for structure in self.structures]
        if len(set(values)) != len(values) or min(values) < 1:
            raise ValueError("structure label values must be distinct and >= 1")
        found = set(np.unique(self.labels).tolist()) - {0}
        unknown = found - set(values)
        if unknown:
            raise ValueError(f"label values {sorted(unknown)} have no structure description")

    def voxel_counts(self) -> dict[int, int]:
        """Voxels per described label value (0 for an empty segment)."""
        largest = max(structure.label_value for structure in self.structures)
        counts = np.bincount(self.labels.ravel().astype(np.int64), minlength=largest + 1)
        return {structure.label_value: int(counts[structure.label_value]) for structure in self.structures}


@dataclass(frozen=True, eq=False)
class MRIStudyResult:
    """Everything the knee MRI builders need about one study's analysis."""

    study_instance_uid: str
    planes: list[PlaneSeries]
    findings: list[FindingResult]
    segmentation: SegmentationResult | None
    model: ModelInfo
    created_at: datetime
    priority: str = "ROUTINE"
    node_name: str = "MSKNODE"
    revision: int = 1

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}")
        if not 1 <= self.revision <= MAX_REVISION:
            raise ValueError(f"revision must be in 1..{MAX_REVISION}")
        if not self.planes:
            raise ValueError("at least one plane's series is required")
        names = [series.plane for series in self.planes]
        if len(set(names)) != len(names):
            raise ValueError("one series per plane")
        for series in self.planes:
            if str(series.slices[0].StudyInstanceUID) != self.study_instance_uid:
                raise ValueError(f"{series.plane}: the series must belong to the study")
        labels = [FINDINGS_BY_LABEL[finding.label].label for finding in self.findings]  # aliases included
        if len(set(labels)) != len(labels):
            raise ValueError("one result per finding label")
        if self.segmentation is not None:
            grid = self.plane_series(self.segmentation.plane)
            if self.segmentation.labels.shape != grid.shape:
                raise ValueError(f"label volume {self.segmentation.labels.shape} is not on the {grid.plane} series' "
                                 f"grid {grid.shape}")

    def plane_series(self, plane: str) -> PlaneSeries:
        for series in self.planes:
            if series.plane == plane:
                return series
        raise ValueError(f"no {plane} series in this result")

    @property
    def ordered_planes(self) -> list[PlaneSeries]:
        """Sagittal, coronal, axial (whichever are present): one order whatever the caller's."""
        return sorted(self.planes, key=lambda series: PLANE_NAMES.index(series.plane))


_PER_FRAME_ONLY = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PixelData",
                   "FloatPixelData", "DoubleFloatPixelData")


def _group_item(shared: Dataset | None, per_frame: Dataset, sequence: str) -> Dataset | None:
    """A functional group's macro item: the per-frame one overrides the shared one (PS3.3 C.7.6.16)."""
    for group in (per_frame, shared):
        if group is not None and group.get(sequence):
            return group.get(sequence)[0]
    return None


def frame_view(dataset: Dataset, frame_number: int) -> Dataset:
    """One frame of a multi-frame (Enhanced MR) header as a single-slice header: the instance's attributes with
    that frame's position, orientation and pixel measures (and frame laterality) in their classic keywords.

    The builders read a slice's geometry, patient / study attributes and UIDs from it; the (SOP, frame) pair it
    stands for is the series' ``frame_numbers``."""
    groups = dataset.get("PerFrameFunctionalGroupsSequence")
    if not groups or not 1 <= frame_number <= len(groups):
        raise ValueError(f"frame {frame_number} is not in the instance's per-frame functional groups")
    shared_groups = dataset.get("SharedFunctionalGroupsSequence")
    shared, per_frame = (shared_groups[0] if shared_groups else None), groups[frame_number - 1]
    view = Dataset()
    view.file_meta = getattr(dataset, "file_meta", Dataset())
    for element in dataset:
        if element.keyword not in _PER_FRAME_ONLY:
            view.add(element)
    for sequence, keywords in (("PlanePositionSequence", ("ImagePositionPatient",)),
                               ("PlaneOrientationSequence", ("ImageOrientationPatient",)),
                               ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"))):
        item = _group_item(shared, per_frame, sequence)
        for keyword in keywords:
            if item is not None and keyword in item:
                setattr(view, keyword, item[keyword].value)
    anatomy = _group_item(shared, per_frame, "FrameAnatomySequence")
    if anatomy is not None and str(anatomy.get("FrameLaterality", "")).upper() in ("R", "L"):
        view.ImageLaterality = str(anatomy.FrameLaterality).upper()
    return view
