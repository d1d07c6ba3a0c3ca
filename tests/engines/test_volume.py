"""Volume assembly from MR series: order, geometry, every defect reported, classic and Enhanced MR alike."""

from __future__ import annotations

import copy
import io
import random

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from engines.imaging.volume import (
    FrameRef,
    VolumeError,
    assemble_volume,
    plan_volume,
    plane_of,
)
from engines.training.knee_mri_phantoms import generate_study

SIZE, SLICES = 40, 12


@pytest.fixture(scope="module")
def classic():
    return generate_study(5, ["acl_tear"], size=SIZE, slices=SLICES, profile_samples=1)


@pytest.fixture(scope="module")
def enhanced():
    return generate_study(5, ["acl_tear"], size=SIZE, slices=SLICES, profile_samples=1, enhanced=True)


def _copies(datasets: list[Dataset]) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in datasets]


def _codes(error: VolumeError) -> set[str]:
    return {problem.code for problem in error.problems}


def _header_only(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


@pytest.mark.parametrize("name", ["sag_pd_fs", "cor_pd_fs", "ax_t2_fs"])
def test_out_of_order_slices_are_sorted_along_the_normal(classic, name: str) -> None:
    series = classic.by_name(name)
    shuffled = _copies(series.datasets)
    random.Random(3).shuffle(shuffled)
    volume = assemble_volume(shuffled)
    assert volume.array.shape == (SLICES, SIZE, SIZE)
    np.testing.assert_array_equal(volume.array, series.pixels.astype(np.float32))
    normal = np.cross(*np.reshape(np.asarray(series.datasets[0].ImageOrientationPatient, float), (2, 3)))
    by_uid = {ds.SOPInstanceUID: ds for ds in series.datasets}
    along = [float(np.dot(np.asarray(by_uid[ref.sop_instance_uid].ImagePositionPatient, float), normal))
             for ref in volume.sources]
    assert along == sorted(along) and len(set(along)) == SLICES
    assert volume.spacing == pytest.approx((series.spec.spacing_between_slices_mm, *series.spec.pixel_spacing_mm))


def test_a_missing_slice_is_reported_not_stacked(classic) -> None:
    datasets = _copies(classic.by_name("sag_pd_fs").datasets)
    del datasets[5]
    with pytest.raises(VolumeError) as caught:
        assemble_volume(datasets)
    assert _codes(caught.value) == {"missing-slice"}
    assert "1 slice(s) missing" in str(caught.value)
    # the header-only plan gives the same verdict without pixels
    plan = plan_volume([_header_only(ds) for ds in datasets])
    assert [p.code for p in plan.problems] == ["missing-slice"]


def test_a_duplicate_position_is_reported(classic) -> None:
    datasets = _copies(classic.by_name("cor_pd_fs").datasets)
    twin = copy.deepcopy(datasets[4])
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    twin.InstanceNumber = 99
    datasets.append(twin)
    with pytest.raises(VolumeError) as caught:
        assemble_volume(datasets)
    assert "duplicate-position" in _codes(caught.value)
    assert "instance 99" in str(caught.value) or "instance 5" in str(caught.value)


def test_mixed_echoes_are_reported(classic) -> None:
    """A dual-echo acquisition stored as one series: both echoes at every position."""
    first = _copies(classic.by_name("ax_t2_fs").datasets)
    second = _copies(classic.by_name("ax_t2_fs").datasets)
    for index, ds in enumerate(second):
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = 100 + index
        ds.EchoTime = "95"
        ds.EchoNumbers = 2
    with pytest.raises(VolumeError) as caught:
        assemble_volume(first + second)
    assert "mixed-echoes" in _codes(caught.value)
    assert "echo times 75, 95 ms" in str(caught.value)


def test_a_localiser_is_reported(classic) -> None:
    plan = plan_volume(classic.by_name("localizer").datasets)
    codes = {problem.code for problem in plan.problems}
    assert {"localizer", "mixed-orientation"} <= codes
    with pytest.raises(VolumeError):
        assemble_volume(classic.by_name("localizer").datasets)


def test_a_localiser_image_type_alone_is_enough(classic) -> None:
    datasets = _copies(classic.by_name("sag_pd_fs").datasets)
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert [p.code for p in plan_volume(datasets).problems] == ["localizer"]


def test_mixed_orientation_is_reported(classic) -> None:
    datasets = _copies(classic.by_name("sag_pd_fs").datasets)
    angle = np.radians(10)
    datasets[3].ImageOrientationPatient = [0, np.cos(angle), np.sin(angle), 0, np.sin(angle), -np.cos(angle)]
    with pytest.raises(VolumeError) as caught:
        assemble_volume(datasets)
    assert _codes(caught.value) == {"mixed-orientation"}


def test_mixed_sizes_and_frames_of_reference_are_reported(classic) -> None:
    datasets = _copies(classic.by_name("sag_pd_fs").datasets)
    datasets[0].FrameOfReferenceUID = pydicom.uid.generate_uid()
    datasets[1].PixelSpacing = [1.0, 1.0]
    codes = {p.code for p in plan_volume(datasets).problems}
    assert {"mixed-frame-of-reference", "mixed-spacing"} <= codes


def test_a_sheared_stack_is_reported(classic) -> None:
    datasets = _copies(classic.by_name("sag_pd_fs").datasets)
    position = np.asarray(datasets[6].ImagePositionPatient, float) + np.array([0.0, 5.0, 0.0])  # 5 mm in-plane
    datasets[6].ImagePositionPatient = [f"{v:.4f}" for v in position]
    assert [p.code for p in plan_volume(datasets).problems] == ["sheared-stack"]


def test_a_single_slice_is_not_a_volume(classic) -> None:
    plan = plan_volume(classic.by_name("sag_pd_fs").datasets[:1])
    assert [p.code for p in plan.problems] == ["too-few-slices"]


@pytest.mark.parametrize("name", ["sag_pd_fs", "cor_pd_fs", "ax_t2_fs"])
def test_enhanced_mr_assembles_with_the_same_geometry_as_the_classic_series(classic, enhanced, name: str) -> None:
    classic_volume = assemble_volume(classic.by_name(name).datasets)
    multi_frame = enhanced.by_name(name).datasets
    assert len(multi_frame) == 1 and int(multi_frame[0].NumberOfFrames) == SLICES
    enhanced_volume = assemble_volume(multi_frame)
    np.testing.assert_allclose(enhanced_volume.affine, classic_volume.affine, atol=1e-4)
    np.testing.assert_array_equal(enhanced_volume.array, classic_volume.array)
    assert enhanced_volume.frame_of_reference_uid == classic_volume.frame_of_reference_uid
    assert [ref.frame_number for ref in enhanced_volume.sources] == list(range(1, SLICES + 1))


def test_enhanced_mr_frames_out_of_order_and_missing_are_handled(enhanced) -> None:
    ds = copy.deepcopy(enhanced.by_name("sag_pd_fs").datasets[0])
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    reversed_ds = copy.deepcopy(ds)
    reversed_ds.PerFrameFunctionalGroupsSequence = list(reversed(groups))
    plan = plan_volume([reversed_ds])
    assert plan.ok and [f.source.frame_number for f in plan.frames] == list(range(SLICES, 0, -1))
    twin = copy.deepcopy(ds)
    position = twin.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence[0]
    neighbour = twin.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0]
    position.ImagePositionPatient = list(neighbour.ImagePositionPatient)
    assert {p.code for p in plan_volume([twin]).problems} == {"duplicate-position", "missing-slice"}
    gap = copy.deepcopy(ds)
    del gap.PerFrameFunctionalGroupsSequence[4]
    assert [p.code for p in plan_volume([gap]).problems] == ["missing-slice"]


