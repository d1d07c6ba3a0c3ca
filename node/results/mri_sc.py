"""Secondary Captures of representative MR slices with the knee segmentation outlined, for viewers that show
neither SEG nor SR.

The label volume lives on one plane's grid (the SEG's); slices of the other planes get its labels by
nearest-neighbour lookup in patient coordinates (same Frame of Reference), so every plane shows the same
structures. Per plane a few slices are chosen (evenly over the slices that show any structure, else the middle
slice), in one SC series per (study, model, inputs), InstanceNumber = revision x 10000 + position as for the
error-map SCs.
"""

from __future__ import annotations

import hashlib

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.results import codes
from node.results.headers import laterality, normalised
from node.results.mri_model import MRIStudyResult, PlaneSeries
from node.results.mri_render import render_overlay
from node.results.seg import mri_series_description, series_input_set
from node.results.sr import algorithm_equipment_item, freeze_timestamps
from node.results.uids import content_digest, instance_uid, sc_instance_number, series_uid

# LPS axes -> patient orientation letters for the positive direction (PS3.3 C.7.6.1.1.1).
_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def overlay_description(study: MRIStudyResult) -> str:
    return mri_series_description("knee segmentation overlay", study.priority, study.model.name,
                                  study.model.version)


def overlay_series_uid(study: MRIStudyResult, series_number: int) -> str:
    inputs = "\n".join(f"{plane.plane}:{series_input_set(plane)}" for plane in study.ordered_planes)
    return series_uid("mri-sc", study.study_instance_uid, study.model, inputs, series_number,
                      overlay_description(study))


class PlaneLabels:
    """The label volume as seen on ``target``'s grid (nearest neighbour in patient coordinates, 0 outside), one
    slice at a time.

    Why not resample the whole volume: the overlays draw ~3 slices per plane, and resampling 30 x 512 x 512
    voxels per plane was most of an MR job's result building. Which slices show a structure is decided per
    slice, skipping slices and rows whose grid positions cannot reach the bounding box of the labelled voxels;
    each computed slice goes through exactly the arithmetic of a whole-volume resample (one ``(columns, 4) @
    (4, 4)`` product per row), so the drawn labels, and the SCs, are the same bytes.
    """

    def __init__(self, study: MRIStudyResult, target: PlaneSeries) -> None:
        segmentation = study.segmentation
        if segmentation is None:
            raise ValueError("the study result has no segmentation")
        grid = study.plane_series(segmentation.plane)
        self.labels = segmentation.labels
        self.shape = target.shape
        self.same_grid = target.plane == grid.plane
        if self.same_grid:
            return
        if str(target.slices[0].FrameOfReferenceUID) != str(grid.slices[0].FrameOfReferenceUID):
            raise ValueError(f"{target.plane} and {grid.plane} series have different Frames of Reference")
        self.to_grid = np.linalg.inv(grid.index_to_patient()) @ target.index_to_patient()
        self.grid_shape = np.array(grid.shape)
        labelled = np.argwhere(self.labels)
        # Grid index box a voxel must round into to pick a label (rint: half a voxel, plus a margin).
        self.box = None if labelled.size == 0 else (labelled.min(axis=0) - 1.0, labelled.max(axis=0) + 1.0)

    def _reaches_box(self, k: int, rows: np.ndarray) -> np.ndarray:
        """Per row of slice ``k``: whether its grid positions (a segment, so its two ends bound it) may round
        into the labelled box."""
        assert self.box is not None
        low, high = self.box
        ends = []
        for column in (0.0, float(self.shape[2] - 1)):
            points = np.stack([np.full(rows.shape, float(k)), rows.astype(np.float64), np.full(rows.shape, column),
                               np.ones(rows.shape)], axis=-1) @ self.to_grid.T
            ends.append(points[:, :3])
        lower, upper = np.minimum(*ends), np.maximum(*ends)
        return np.all((upper >= low) & (lower <= high), axis=-1)

    def _rows(self, k: int, rows: np.ndarray) -> np.ndarray:
        """Labels of ``rows`` of slice ``k`` ([len(rows), columns]), as the whole-volume resample computes them."""
        kk, r, c = np.meshgrid(np.array([k], dtype=np.float64), rows.astype(np.float64),
                               np.arange(self.shape[2], dtype=np.float64), indexing="ij")
        indices = np.stack([kk, r, c, np.ones_like(kk)], axis=-1) @ self.to_grid.T
        nearest = np.rint(indices[..., :3]).astype(np.int64)
        inside = np.all((nearest >= 0) & (nearest < self.grid_shape), axis=-1)
        result = np.zeros(inside.shape, dtype=self.labels.dtype)
        picked = nearest[inside]
        result[inside] = self.labels[picked[:, 0], picked[:, 1], picked[:, 2]]
        return result[0]

    def slice(self, k: int) -> np.ndarray:
        """The labels of target slice ``k`` ([rows, columns])."""
        if self.same_grid:
            return self.labels[k]
        result = np.zeros(self.shape[1:], dtype=self.labels.dtype)
        if self.box is None:
            return result
        rows = np.arange(self.shape[1])
        rows = rows[self._reaches_box(k, rows)]
        if rows.size:
            result[rows] = self._rows(k, rows)
        return result

    def showing(self) -> np.ndarray:
        """Indices of the target slices showing any structure."""
        if self.same_grid:
            return np.flatnonzero(self.labels.reshape(self.labels.shape[0], -1).any(axis=1))
        if self.box is None:
            return np.zeros(0, dtype=np.int64)
        return np.array([k for k in range(self.shape[0]) if self._shows(k)], dtype=np.int64)

    def _shows(self, k: int, chunk: int = 32) -> bool:
        """Whether slice ``k`` shows a structure: its rows that may reach the labels, a few at a time, stopping
        at the first labelled pixel."""
        rows = np.arange(self.shape[1])
        rows = rows[self._reaches_box(k, rows)]
        return any(self._rows(k, rows[start:start + chunk]).any() for start in range(0, rows.size, chunk))


