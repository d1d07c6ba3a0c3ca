"""The knee MRI overlay Secondary Captures: dciodvfy, slices per plane, outlines where the structures are,
labels carried to the other planes, header, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from node.results.knee_codes import STRUCTURES_BY_KEY
from node.results.mri_render import outline, render_overlay, window
from node.results.mri_sc import build_overlay_scs, labels_on_plane, representative_slices
from node.results.render import plan_layout
from tests.results.helpers import dciodvfy_errors, decode, encode, write
from tests.results.mri_sources import knee_labels, labels_on, mri_study


def test_overlays_pass_dciodvfy_and_reference_their_slice(tmp_path):
    study = mri_study()
    scs = build_overlay_scs(study, 9001)
    assert len(scs) == 9, "three slices for each of three planes"
    slices = {str(ds.SOPInstanceUID): plane.plane for plane in study.planes for ds in plane.slices}
    planes = []
    for number, sc in enumerate(scs, start=1):
        path = write(sc, tmp_path / f"sc{number}.dcm")
        errors, _ = dciodvfy_errors(path)
        assert errors == [], errors
        back = decode(path.read_bytes())
        assert back.SOPClassUID == SecondaryCaptureImageStorage
        assert (int(back.SeriesNumber), int(back.InstanceNumber)) == (9001, 10000 + number)
        assert back.SeriesDescription == "AI HIGH knee segmentation overlay orthodiffusion-knee 0.2.0"
        reference = back.SourceImageSequence[0]
        planes.append(slices[str(reference.ReferencedSOPInstanceUID)])
        assert back.BurnedInAnnotation == "NO" and back.Laterality == "R" and back.BodyPartExamined == "KNEE"
        assert back.PatientID == "PID-MR-1" and back.StudyInstanceUID == study.study_instance_uid
    assert planes == ["sagittal"] * 3 + ["coronal"] * 3 + ["axial"] * 3
    assert len({sc.SeriesInstanceUID for sc in scs}) == 1
    assert [list(scs[i].PatientOrientation) for i in (0, 3, 6)] == [["P", "F"], ["L", "F"], ["L", "P"]]


def test_structure_outlines_are_drawn_in_their_colours():
    study = mri_study()
    grid = study.plane_series("sagittal")
    index = len(grid.slices) // 2
    labels = study.segmentation.labels[index]
    canvas = render_overlay(grid.volume[index], labels, study.segmentation.structures, "m", "1")
    layout = plan_layout(*(np.array(labels.shape) * 12))  # 40 px enlarged to 480
    image = canvas[layout.banner_rows: layout.banner_rows + layout.image_rows]
    for key in ("femur", "tibia", "acl"):
        structure = STRUCTURES_BY_KEY[key]
        expected = np.kron(labels == structure.label_value, np.ones((12, 12), dtype=bool))
        drawn = np.all(image == structure.colour, axis=-1)
        assert drawn.any(), key
        assert np.all(expected[drawn] | outline(expected)[drawn]), f"{key} drawn only on its own outline"
        assert drawn[outline(expected)].mean() > 0.5, f"most of the {key} outline is drawn"
    # Away from every outline the slice is its windowed grey.
    grey = np.kron(window(grid.volume[index]), np.ones((12, 12), dtype=np.uint8))
    big = np.kron(labels, np.ones((12, 12), dtype=labels.dtype))
    plain = ~np.any([outline(big == v) for v in range(1, 12)], axis=0)
    np.testing.assert_array_equal(image[plain][:, 0], grey[plain])


def test_labels_are_carried_to_the_other_planes():
    """Each voxel of another plane gets the shapes' label at the nearest voxel centre of the SEG's grid (computed
    here from the shapes themselves, not from the label array), and 0 outside that grid."""
    study = mri_study()
    grid = study.plane_series("sagittal")
    grid_affine = grid.index_to_patient()
    for plane in ("coronal", "axial"):
        target = study.plane_series(plane)
        carried = labels_on_plane(study, target)
        k, r, c = np.meshgrid(*(np.arange(n) for n in target.shape), indexing="ij")
        points = np.stack([k, r, c, np.ones_like(k)], axis=-1) @ target.index_to_patient().T
        nearest = np.rint(points @ np.linalg.inv(grid_affine).T)[..., :3]
        inside = np.all((nearest >= 0) & (nearest < np.array(grid.shape)), axis=-1)
        snapped = np.concatenate([nearest, np.ones(nearest.shape[:-1] + (1,))], axis=-1) @ grid_affine.T
        np.testing.assert_array_equal(carried[inside], knee_labels(snapped[..., :3])[inside])
        assert not carried[~inside].any() and (~inside).any() and carried.any(), plane
        # Nearest neighbour from a 4 mm x 2 mm grid: mostly the structure the shapes put there.
        truth = labels_on(target)
        drawn = inside & ((carried > 0) | (truth > 0))
        assert (carried[drawn] == truth[drawn]).mean() > 0.75, plane
    assert labels_on_plane(study, study.plane_series("sagittal")) is study.segmentation.labels


def test_representative_slices():
    labels = np.zeros((20, 4, 4), dtype=np.uint8)
    labels[5:15, 1, 1] = 1
    assert representative_slices(labels, 3) == [7, 9, 12]
    assert representative_slices(np.zeros((9, 2, 2), dtype=np.uint8), 3) == [4]
    labels = np.zeros((5, 2, 2), dtype=np.uint8)
    labels[2] = 1
    assert representative_slices(labels, 3) == [2]


def test_overlays_are_byte_identical_on_rebuild_and_need_pixels():
    first = [encode(sc) for sc in build_overlay_scs(mri_study(), 9001, per_plane=1)]
    assert [encode(sc) for sc in build_overlay_scs(mri_study(), 9001, per_plane=1)] == first
    study = mri_study()
    no_pixels = dataclasses.replace(study, planes=[dataclasses.replace(p, volume=None) for p in study.planes])
    with pytest.raises(ValueError, match="pixel volume"):
        build_overlay_scs(no_pixels, 9001)
    with pytest.raises(ValueError, match="no segmentation"):
        build_overlay_scs(dataclasses.replace(study, segmentation=None), 9001)


def whole_volume_labels(study, target) -> np.ndarray:
    """The resample as it was before #17's speed-up: every voxel of ``target`` at once (the reference)."""
    grid = study.plane_series(study.segmentation.plane)
    if target.plane == grid.plane:
        return study.segmentation.labels
    to_grid = np.linalg.inv(grid.index_to_patient()) @ target.index_to_patient()
    k, r, c = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in target.shape), indexing="ij")
    nearest = np.rint((np.stack([k, r, c, np.ones_like(k)], axis=-1) @ to_grid.T)[..., :3]).astype(np.int64)
    inside = np.all((nearest >= 0) & (nearest < np.array(grid.shape)), axis=-1)
    result = np.zeros(target.shape, dtype=study.segmentation.labels.dtype)
    picked = nearest[inside]
    result[inside] = study.segmentation.labels[picked[:, 0], picked[:, 1], picked[:, 2]]
    return result


@pytest.mark.parametrize("keep", ["all", "sparse", "none"])
def test_overlays_resampling_only_drawn_slices_are_byte_identical(keep):
    """The SCs resample only the slices they draw (plus a per-slice "shows a structure" check): the same bytes
    as SCs built from the whole label volume resampled onto each plane, for a full knee, a label volume with
    only a few labelled voxels near the grid's edge, and an empty one."""
    from node.results import mri_sc

    labels = labels_on(mri_study().plane_series("sagittal"))
    if keep == "sparse":
        sparse = np.zeros_like(labels)
        sparse[1:3, 2:5, 30:33] = labels.max()
        sparse[9, 20, 20] = 1
        labels = sparse
    elif keep == "none":
        labels = np.zeros_like(labels)
    study = mri_study(labels=labels)
    expected, position = [], 0
    for plane in study.ordered_planes:
        whole = whole_volume_labels(study, plane)
        np.testing.assert_array_equal(labels_on_plane(study, plane), whole)
        for index in representative_slices(whole, 3):
            position += 1
            expected.append(encode(mri_sc._build_one(study, plane, index, whole[index], 9001, position)))
    assert [encode(sc) for sc in build_overlay_scs(study, 9001)] == expected
