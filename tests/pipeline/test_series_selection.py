"""Series selection for an MR study: one series per plane by the [mri] rules, every decision with its reason."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from engines.training.knee_mri_phantoms import SeriesSpec, default_protocol, generate_study
from node.pipeline.series_selection import SelectionReport, select_series
from node.settings import MriSettings, parse_settings

SIZE, SLICES = 32, 12


@pytest.fixture(scope="module")
def study():
    return generate_study(11, ["mm_tear", "effusion"], size=SIZE, slices=SLICES, profile_samples=1)


def _headers(study) -> dict[str, list[Dataset]]:
    return {series.series_instance_uid: [copy.deepcopy(ds) for ds in series.datasets] for series in study.series}


def _header_only(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


def _rejected(report: SelectionReport, description: str) -> list[str]:
    return [reason.code for d in report.rejected if d.facts.description == description for reason in d.reasons]


def _renamed(datasets: list[Dataset], number: int, description: str) -> list[Dataset]:
    """The same images as another series (new UIDs, number, description)."""
    series_uid = pydicom.uid.generate_uid()
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesNumber = number
        ds.SeriesDescription = description
        out.append(ds)
    return out


def test_default_rules_choose_fat_saturated_pd_t2_per_plane_and_reject_localiser_and_t1(study) -> None:
    headers = {uid: [_header_only(ds) for ds in datasets] for uid, datasets in _headers(study).items()}
    report = select_series(headers, MriSettings())
    assert report.complete
    assert {plane: d.facts.description for plane, d in report.chosen.items()} == {
        "sagittal": "SAG PD FS TSE", "coronal": "COR PD FS TSE", "axial": "AX T2 FS TSE"}
    assert report.series_for("sagittal") == study.by_name("sag_pd_fs").series_instance_uid
    sagittal = report.chosen["sagittal"]
    assert dict(sagittal.matched_rules) == {"fat-saturated": 4, "proton-density": 3, "long-tr": 1}
    assert sagittal.facts.fat_saturated and sagittal.facts.slices == SLICES
    assert {"image-type", "description", "mixed-orientation"} <= set(_rejected(report, "3-PLANE LOC"))
    t1 = [d for d in report.rejected if d.facts.description == "SAG T1 TSE"]
    assert [r.code for r in t1[0].reasons] == ["score"]
    assert "below mri.min_score" in t1[0].reasons[0].message and "t1-weighted" in t1[0].reasons[0].message
    assert len(report.rejected) == 2


def test_the_report_is_json_serialisable_with_reasons(study) -> None:
    report = select_series(_headers(study), MriSettings())
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == {"chosen", "rejected", "missing_planes"}
    assert data["chosen"]["axial"]["chosen"] is True and data["chosen"]["axial"]["reasons"] == []
    for rejected in data["rejected"]:
        assert rejected["chosen"] is False and rejected["reasons"]
        assert all(reason["message"] and reason["code"] for reason in rejected["reasons"])


def test_t1_alone_in_its_plane_leaves_the_plane_missing_with_a_reason() -> None:
    protocol = [spec for spec in default_protocol(SIZE, SLICES, localizer=False) if spec.name != "sag_pd_fs"]
    report = select_series(_headers(generate_study(2, protocol=protocol, profile_samples=1)), MriSettings())
    assert set(report.chosen) == {"coronal", "axial"}
    assert "sagittal" in report.missing_planes and not report.complete
    assert _rejected(report, "SAG T1 TSE") == ["score"]


def test_among_equal_scores_the_series_with_more_slices_wins() -> None:
    spec = SeriesSpec("sag_pd_fs", "sagittal", "pd_fs", rows=SIZE, columns=SIZE, slices=SLICES, series_number=2,
                      description="SAG PD FS TSE")
    shorter = SeriesSpec("sag_pd_fs_short", "sagittal", "pd_fs", rows=SIZE, columns=SIZE, slices=SLICES - 1,
                         series_number=7, description="SAG PD FS TSE")
    report = select_series(_headers(generate_study(3, protocol=[shorter, spec], profile_samples=1)),
                           MriSettings(planes=["sagittal"]))
    assert report.chosen["sagittal"].facts.series_number == 2
    (loser,) = report.rejected
    assert loser.facts.series_number == 7 and loser.reasons[0].code == "not-preferred"
    assert "more slices (12 vs 11)" in loser.reasons[0].message


def test_a_higher_score_wins_over_slice_count(study) -> None:
    headers = _headers(study)
    sagittal = headers[study.by_name("sag_pd_fs").series_instance_uid]
    no_fat_sat = _renamed(sagittal, 12, "SAG PD TSE")
    for ds in no_fat_sat:
        ds.ScanOptions = ""
    headers[no_fat_sat[0].SeriesInstanceUID] = no_fat_sat
    report = select_series(headers, MriSettings())
    assert report.chosen["sagittal"].facts.description == "SAG PD FS TSE"
    (loser,) = [d for d in report.rejected if d.facts.series_number == 12]
    assert loser.score == 4 and "scores higher (8 vs 4)" in loser.reasons[0].message


def test_rules_come_from_the_configuration(study) -> None:
    settings = parse_settings({"mri": {"min_score": 0, "rules": [
        {"name": "t1-please", "score": 5, "series_description": "t1", "planes": ["sagittal"]},
    ]}}, resolve_hosts=False)
    report = select_series(_headers(study), settings.mri)
    assert report.chosen["sagittal"].facts.description == "SAG T1 TSE"
    assert dict(report.chosen["sagittal"].matched_rules) == {"t1-please": 5}
    assert _rejected(report, "SAG PD FS TSE") == ["not-preferred"]


def test_scanning_sequence_variant_image_type_and_ranges_are_conditions(study) -> None:
    settings = MriSettings(rules=[
        {"name": "se-sk", "score": 1, "scanning_sequence": ["se"], "sequence_variant": ["SK"]},
        {"name": "te", "score": 10, "echo_time_ms": (60, 100)},
        {"name": "original", "score": 1, "image_type": ["ORIGINAL", "PRIMARY"]},
        {"name": "many-slices", "score": 1, "slices": (SLICES, 1000)},
        {"name": "gradient", "score": 100, "scanning_sequence": ["GR"]},
    ])
    report = select_series(_headers(study), settings)
    assert dict(report.chosen["axial"].matched_rules) == {"se-sk": 1, "te": 10, "original": 1, "many-slices": 1}
    assert dict(report.chosen["coronal"].matched_rules) == {"se-sk": 1, "original": 1, "many-slices": 1}


def _rotated(datasets: list[Dataset], degrees: float) -> list[Dataset]:
    """The series tilted about the patient's z axis (a consistent, oblique stack)."""
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        o = np.asarray(ds.ImageOrientationPatient, float)
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*rotation @ o[:3], *rotation @ o[3:])]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in rotation @ np.asarray(ds.ImagePositionPatient, float)]
        out.append(ds)
    return out