def _header_point(ds: Dataset, row: int, column: int, frame: int | None = None) -> np.ndarray:
    """A pixel's patient position straight from its header (PS3.3 C.7.6.2.1.1), independent of volume.py."""
    if frame is None:
        position, orientation, spacing = ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    else:
        shared = ds.SharedFunctionalGroupsSequence[0]
        position = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    o = np.asarray(orientation, float)
    return (np.asarray(position, float) + o[:3] * float(spacing[1]) * column + o[3:] * float(spacing[0]) * row)


@pytest.mark.parametrize("variant", ["classic", "enhanced"])
def test_geometry_round_trip_voxel_to_patient_to_source_frame(classic, enhanced, variant: str) -> None:
    study = classic if variant == "classic" else enhanced
    datasets = study.by_name("cor_pd_fs").datasets
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    volume = assemble_volume(list(reversed(datasets)))
    rng = np.random.default_rng(0)
    for _ in range(25):
        index = np.array([rng.integers(SLICES), rng.integers(SIZE), rng.integers(SIZE)])
        point = volume.index_to_patient(index)
        np.testing.assert_allclose(volume.patient_to_index(point), index, atol=1e-6)
        source = volume.source_at(point)
        assert source == volume.sources[index[0]]
        ds = by_uid[source.sop_instance_uid]
        np.testing.assert_allclose(_header_point(ds, index[1], index[2], source.frame_number), point, atol=1e-3)
        # the voxel value is that frame's stored pixel
        pixels = ds.pixel_array if source.frame_number is None else ds.pixel_array[source.frame_number - 1]
        assert volume.array[tuple(index)] == pixels[index[1], index[2]]
    with pytest.raises(ValueError, match="outside"):
        volume.source_at(volume.index_to_patient([SLICES + 3, 0, 0]))
    assert isinstance(volume.sources[0], FrameRef)


