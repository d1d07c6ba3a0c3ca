"""A 3-D volume from one MR series, with its geometry, or the reasons it cannot be built.

Why: a 3-D model (a knee MRI family) needs the slices of a series stacked in the right order with the
right spacing, and its outputs (segmentations, findings) must map back to the source frames. Stacking files
in arrival or instance-number order silently produces wrong volumes when a slice is missing, two frames
share a position, echoes are interleaved or a localiser sneaks in; so the plan below checks every frame's
geometry first and reports each problem with its reason instead of stacking.

Two steps, so header-only callers (series selection) get the same verdict without decoding pixels:

- :func:`plan_volume` reads headers only (classic per-slice MR, or Enhanced / Legacy Converted Enhanced MR
  with per-frame functional groups; a header read with ``stop_before_pixels`` is enough) and returns a
  :class:`VolumePlan`: frames sorted by position along the slice normal, the geometry, the plane, problems.
- :func:`assemble_volume` decodes the frames of a plan without problems into a :class:`Volume`.

Conventions (PS3.3 C.7.6.2.1.1): Image Orientation (Patient) is the row direction (along a row, increasing
column index) then the column direction (down a column, increasing row index); Pixel Spacing is (between
rows, between columns). The volume's array is ``[slice, row, column]``; ``affine`` maps those indices
(voxel centres) to patient coordinates (LPS, mm). The slice axis is the normal ``row x column``, and
slices are sorted so that their position along it increases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from engines.imaging.decode import PreprocessError, decode_frame

PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")

#: The patient axis each plane's slice normal runs along (LPS: x to the left, y to the back, z to the head).
PLANE_AXES: dict[str, tuple[float, float, float]] = {
    "sagittal": (1.0, 0.0, 0.0),
    "coronal": (0.0, 1.0, 0.0),
    "axial": (0.0, 0.0, 1.0),
}


class VolumeError(Exception):
    """A series that cannot be assembled; ``problems`` says why, one :class:`Problem` each (no PHI)."""

    def __init__(self, problems: Sequence["Problem"]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(problem.message for problem in self.problems))


@dataclass(frozen=True)
class Problem:
    """One reason a series is not a clean volume: a stable ``code`` for programs and a ``message`` for people."""

    code: str  # no-geometry, localizer, mixed-orientation, mixed-size, mixed-spacing, mixed-frame-of-reference,
    #            mixed-echoes, too-few-slices, duplicate-position, missing-slice, uneven-spacing, sheared-stack
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class FrameRef:
    """Where a slice came from: the instance and, for a multi-frame instance, its frame (1-based)."""

    sop_instance_uid: str
    frame_number: int | None = None  # None: a single-frame instance

    def to_dict(self) -> dict[str, Any]:
        return {"sop_instance_uid": self.sop_instance_uid, "frame_number": self.frame_number}


@dataclass(frozen=True)
class FrameHeader:
    """What the geometry checks need of one frame, from classic attributes or functional groups alike."""

    source: FrameRef
    rows: int
    columns: int
    position: tuple[float, ...] | None  # 3 values
    orientation: tuple[float, ...] | None  # 6 values: row direction, column direction
    pixel_spacing: tuple[float, ...] | None  # 2 values: between rows, between columns
    slice_thickness: float | None
    frame_of_reference_uid: str | None
    image_type: tuple[str, ...]
    echo_time: float | None
    echo_number: int | None
    instance_number: int | None
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept) to modality values


@dataclass(frozen=True)
class Tolerances:
    """How far real headers may stray from ideal geometry before it is a problem (defaults suit MR)."""

    orientation: float = 1e-3  # max abs difference of direction cosines between frames
    pixel_spacing_mm: float = 1e-3
    duplicate_fraction: float = 0.1  # frames closer than this fraction of the slice spacing share a position
    gap_fraction: float = 1.5  # a step longer than this many slice spacings means missing slices
    spacing_fraction: float = 0.05  # steps may differ from the median by this fraction
    in_plane_fraction: float = 0.5  # in-plane drift of positions, in pixels, before the stack is sheared


# ---------------------------------------------------------------------------------------------------------
# Reading frame headers
# ---------------------------------------------------------------------------------------------------------


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _item(group: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in a functional-group item, or None."""
    if group is None:
        return None
    value = group.get(sequence)
    return value[0] if value else None