def test_an_oblique_series_is_rejected_beyond_the_configured_tolerance(study) -> None:
    headers = _headers(study)
    uid = study.by_name("sag_pd_fs").series_instance_uid
    headers[uid] = _rotated(headers[uid], 30)
    strict = select_series(headers, MriSettings(plane_tolerance_degrees=20))
    assert "sagittal" in strict.missing_planes
    (oblique,) = [d for d in strict.rejected if d.facts.series_instance_uid == uid]
    assert [r.code for r in oblique.reasons] == ["oblique"]
    assert "30.0 degrees from the sagittal axis (mri.plane_tolerance_degrees = 20)" in oblique.reasons[0].message
    lenient = select_series(headers, MriSettings(plane_tolerance_degrees=35))
    assert lenient.series_for("sagittal") == uid
    assert lenient.chosen["sagittal"].facts.plane_angle_degrees == pytest.approx(30, abs=1e-3)


def test_a_series_with_a_missing_slice_loses_to_a_clean_one(study) -> None:
    headers = _headers(study)
    clean = headers[study.by_name("cor_pd_fs").series_instance_uid]
    broken = _renamed(clean, 13, "COR PD FS TSE")
    del broken[4]
    broken_uid = broken[0].SeriesInstanceUID
    headers = {broken_uid: broken, **headers}  # first in order, and would win a tie on series number otherwise
    report = select_series(headers, MriSettings(min_slices=5))
    assert report.series_for("coronal") == study.by_name("cor_pd_fs").series_instance_uid
    (rejected,) = [d for d in report.rejected if d.facts.series_instance_uid == broken_uid]
    assert [r.code for r in rejected.reasons] == ["missing-slice"]
    assert "1 slice(s) missing" in rejected.reasons[0].message