def labels_on_plane(study: MRIStudyResult, target: PlaneSeries) -> np.ndarray:
    """The label volume resampled (nearest neighbour, patient coordinates) onto ``target``'s whole grid; 0 outside."""
    on_plane = PlaneLabels(study, target)
    if on_plane.same_grid:
        return on_plane.labels
    return np.stack([on_plane.slice(k) for k in range(on_plane.shape[0])])


def spread_slices(showing: np.ndarray, slice_count: int, count: int) -> list[int]:
    """``count`` of the ``showing`` slice indices spread evenly (the middle of ``slice_count`` if none shows)."""
    if showing.size == 0:
        return [slice_count // 2]
    if showing.size <= count:
        return showing.tolist()
    positions = np.linspace(0, showing.size - 1, count + 2)[1:-1]
    return sorted({int(showing[int(round(p))]) for p in positions})


def representative_slices(labels: np.ndarray, count: int) -> list[int]:
    """``count`` slice indices spread evenly over the slices showing a structure (the middle one if none)."""
    showing = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    return spread_slices(showing, labels.shape[0], count)


def patient_orientation_of(source: Dataset) -> list[str]:
    """Row and column directions as the letter of each direction cosine's largest component."""
    cosines = [float(v) for v in source.ImageOrientationPatient]
    letters = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_LETTERS[axis][0] if vector[axis] > 0 else _LETTERS[axis][1])
    return letters


def build_overlay_scs(study: MRIStudyResult, series_number: int, per_plane: int = 3) -> list[hd.sc.SCImage]:
    """The overlay SCs of every plane (sagittal, coronal, axial order), ``per_plane`` slices each at most."""
    if study.segmentation is None:
        raise ValueError("the study result has no segmentation: nothing to outline")
    if per_plane < 1:
        raise ValueError("per_plane must be >= 1")
    result = []
    position = 0
    for plane in study.ordered_planes:
        if plane.volume is None:
            raise ValueError(f"{plane.plane}: the series' pixel volume is needed for the overlays")
        on_plane = PlaneLabels(study, plane)  # only the drawn slices are resampled in full
        for index in spread_slices(on_plane.showing(), plane.shape[0], per_plane):
            position += 1
            result.append(_build_one(study, plane, index, on_plane.slice(index), series_number, position))
    return result


def _build_one(study: MRIStudyResult, plane: PlaneSeries, index: int, labels: np.ndarray, series_number: int,
               position: int) -> hd.sc.SCImage:
    assert study.segmentation is not None and plane.volume is not None
    model = study.model
    source = normalised(plane.slices[index])
    pixels = render_overlay(plane.volume[index], labels, study.segmentation.structures, model.name, model.version)
    instance_number = sc_instance_number(study.revision, position)
    series = overlay_series_uid(study, series_number)
    digest = content_digest({
        "kind": "mri-sc",
        "source": str(source.SOPInstanceUID),
        **({"frame": plane.frame_of(index)} if plane.frame_of(index) is not None else {}),
        "source_sha256": plane.sha256[index] if plane.sha256 else "",
        "pixels": hashlib.sha256(pixels.tobytes()).hexdigest(),
        "shape": pixels.shape,
        "series_number": series_number,
        "instance_number": instance_number,
        "priority": study.priority,
        "created_at": study.created_at.isoformat(),
        "model": model.identity,
        "node": study.node_name,
    })
    orientation = patient_orientation_of(source)
    created = study.created_at
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series,
        series_number=series_number,
        sop_instance_uid=instance_uid("mri-sc", series, digest),
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        patient_orientation=tuple(orientation),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=overlay_description(study),
        coding_schemes=codes.coding_schemes(private_codes=False),
        manufacturer_model_name=model.name,
        software_versions=model.version,
        content_date=created.date(),
        content_time=created.time(),
        series_date=created.date(),
        series_time=created.time(),
    )
    sc.Laterality = laterality(source)
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.BurnedInAnnotation = "NO"
    sc.RecognizableVisualFeatures = "NO"
    sc.SourceImageSequence = [_source_reference(source, plane.frame_of(index))]
    sc.DerivationDescription = (
        f"Knee structures segmented by {model.name} {model.version} outlined on a {plane.plane} MR slice "
        f"(labels on the {study.segmentation.plane} grid, nearest neighbour); banner and legend burned in"
    )
    freeze_timestamps(sc, created)
    sc.ContributingEquipmentSequence.append(algorithm_equipment_item(model, created, study.node_name))
    return sc


def _source_reference(source: Dataset, frame: int | None = None) -> Dataset:
    purpose = Dataset()
    purpose.CodeValue = codes.SOURCE_IMAGE_PURPOSE.value
    purpose.CodingSchemeDesignator = codes.SOURCE_IMAGE_PURPOSE.scheme_designator
    purpose.CodeMeaning = codes.SOURCE_IMAGE_PURPOSE.meaning
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:  # a frame of an Enhanced MR instance
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item