def test_same_voxels_at_the_same_places_as_highdicom(classic) -> None:
    """highdicom's own series-to-volume (its slice axis runs the other way) as the reference."""
    datasets = classic.by_name("sag_pd_fs").datasets
    ours = assemble_volume(datasets)
    reference = highdicom.get_volume_from_series(datasets, dtype=np.float32)
    grid = np.meshgrid(np.arange(SLICES), [0, 7, SIZE - 1], [0, 13, SIZE - 1], indexing="ij")
    indices = np.stack(grid, -1).reshape(-1, 3)
    points = ours.index_to_patient(indices)
    theirs = np.rint(reference.map_reference_to_indices(points)).astype(int)
    np.testing.assert_allclose(reference.map_indices_to_reference(theirs), points, atol=1e-3)
    assert np.array_equal(ours.array[tuple(indices.T)], reference.array[tuple(theirs.T)])
    as_highdicom = ours.to_highdicom()
    np.testing.assert_allclose(as_highdicom.map_indices_to_reference(indices), points, atol=1e-6)


def test_rescale_is_applied(classic) -> None:
    datasets = _copies(classic.by_name("sag_pd_fs").datasets)
    for ds in datasets:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2", "-10", "US"
    volume = assemble_volume(datasets)
    np.testing.assert_array_equal(volume.array, classic.by_name("sag_pd_fs").pixels.astype(np.float32) * 2 - 10)


def test_plane_classification_with_tolerance() -> None:
    def tilted(degrees: float) -> list[float]:
        a = np.radians(degrees)  # sagittal, rotated about the patient's z axis
        return [-np.sin(a), np.cos(a), 0.0, 0.0, 0.0, -1.0]

    assert plane_of(tilted(0), 20)[0] == "sagittal"
    assert plane_of(tilted(15), 20)[:1] == ("sagittal",)
    plane, angle, nearest = plane_of(tilted(30), 20)
    assert plane is None and nearest == "sagittal" and angle == pytest.approx(30, abs=1e-6)
    assert plane_of(tilted(30), 35)[0] == "sagittal"
    assert plane_of([1, 0, 0, 0, 1, 0], 10)[0] == "axial"
    assert plane_of([1, 0, 0, 0, 0, -1], 10)[0] == "coronal"


def test_legacy_converted_enhanced_mr_from_highdicom_assembles_like_the_classic_series(classic) -> None:
    """highdicom's own classic -> multi-frame conversion (its functional groups, not ours) as a second writer."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    datasets = classic.by_name("ax_t2_fs").datasets
    converted = LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=pydicom.uid.generate_uid(), series_number=40,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    buffer = io.BytesIO()
    converted.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    multi_frame = pydicom.dcmread(buffer)
    ours = assemble_volume([multi_frame])
    reference = assemble_volume(datasets)
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(ours.array, reference.array)
    assert {ref.frame_number for ref in ours.sources} == set(range(1, SLICES + 1))
