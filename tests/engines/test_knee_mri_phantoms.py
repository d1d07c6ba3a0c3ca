"""Knee MRI phantoms: labelled anatomy, findings, contrasts, DICOM geometry that maps pixels to ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from engines.imaging.volume import assemble_volume, plane_of
from engines.training.knee_mri_phantoms import (
    ENHANCED_MR_IMAGE_STORAGE,
    FINDINGS,
    LABELS,
    MR_IMAGE_STORAGE,
    STRUCTURES,
    KneeModel,
    generate_study,
)
from tests.results.helpers import dciodvfy_errors

SIZE, SLICES = 64, 16
ALL_TEARS = ["acl_tear", "pcl_tear", "mm_tear", "lm_tear", "mcl_tear", "lcl_tear"]


@pytest.fixture(scope="module")
def normal():
    return generate_study(21, size=SIZE, slices=SLICES, profile_samples=1)


@pytest.fixture(scope="module")
def injured():
    return generate_study(21, ALL_TEARS + ["effusion"], size=SIZE, slices=SLICES, profile_samples=1)


def test_eleven_structures_with_stable_labels() -> None:
    assert len(STRUCTURES) == 11 and len(set(STRUCTURES)) == 11
    assert LABELS == {name: index + 1 for index, name in enumerate(STRUCTURES)}
    assert set(FINDINGS) == {"acl_tear", "pcl_tear", "mm_tear", "lm_tear", "mcl_tear", "lcl_tear", "pd", "effusion"}


def test_every_structure_appears_and_effusion_only_when_planted(normal, injured) -> None:
    present = set()
    for series in normal.series[1:]:
        present |= set(np.unique(series.labels).tolist())
    assert present == set(range(0, 11))  # all but effusion (11)
    assert (injured.by_name("sag_pd_fs").labels == LABELS["effusion"]).sum() > 100


def test_findings_have_masks_only_when_planted_and_sit_in_their_structure(normal, injured) -> None:
    assert all(not series.findings for series in normal.series)
    sagittal, coronal = injured.by_name("sag_pd_fs"), injured.by_name("cor_pd_fs")
    for name in ALL_TEARS + ["effusion"]:
        assert max(series.findings[name].sum() for series in (sagittal, coronal)) > 0, name
    labels = coronal.labels
    assert np.all(labels[coronal.findings["mm_tear"]] == LABELS["medial_meniscus"])
    assert np.all(labels[coronal.findings["lm_tear"]] == LABELS["lateral_meniscus"])
    assert np.mean(sagittal.labels[sagittal.findings["acl_tear"]] == LABELS["acl"]) > 0.5
    assert np.array_equal(sagittal.findings["effusion"], sagittal.labels == LABELS["effusion"])


def test_tears_and_effusion_are_bright_on_fat_saturated_pd(normal, injured) -> None:
    for name, structure in (("acl_tear", "acl"), ("mm_tear", "medial_meniscus"), ("pcl_tear", "pcl")):
        series = max((injured.by_name(n) for n in ("sag_pd_fs", "cor_pd_fs")), key=lambda s: s.findings[name].sum())
        torn = series.pixels[series.findings[name] & (series.labels == LABELS[structure])].mean()
        intact = normal.by_name(series.spec.name)
        healthy = intact.pixels[intact.labels == LABELS[structure]].mean()
        assert torn > 3 * healthy, name
    sagittal = injured.by_name("sag_pd_fs")
    fluid = sagittal.pixels[sagittal.labels == LABELS["effusion"]].mean()
    marrow = sagittal.pixels[sagittal.labels == LABELS["femur"]].mean()
    assert fluid > 5 * marrow
    t1 = injured.by_name("sag_t1")
    assert t1.pixels[t1.labels == LABELS["effusion"]].mean() < t1.pixels[t1.labels == LABELS["femur"]].mean()


def test_patellar_dislocation_moves_the_patella_laterally() -> None:
    points = np.stack(np.meshgrid(np.arange(-40, 41, 2.0), np.arange(-60, -30, 2.0), np.arange(20, 54, 2.0),
                                  indexing="ij"), -1)
    for findings, expected in (((), 0.0), (("pd",), -18.0)):
        labels, _, masks = KneeModel(seed=0, findings=findings).sample(points)
        centre_x = points[labels == LABELS["patella"]][:, 0].mean()
        assert centre_x == pytest.approx(expected, abs=1.5)  # right knee: lateral is the patient's right (-x)
    assert masks["pd"].any()


def test_pixels_and_labels_follow_the_dicom_geometry(injured) -> None:
    """The header geometry puts every voxel where the label volume says it is, in every plane."""
    for series in injured.series[1:]:
        volume = assemble_volume(series.datasets)
        np.testing.assert_array_equal(volume.array, series.pixels)
        np.testing.assert_allclose(volume.affine, series.affine, atol=1e-4)
        k, r, c = np.meshgrid(np.arange(SLICES), np.arange(SIZE), np.arange(SIZE), indexing="ij")
        points = volume.index_to_patient(np.stack([k, r, c], -1).astype(float))
        labels, _, _ = injured.model.sample(points)
        assert np.array_equal(labels, series.labels), series.spec.name
        orientation = series.datasets[0].ImageOrientationPatient
        assert plane_of(orientation, 1.0)[0] == series.spec.plane


def test_headers_share_the_frame_of_reference_and_say_what_they_are(injured) -> None:
    frames_of_reference = {ds.FrameOfReferenceUID for series in injured.series for ds in series.datasets}
    assert frames_of_reference == {injured.frame_of_reference_uid}
    series_uids = {series.series_instance_uid for series in injured.series}
    assert len(series_uids) == len(injured.series) == 5
    sagittal = injured.by_name("sag_pd_fs").datasets[0]
    assert sagittal.SOPClassUID == MR_IMAGE_STORAGE and sagittal.Modality == "MR"
    assert sagittal.ScanningSequence == "SE" and sagittal.SequenceVariant == "SK" and sagittal.ScanOptions == "FS"
    assert float(sagittal.SliceThickness) > 0 and float(sagittal.PixelSpacing[0]) == pytest.approx(160 / SIZE, abs=1e-5)
    t1 = injured.by_name("sag_t1").datasets[0]
    assert float(t1.RepetitionTime) < 900 and "FS" not in str(t1.get("ScanOptions", ""))
    localizer = injured.by_name("localizer").datasets
    assert len(localizer) == 3 and all("LOCALIZER" in ds.ImageType for ds in localizer)
    assert len({tuple(ds.ImageOrientationPatient) for ds in localizer}) == 3


def test_generation_is_deterministic() -> None:
    a = generate_study(4, ["lcl_tear"], size=24, slices=6, profile_samples=1)
    b = generate_study(4, ["lcl_tear"], size=24, slices=6, profile_samples=1)
    c = generate_study(5, ["lcl_tear"], size=24, slices=6, profile_samples=1)
    assert [ds.SOPInstanceUID for s in a.series for ds in s.datasets] == \
        [ds.SOPInstanceUID for s in b.series for ds in s.datasets]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a.series, b.series))
    assert a.study_instance_uid != c.study_instance_uid
    assert not np.array_equal(a.by_name("sag_pd_fs").pixels, c.by_name("sag_pd_fs").pixels)


def test_unknown_findings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown finding"):
        generate_study(0, ["meniscus_tear"], size=16, slices=4)


def test_written_files_pass_dciodvfy(injured, tmp_path) -> None:
    paths = injured.write(tmp_path / "classic")
    chosen = [p for p in paths if p.name == "0001.dcm"]  # the first instance of each series
    assert len(chosen) == 5
    enhanced = generate_study(21, ["acl_tear"], size=32, slices=8, profile_samples=1, enhanced=True)
    enhanced_paths = enhanced.write(tmp_path / "enhanced")
    multi_frame = [p for p in enhanced_paths if p.parent.name in ("sag_pd_fs", "ax_t2_fs")]
    assert all(enhanced.by_name(p.parent.name).datasets[0].SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
               for p in multi_frame)
    for path in chosen + multi_frame:
        errors, _ = dciodvfy_errors(path)
        assert errors == [], (path, errors)


def test_written_data_set_carries_ground_truth_per_series(tmp_path) -> None:
    import json

    import pydicom

    from engines.training.knee_mri_phantoms import write_studies

    index_path = write_studies(tmp_path, 2, seed=3, size=24, slices=8, p_finding=0.5, profile_samples=1)
    index = json.loads(index_path.read_text())
    assert len(index) == 2
    for row in index:
        folder = tmp_path / row["folder"]
        truth = json.loads((folder / "ground_truth.json").read_text())
        assert {name for name, present in truth["findings"].items() if present} == set(row["findings"])
        files = sorted((folder / "sag_pd_fs").glob("*.dcm"))
        volume = assemble_volume([pydicom.dcmread(path) for path in files])
        stored = np.load(folder / "sag_pd_fs.npz")
        assert stored["labels"].shape == volume.array.shape
        np.testing.assert_allclose(stored["affine"], volume.affine, atol=1e-4)
        assert {key[len("finding_"):] for key in stored.files if key.startswith("finding_")} == set(row["findings"])
