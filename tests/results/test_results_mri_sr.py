"""The knee MRI findings SR: dciodvfy/dsrdump, content read back with highdicom (probabilities, Present/Absent,
per-plane inputs, segment volumes referencing the SEG), determinism, superseding, bad input, the label table."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes as dcm_codes

from node.results.knee_codes import ABSENT, FINDINGS, FINDINGS_BY_LABEL, INPUT_SERIES, PRESENT, STRUCTURES
from node.results.mri_model import FindingResult
from node.results.mri_sr import build_mri_sr, segment_volumes_mm3
from node.results.seg import build_seg, segment_tracking_uid
from tests.results.helpers import dciodvfy_errors, decode, dsrdump, encode, write
from tests.results.mri_sources import PROBABILITIES, mri_study


def _built(volumes: bool = True, **options):
    study = mri_study(**options)
    seg = build_seg(study, 9002)
    return study, seg, build_mri_sr(study, 9000, seg, segment_volumes=volumes)


def test_sr_passes_dciodvfy_and_dsrdump(tmp_path):
    _, _, sr = _built()
    path = write(sr, tmp_path / "sr.dcm")
    errors, warnings = dciodvfy_errors(path)
    assert errors == [], errors
    assert all("99MSKNODE" in line or "DeviceUID" in line or "DICOMDIR" in line for line in warnings), warnings
    dump = dsrdump(path)
    assert "Probability of anterior cruciate ligament tear" in dump and "Referenced Segment" in dump


def test_label_table_names_each_classifier_output_once():
    assert [finding.label for finding in FINDINGS] == ["ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU"]
    assert FINDINGS_BY_LABEL["EFFU"].finding == dcm_codes.SCT.Effusion
    assert FINDINGS_BY_LABEL["ACL"].finding.meaning == "anterior cruciate ligament tear"
    assert FINDINGS_BY_LABEL["PD"].finding.meaning == "patellar dislocation"
    assert len({f.probability.value for f in FINDINGS}) == len(FINDINGS)
    with pytest.raises(ValueError, match="knee_codes"):
        FindingResult("XYZ", 0.5)
    # The phantom generator's flag names are aliases of the same findings; one result per finding still.
    assert FINDINGS_BY_LABEL["acl_tear"] is FINDINGS_BY_LABEL["ACL"]
    assert FINDINGS_BY_LABEL["effusion"] is FINDINGS_BY_LABEL["EFFU"]
    study = mri_study()
    with pytest.raises(ValueError, match="one result per finding"):
        dataclasses.replace(study, findings=[FindingResult("ACL", 0.9), FindingResult("acl_tear", 0.9)])
    with pytest.raises(ValueError, match="outside"):
        FindingResult("ACL", 1.5)


def test_findings_group_has_each_probability_and_a_present_absent_call(tmp_path):
    study, _, sr = _built()
    report = hd.sr.srread(write(sr, tmp_path / "sr.dcm"))
    (group,) = report.content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "Knee MRI findings"
    values = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    for label, probability in PROBABILITIES.items():
        concept = FINDINGS_BY_LABEL[label].probability
        assert values[concept.meaning] == (pytest.approx(probability * 100.0), "%")
    calls = {e.name.meaning: e.value for e in group.get_qualitative_evaluations()}
    for label, probability in PROBABILITIES.items():
        expected = PRESENT if probability >= 0.5 else ABSENT
        assert calls[FINDINGS_BY_LABEL[label].finding.meaning] == expected, label
    # The region is the outline of the first plane's (sagittal) middle slice, so a viewer can place the group.
    sagittal = study.plane_series("sagittal")
    middle = sagittal.slices[len(sagittal.slices) // 2]
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == middle.SOPInstanceUID
    assert group.finding_type.value == "KNEEMRIFINDINGS"
    names = {str(item.ConceptNameCodeSequence[0].CodeMeaning): item.get("TextValue")
             for item in group[0].ContentSequence}
    assert (names["Algorithm Name"], names["Algorithm Version"]) == (study.model.name, study.model.version)


def test_threshold_decides_present():
    study = mri_study()
    strict = dataclasses.replace(study, findings=[FindingResult("ACL", 0.91, threshold=0.95)])
    sr = decode(encode(build_mri_sr(strict, 9000)))
    text = str(sr.ContentSequence)
    assert ABSENT.value in text and PRESENT.value not in text


def test_segment_volumes_reference_the_seg_and_are_in_cubic_millimetres(tmp_path):
    study, seg, sr = _built()
    report = hd.sr.srread(write(sr, tmp_path / "sr.dcm"))
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [s.label for s in STRUCTURES]
    voxel = 2.0 * 2.0 * 4.0
    counts = study.segmentation.voxel_counts()
    volumes = segment_volumes_mm3(study)
    for number, (group, structure) in enumerate(zip(groups, STRUCTURES), start=1):
        assert group.tracking_uid == segment_tracking_uid(study, structure)
        assert seg.SegmentSequence[number - 1].TrackingUID == group.tracking_uid, "SR and SEG share the UID"
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert [int(n) for n in segment.referenced_segment_numbers] == [number]
        assert segment.source_series_for_segmentation.value == study.plane_series("sagittal").series_instance_uid
        (volume,) = group.get_measurements()
        assert volume.unit.value == "mm3" and volume.name == dcm_codes.SCT.Volume
        assert volume.value == pytest.approx(counts[structure.label_value] * voxel)
        assert volumes[structure.key] == pytest.approx(volume.value)
    assert groups[-1].get_measurements()[0].value == 0.0, "the empty segment has volume 0"
    evidence = {str(ref.ReferencedSOPInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_each_plane_input_series_is_listed_with_its_reason():
    study, _, sr = _built()
    evaluations = sr.ContentSequence[-1]
    assert evaluations.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    inputs = [item for item in evaluations.ContentSequence
              if item.ConceptNameCodeSequence[0].CodeValue == INPUT_SERIES.value]
    assert [item.ConceptCodeSequence[0].CodeMeaning for item in inputs] == ["Sagittal", "Coronal", "Axial"]
    for item, plane in zip(inputs, study.ordered_planes):
        uid, reason = item.ContentSequence
        assert uid.UID == plane.series_instance_uid and uid.RelationshipType == "HAS PROPERTIES"
        assert reason.TextValue == plane.reason
    library = next(item for item in sr.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == dcm_codes.DCM.ImageLibrary.value)
    assert [len(group.ContentSequence) - 2 for group in library.ContentSequence] == [12, 12, 12]
    evidence_series = {str(series.SeriesInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence
                       for series in item.ReferencedSeriesSequence}
    assert {plane.series_instance_uid for plane in study.planes} <= evidence_series


def test_rebuild_is_byte_identical_and_content_changes_the_instance_not_the_series():
    _, _, sr = _built()
    first = encode(sr)
    assert encode(_built()[2]) == first
    changed = dict(PROBABILITIES, ACL=0.2)
    other = decode(encode(_built(probabilities=changed)[2]))
    base = decode(first)
    assert other.SeriesInstanceUID == base.SeriesInstanceUID
    assert other.SOPInstanceUID != base.SOPInstanceUID
    assert base.SeriesDescription == "AI HIGH knee MRI findings orthodiffusion-knee 0.2.0"
    assert (int(base.SeriesNumber), int(base.InstanceNumber)) == (9000, 1)


def test_a_newer_report_supersedes_the_older():
    _, _, older = _built()
    study = mri_study(revision=2)
    newer = decode(encode(build_mri_sr(study, 9000, build_seg(study, 9002), previous=older, segment_volumes=True)))
    (item,) = newer.PredecessorDocumentsSequence
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == older.SOPInstanceUID
    assert int(newer.InstanceNumber) == 2 and newer.SeriesInstanceUID == older.SeriesInstanceUID


def test_without_segmentation_or_volumes(tmp_path):
    study = mri_study(segmentation_plane=None, planes=("sagittal",))
    sr = build_mri_sr(study, 9000)
    assert dciodvfy_errors(write(sr, tmp_path / "sr.dcm"))[0] == []
    with_seg = mri_study()
    plain = build_mri_sr(with_seg, 9000)  # the default: no TID 1411 groups (OHIF 3.13 cannot place them)
    assert dciodvfy_errors(write(plain, tmp_path / "plain.dcm"))[0] == []
    assert "Referenced Segment" not in str(plain.ContentSequence)
    assert encode(build_mri_sr(with_seg, 9000, build_seg(with_seg, 9002))) == encode(plain), "seg unused then"


def test_seg_is_required_and_must_match():
    study, seg, _ = _built()
    with pytest.raises(ValueError, match="pass its SEG"):
        build_mri_sr(study, 9000, segment_volumes=True)
    other = mri_study()
    labels = np.where(other.segmentation.labels <= 3, other.segmentation.labels, 0)
    fewer = dataclasses.replace(other, segmentation=dataclasses.replace(other.segmentation, labels=labels,
                                                                        structures=STRUCTURES[:3]))
    with pytest.raises(ValueError, match="structures"):
        build_mri_sr(fewer, 9000, seg, segment_volumes=True)
    with pytest.raises(ValueError, match="nothing to report"):
        build_mri_sr(dataclasses.replace(study, findings=[]), 9000)
    assert np.all(study.segmentation.labels == mri_study().segmentation.labels)