def _group_attribute(shared: Dataset | None, per_frame: Dataset | None, sequence: str) -> Dataset | None:
    """A functional group's macro item: the per-frame one overrides the shared one (PS3.3 C.7.6.16)."""
    return _item(per_frame, sequence) or _item(shared, sequence)


def _image_type(dataset: Dataset, keyword: str = "ImageType") -> tuple[str, ...]:
    value = dataset.get(keyword)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.upper(),)
    return tuple(str(v).upper() for v in value)


def frame_headers(dataset: Dataset) -> list[FrameHeader]:
    """One :class:`FrameHeader` per frame of ``dataset`` (classic MR, or a functional-group multi-frame)."""
    sop = str(dataset.get("SOPInstanceUID", ""))
    rows, columns = _int(dataset.get("Rows")) or 0, _int(dataset.get("Columns")) or 0
    frame_of_reference = dataset.get("FrameOfReferenceUID")
    image_type = _image_type(dataset)
    instance_number = _int(dataset.get("InstanceNumber"))
    per_frame_groups = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame_groups is None:
        echo_numbers = dataset.get("EchoNumbers")
        if echo_numbers is not None and not isinstance(echo_numbers, (int, str)):
            echo_numbers = echo_numbers[0] if len(echo_numbers) else None
        return [FrameHeader(
            source=FrameRef(sop, None),
            rows=rows, columns=columns,
            position=_floats(dataset.get("ImagePositionPatient"), 3),
            orientation=_floats(dataset.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(dataset.get("PixelSpacing"), 2),
            slice_thickness=_float(dataset.get("SliceThickness")),
            frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
            image_type=image_type,
            echo_time=_float(dataset.get("EchoTime")),
            echo_number=_int(echo_numbers),
            instance_number=instance_number,
            rescale=(_float(dataset.get("RescaleSlope")) or 1.0, _float(dataset.get("RescaleIntercept")) or 0.0),
        )]
    shared_groups = dataset.get("SharedFunctionalGroupsSequence")
    shared = shared_groups[0] if shared_groups else None
    frames = []
    for index, per_frame in enumerate(per_frame_groups):
        position = _group_attribute(shared, per_frame, "PlanePositionSequence")
        orientation = _group_attribute(shared, per_frame, "PlaneOrientationSequence")
        measures = _group_attribute(shared, per_frame, "PixelMeasuresSequence")
        echo = _group_attribute(shared, per_frame, "MREchoSequence")
        frame_type = _group_attribute(shared, per_frame, "MRImageFrameTypeSequence")
        transform = _group_attribute(shared, per_frame, "PixelValueTransformationSequence")
        frames.append(FrameHeader(
            source=FrameRef(sop, index + 1),
            rows=rows, columns=columns,
            position=_floats(position.get("ImagePositionPatient") if position else None, 3),
            orientation=_floats(orientation.get("ImageOrientationPatient") if orientation else None, 6),
            pixel_spacing=_floats(measures.get("PixelSpacing") if measures else None, 2),
            slice_thickness=_float(measures.get("SliceThickness")) if measures else None,
            frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
            image_type=_image_type(frame_type, "FrameType") if frame_type is not None and "FrameType" in frame_type
            else image_type,
            echo_time=_float(echo.get("EffectiveEchoTime")) if echo else None,
            echo_number=None,
            instance_number=instance_number,
            rescale=(
                (_float(transform.get("RescaleSlope")) or 1.0, _float(transform.get("RescaleIntercept")) or 0.0)
                if transform else (1.0, 0.0)
            ),
        ))
    return frames


# ---------------------------------------------------------------------------------------------------------
# Planes
# ---------------------------------------------------------------------------------------------------------


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal ``row x column`` of an Image Orientation (Patient)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    column = np.asarray(orientation[3:6], dtype=np.float64)
    normal = np.cross(row, column)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise ValueError("row and column directions are parallel")
    return normal / length


def plane_of(orientation: Sequence[float], tolerance_degrees: float) -> tuple[str | None, float, str]:
    """(plane or None when oblique beyond tolerance, angle to the nearest plane's axis in degrees, that plane)."""
    normal = slice_normal(orientation)
    angles = {name: math.degrees(math.acos(min(1.0, abs(float(np.dot(normal, axis))))))
              for name, axis in PLANE_AXES.items()}
    nearest = min(angles, key=lambda name: angles[name])
    angle = angles[nearest]
    return (nearest if angle <= tolerance_degrees else None), angle, nearest


# ---------------------------------------------------------------------------------------------------------
# Planning (headers only)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumePlan:
    """The frames of a series in slice order with their geometry, and every problem found."""

    frames: tuple[FrameHeader, ...]
    problems: tuple[Problem, ...]
    affine: np.ndarray | None = None  # 4x4 [slice, row, column, 1] -> patient (mm); None when geometry failed
    frame_of_reference_uid: str | None = None
    shape: tuple[int, int, int] | None = None
    slice_positions: tuple[float, ...] = field(default_factory=tuple)  # along the normal, mm, increasing

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """(between slices, between rows, between columns) in mm."""
        if self.affine is None:
            return None
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> tuple[float, ...] | None:
        return self.frames[0].orientation if self.frames else None


def _mixed(values: Iterable[Any]) -> list[Any]:
    distinct: list[Any] = []
    for value in values:
        if value not in distinct:
            distinct.append(value)
    return distinct


def _describe_frame(frame: FrameHeader) -> str:
    if frame.source.frame_number is not None:
        return f"frame {frame.source.frame_number}"
    if frame.instance_number is not None:
        return f"instance {frame.instance_number}"
    return "an instance"


def plan_volume(datasets: Sequence[Dataset], tolerances: Tolerances = Tolerances()) -> VolumePlan:
    """Sort the frames of one series along the slice normal and check that they form one clean volume."""
    frames = [frame for dataset in datasets for frame in frame_headers(dataset)]
    problems: list[Problem] = []
    if not frames:
        return VolumePlan((), (Problem("too-few-slices", "the series has no frames"),))

    localizers = [f for f in frames if "LOCALIZER" in f.image_type]
    if localizers:
        problems.append(Problem("localizer", f"{len(localizers)} of {len(frames)} frames are localizers "
                                             "(Image Type LOCALIZER)"))
    missing = [f for f in frames if f.position is None or f.orientation is None or f.pixel_spacing is None]
    if missing:
        problems.append(Problem("no-geometry", f"{len(missing)} of {len(frames)} frames lack Image Position, "
                                               "Image Orientation or Pixel Spacing"))
        return VolumePlan(tuple(frames), tuple(problems))

    first = frames[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    orientation0 = np.asarray(first.orientation)
    off = [f for f in frames if np.max(np.abs(np.asarray(f.orientation) - orientation0)) > tolerances.orientation]
    if off:
        count = len(_mixed(tuple(round(v, 3) for v in f.orientation or ()) for f in frames))
        problems.append(Problem("mixed-orientation", f"frames have {count} different orientations "
                                                     f"({len(off)} of {len(frames)} differ from the first)"))
    sizes = _mixed((f.rows, f.columns) for f in frames)
    if len(sizes) > 1:
        problems.append(Problem("mixed-size", "frames have different sizes: "
                                              + ", ".join(f"{r}x{c}" for r, c in sizes)))
    step = tolerances.pixel_spacing_mm
    spacings = _mixed(tuple(round(v / step) * step for v in f.pixel_spacing or ()) for f in frames)
    if len(spacings) > 1:
        problems.append(Problem("mixed-spacing", "frames have different pixel spacings: "
                                                 + ", ".join(f"{r:g}/{c:g} mm" for r, c in spacings)))
    references = _mixed(f.frame_of_reference_uid for f in frames)
    if len(references) > 1:
        problems.append(Problem("mixed-frame-of-reference",
                                f"frames are in {len(references)} frames of reference"))
    echo_times = _mixed(round(f.echo_time, 2) for f in frames if f.echo_time is not None)
    echo_numbers = _mixed(f.echo_number for f in frames if f.echo_number is not None)
    if len(echo_times) > 1 or len(echo_numbers) > 1:
        described = (", ".join(f"{t:g}" for t in sorted(echo_times)) + " ms") if len(echo_times) > 1 else \
            ", ".join(str(n) for n in sorted(echo_numbers))
        what = "echo times" if len(echo_times) > 1 else "echo numbers"
        problems.append(Problem("mixed-echoes", f"frames from {max(len(echo_times), len(echo_numbers))} echoes "
                                                f"are mixed ({what} {described})"))
    if off or len(sizes) > 1:
        return VolumePlan(tuple(frames), tuple(problems))  # no single grid to sort onto

    normal = slice_normal(first.orientation)
    row_direction = orientation0[:3] / np.linalg.norm(orientation0[:3])
    column_direction = orientation0[3:6] / np.linalg.norm(orientation0[3:6])
    along = np.array([float(np.dot(f.position, normal)) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    if len(frames) < 2:
        problems.append(Problem("too-few-slices", "a volume needs at least 2 slices; the series has 1"))
        return VolumePlan(tuple(frames), tuple(problems))

    steps = np.diff(along)
    positive = steps[steps > 1e-6]
    nominal = float(np.median(positive)) if positive.size else 0.0
    if nominal <= 0:
        problems.append(Problem("duplicate-position", f"all {len(frames)} frames share one position"))
        return VolumePlan(tuple(frames), tuple(problems))
    duplicates = [i for i, step in enumerate(steps) if step < tolerances.duplicate_fraction * nominal]
    if duplicates:
        where = ", ".join(f"{_describe_frame(frames[i])} and {_describe_frame(frames[i + 1])} at {along[i]:.2f} mm"
                          for i in duplicates[:5])
        problems.append(Problem("duplicate-position", f"{len(duplicates)} duplicate slice position(s): {where}"))
    gaps = [(i, step) for i, step in enumerate(steps) if step > tolerances.gap_fraction * nominal]
    if gaps:
        total = sum(max(1, round(step / nominal) - 1) for _, step in gaps)
        where = ", ".join(f"{max(1, round(step / nominal) - 1)} between {along[i]:.2f} and {along[i + 1]:.2f} mm"
                          for i, step in gaps[:5])
        problems.append(Problem("missing-slice", f"{total} slice(s) missing (spacing {nominal:.3g} mm): {where}"))
    regular = [step for i, step in enumerate(steps) if i not in duplicates and all(i != g for g, _ in gaps)]
    uneven = [step for step in regular if abs(step - nominal) > tolerances.spacing_fraction * nominal]
    if uneven:
        problems.append(Problem("uneven-spacing", f"slice spacing varies from {min(regular):.3g} to "
                                                  f"{max(regular):.3g} mm (more than "
                                                  f"{tolerances.spacing_fraction:.0%} of {nominal:.3g} mm)"))
    position0 = np.asarray(frames[0].position)
    drift = max(
        max(abs(float(np.dot(np.asarray(f.position) - position0, row_direction))) / first.pixel_spacing[1],
            abs(float(np.dot(np.asarray(f.position) - position0, column_direction))) / first.pixel_spacing[0])
        for f in frames
    )
    if drift > tolerances.in_plane_fraction:
        problems.append(Problem("sheared-stack", f"slice positions drift {drift:.2f} pixels in-plane "
                                                 "(not stacked along the slice normal)"))

    affine = np.eye(4)
    affine[:3, 0] = normal * nominal
    affine[:3, 1] = column_direction * first.pixel_spacing[0]
    affine[:3, 2] = row_direction * first.pixel_spacing[1]
    affine[:3, 3] = position0
    return VolumePlan(
        frames=tuple(frames),
        problems=tuple(problems),
        affine=affine,
        frame_of_reference_uid=first.frame_of_reference_uid,
        shape=(len(frames), first.rows, first.columns),
        slice_positions=tuple(float(v) for v in along),
    )


# ---------------------------------------------------------------------------------------------------------
# The volume
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """Voxels ``[slice, row, column]`` (float32 modality values), their geometry and each slice's source."""

    array: np.ndarray
    affine: np.ndarray  # 4x4: (slice, row, column, 1) voxel centres -> patient coordinates (LPS, mm)
    frame_of_reference_uid: str | None
    sources: tuple[FrameRef, ...]  # one per slice

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(between slices, between rows, between columns) in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """Patient position of voxel [0, 0, 0]'s centre (the first slice's Image Position)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def directions(self) -> np.ndarray:
        """Unit vectors of the slice, row and column index axes, as the columns of a 3x3 matrix."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    def index_to_patient(self, indices: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map ``[..., 3]`` (slice, row, column) indices to patient coordinates (mm)."""
        points = np.asarray(indices, dtype=np.float64)
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, points: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map ``[..., 3]`` patient coordinates to fractional (slice, row, column) indices."""
        coords = np.asarray(points, dtype=np.float64) - self.affine[:3, 3]
        return coords @ np.linalg.inv(self.affine[:3, :3]).T

    def source_at(self, point: Sequence[float]) -> FrameRef:
        """The source frame of the slice nearest to a patient-coordinate point (outputs back to source frames)."""
        slice_index = int(round(float(self.patient_to_index(point)[0])))
        if not 0 <= slice_index < len(self.sources):
            raise ValueError(f"point is outside the volume (slice index {slice_index} of {len(self.sources)})")
        return self.sources[slice_index]

    def to_highdicom(self) -> Any:
        """The same voxels and geometry as a :class:`highdicom.Volume` (for building Segmentations)."""
        import highdicom

        return highdicom.Volume(self.array, self.affine, "PATIENT", self.frame_of_reference_uid)


def assemble_volume(datasets: Sequence[Dataset], tolerances: Tolerances = Tolerances()) -> Volume:
    """Decode one series into a :class:`Volume`; raises :class:`VolumeError` listing every problem found."""
    plan = plan_volume(datasets, tolerances)
    if not plan.ok or plan.affine is None or plan.shape is None:
        raise VolumeError(plan.problems or (Problem("no-geometry", "the series has no usable geometry"),))
    by_uid = {str(dataset.get("SOPInstanceUID", "")): dataset for dataset in datasets}
    array = np.empty(plan.shape, dtype=np.float32)
    for slice_index, frame in enumerate(plan.frames):
        dataset = by_uid[frame.source.sop_instance_uid]
        frame_index = 0 if frame.source.frame_number is None else frame.source.frame_number - 1
        try:
            pixels = decode_frame(dataset, frame_index, allow_reduced=False).pixels
        except PreprocessError as exc:
            raise VolumeError([Problem("undecodable", f"{_describe_frame(frame)}: {exc.reason}")]) from exc
        if pixels.ndim != 2:
            raise VolumeError([Problem("not-greyscale", f"{_describe_frame(frame)} is not a greyscale frame")])
        slope, intercept = frame.rescale
        array[slice_index] = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return Volume(array, plan.affine.copy(), plan.frame_of_reference_uid, tuple(f.source for f in plan.frames))