def test_duplicate_positions_and_mixed_echoes_are_rejected(study) -> None:
    headers = _headers(study)
    axial = headers[study.by_name("ax_t2_fs").series_instance_uid]
    second_echo = _renamed(axial, 4, "AX T2 FS TSE")
    for ds in second_echo:
        ds.SeriesInstanceUID = axial[0].SeriesInstanceUID
        ds.EchoTime, ds.EchoNumbers = "110", 2
    headers[axial[0].SeriesInstanceUID] = axial + second_echo
    report = select_series(headers, MriSettings())
    assert {"duplicate-position", "mixed-echoes"} <= set(_rejected(report, "AX T2 FS TSE"))
    assert "axial" in report.missing_planes


def test_too_few_slices_and_other_modalities_are_rejected(study) -> None:
    headers = _headers(study)
    coronal = headers[study.by_name("cor_pd_fs").series_instance_uid]
    for ds in coronal:
        ds.Modality = "CT"
    report = select_series(headers, MriSettings(min_slices=SLICES + 1))
    assert _rejected(report, "COR PD FS TSE") == ["modality", "too-few-slices"]
    assert report.chosen == {}


def test_fat_saturation_from_the_description_when_scan_options_are_silent(study) -> None:
    headers = _headers(study)
    for ds in headers[study.by_name("sag_pd_fs").series_instance_uid]:
        del ds.ScanOptions
    report = select_series(headers, MriSettings())
    assert report.chosen["sagittal"].facts.fat_saturated
    assert "fat-saturated" in dict(report.chosen["sagittal"].matched_rules)


def test_enhanced_mr_series_are_selected_from_their_functional_groups() -> None:
    enhanced = generate_study(11, size=SIZE, slices=SLICES, profile_samples=1, enhanced=True)
    headers = _headers(enhanced)
    report = select_series(headers, MriSettings())
    assert {plane: d.facts.description for plane, d in report.chosen.items()} == {
        "sagittal": "SAG PD FS TSE", "coronal": "COR PD FS TSE", "axial": "AX T2 FS TSE"}
    axial = report.chosen["axial"].facts
    assert axial.fat_saturated and axial.repetition_time_ms == 4200 and axial.echo_time_ms == 75
    assert axial.scanning_sequence == ("SE",) and axial.slices == SLICES
    # header says so, not the description
    for ds in headers[enhanced.by_name("sag_pd_fs").series_instance_uid]:
        ds.SeriesDescription = "SAG PD"
    assert select_series(headers, MriSettings()).chosen["sagittal"].facts.fat_saturated


def test_mri_settings_errors_name_the_key() -> None:
    from node.settings import ConfigError

    for data, key in (
        ({"plane_tolerance_degrees": 0}, "mri.plane_tolerance_degrees"),
        ({"rules": [{"name": "x", "score": 1, "series_description": "(("}]}, "mri.rules[0].series_description"),
        ({"rules": [{"name": "x", "score": 1, "echo_time_ms": [90, 10]}]}, "mri.rules[0].echo_time_ms"),
        ({"rules": [{"name": "x", "score": 1}, {"name": "x", "score": 2}]}, "mri.rules"),
        ({"planes": ["sagittal", "sagittal"]}, "mri.planes"),
        ({"excluded_series_descriptions": ["["]}, "mri.excluded_series_descriptions"),
        ({"rules": [{"name": "x", "score": 1, "colour": "red"}]}, "mri.rules[0].colour"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_settings({"mri": data}, resolve_hosts=False)
        assert caught.value.problems[0].startswith(key + ":"), caught.value.problems
