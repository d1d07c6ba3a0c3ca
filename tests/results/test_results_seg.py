"""The knee DICOM Segmentation: dciodvfy, highdicom reads it back (segments, codes, per-frame source references,
the label volume itself), determinism, empty segments, the code table, bad input, Orthanc accepts SEG/SR/SCs."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from node.results.knee_codes import (
    FINDINGS,
    PHANTOM_STRUCTURES,
    STRUCTURE_KEYS,
    STRUCTURES,
    STRUCTURES_BY_KEY,
    structures_for,
)
from node.results.mri_model import MRIStudyResult, PlaneSeries, SegmentationResult
from node.results.mri_sc import build_overlay_scs
from node.results.mri_sr import build_mri_sr
from node.results.seg import build_seg, segment_numbers
from tests.helpers.orthanc import Orthanc
from tests.results.helpers import dciodvfy_errors, decode, encode, write
from tests.results.mri_sources import LABEL_VALUES, labels_on, mri_study, plane_series


def test_seg_passes_dciodvfy_without_errors(tmp_path):
    path = write(build_seg(mri_study(), 9002), tmp_path / "seg.dcm")
    errors, warnings = dciodvfy_errors(path)
    assert errors == [], errors
    # What remains: our private scheme (declared, unknown to dicom3tools) and IHE AIR's Device UID in equipment.
    assert all("99MSKNODE" in line or "DeviceUID" in line or "DICOMDIR" in line for line in warnings), warnings


def test_highdicom_reads_back_segments_codes_and_the_label_volume(tmp_path):
    study = mri_study()
    path = write(build_seg(study, 9002), tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert [int(n) for n in seg.get_segment_numbers()] == list(range(1, 12))
    for number, structure in enumerate(STRUCTURES, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == structure.label
        assert description.segmented_property_type == structure.property_type
        assert description.segmented_property_category == structure.category
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert description.algorithm_identification[0].AlgorithmName == study.model.name
        assert description.algorithm_identification[0].AlgorithmVersion == study.model.version
        assert [region.value for region in description.anatomic_regions] == [structure.region.value]
    medial = seg.get_segment_description(7).SegmentedPropertyTypeCodeSequence[0]
    assert medial.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == dcm_codes.SCT.Medial.value

    grid = study.plane_series("sagittal")
    uids = [str(ds.SOPInstanceUID) for ds in grid.slices]
    assert {str(ref.ReferencedSOPInstanceUID) for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == grid.series_instance_uid
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    np.testing.assert_array_equal(back, segment_numbers(study))


def test_every_frame_references_the_slice_it_was_drawn_on(tmp_path):
    """Per frame: its source instance is the slice at the frame's position, and the frame's mask is that
    slice's mask of the frame's segment."""
    study = mri_study()
    seg = decode(encode(build_seg(study, 9002)))
    grid = study.plane_series("sagittal")
    by_uid = {str(ds.SOPInstanceUID): index for index, ds in enumerate(grid.slices)}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    numbers = segment_numbers(study)
    assert len(frames) == sum(int(np.any(numbers[k] == n)) for k in range(len(grid.slices)) for n in range(1, 12))
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        index = by_uid[str(source.ReferencedSOPInstanceUID)]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in grid.slices[index].ImagePositionPatient])
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame.astype(bool), numbers[index] == segment)


def test_same_inputs_give_byte_identical_seg_and_changes_give_new_uids():
    first = encode(build_seg(mri_study(), 9002))
    assert encode(build_seg(mri_study(), 9002)) == first
    base = decode(first)
    labels = labels_on(plane_series("sagittal"))
    labels[labels == LABEL_VALUES["acl"]] = 0
    other = decode(encode(build_seg(mri_study(labels=labels), 9002)))
    assert other.SeriesInstanceUID == base.SeriesInstanceUID, "same inputs: same series"
    assert other.SOPInstanceUID != base.SOPInstanceUID, "other content: another instance"
    revision = decode(encode(build_seg(mri_study(revision=2), 9002)))
    assert revision.SOPInstanceUID != base.SOPInstanceUID and int(revision.InstanceNumber) == 2
    assert base.SeriesDescription == "AI HIGH knee segmentation orthodiffusion-knee 0.2.0"
    assert int(base.SeriesNumber) == 9002 and base.Modality == "SEG"
    assert base.ContentLabel == "KNEE_STRUCTURES"
    air = [item for item in base.ContributingEquipmentSequence
           if item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"]
    assert len(air) == 1 and air[0].ManufacturerModelName == "orthodiffusion-knee"


def test_a_structure_the_model_did_not_find_is_an_empty_segment(tmp_path):
    study = mri_study()
    assert study.segmentation.voxel_counts()[LABEL_VALUES["collateral_ligaments"]] == 0
    seg = build_seg(study, 9002)
    path = write(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path)[0] == []
    back = decode(path.read_bytes())
    referenced = {int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                  for item in back.PerFrameFunctionalGroupsSequence}
    assert 11 not in referenced and referenced == set(range(1, 11))
    assert back.SegmentSequence[10].SegmentLabel == "Collateral ligaments"


def test_an_all_empty_label_volume_still_gives_a_valid_seg(tmp_path):
    labels = np.zeros(plane_series("sagittal").shape, dtype=np.uint8)
    path = write(build_seg(mri_study(labels=labels), 9002), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path)[0] == []
    back = hd.seg.segread(path)
    assert len(back.SegmentSequence) == 11


def test_a_subset_of_structures_is_numbered_from_one():
    study = mri_study()
    subset = (STRUCTURES_BY_KEY["femur"], STRUCTURES_BY_KEY["acl"])
    labels = np.where(np.isin(study.segmentation.labels, [1, 9]), study.segmentation.labels, 0)
    study = dataclasses.replace(study, segmentation=SegmentationResult("sagittal", labels, subset))
    seg = decode(encode(build_seg(study, 9002)))
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == \
        [(1, "Femur"), (2, "Anterior cruciate ligament")]
    assert set(np.unique(segment_numbers(study)).tolist()) == {0, 1, 2}


def test_bad_inputs_are_refused_with_a_reason():
    study = mri_study()
    labels = study.segmentation.labels.copy()
    labels[0, 0, 0] = 42
    with pytest.raises(ValueError, match="42"):
        SegmentationResult("sagittal", labels)
    with pytest.raises(ValueError, match="grid"):
        mri_study(labels=study.segmentation.labels[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        SegmentationResult("sagittal", labels.astype(np.float32))
    series = plane_series("sagittal")
    shuffled = [series.slices[1], series.slices[0], *series.slices[2:]]
    with pytest.raises(ValueError, match="sorted"):
        PlaneSeries("sagittal", shuffled)
    assert PlaneSeries("sagittal", list(reversed(series.slices))).shape == series.shape  # descending is fine
    with pytest.raises(ValueError, match="no segmentation"):
        build_seg(dataclasses.replace(study, segmentation=None), 9002)
    with pytest.raises(ValueError, match="one series per plane"):
        MRIStudyResult(study.study_instance_uid, [series, series], [], None, study.model, study.created_at)


def test_source_headers_are_not_mutated():
    study = mri_study()
    before = [encode(ds) for ds in study.plane_series("sagittal").slices]
    build_seg(study, 9002)
    assert [encode(ds) for ds in study.plane_series("sagittal").slices] == before


def _standard_sct() -> dict[str, set[str]]:
    """SNOMED CT codes the DICOM standard lists (pydicom's copy of PS3.16): value -> its meanings there."""
    table: dict[str, set[str]] = {}
    for name in dir(dcm_codes.SCT):
        code = getattr(dcm_codes.SCT, name)
        if isinstance(code, Code):
            table.setdefault(code.value, set()).add(code.meaning)
    return table


def test_code_table_uses_only_standard_sct_codes_or_the_declared_private_scheme():
    standard = _standard_sct()
    used: list[Code] = []
    for structure in structures_for(STRUCTURE_KEYS):  # the whole catalogue, not only the default layout
        used += [structure.category, structure.property_type, structure.region]
        used += [structure.modifier] if structure.modifier is not None else []
    for finding in FINDINGS:
        used += [finding.finding, finding.probability]
    for code in used:
        assert code.scheme_designator in ("SCT", "99MSKNODE"), code
        if code.scheme_designator == "SCT":  # never an invented SNOMED code: it must be one DICOM lists
            assert code.meaning in standard.get(code.value, set()), code
        assert len(code.value) <= 16 and len(code.meaning) <= 64
    assert [s.label_value for s in STRUCTURES] == list(range(1, 12))
    assert len({s.label for s in STRUCTURES}) == 11
    # Anatomical Structure, Tissue, Morphologically Abnormal Structure (CID 7150)
    assert {s.category.value for s in structures_for(STRUCTURE_KEYS)} <= {"91723000", "85756007", "49755003"}
    assert [s.property_type.value for s in STRUCTURES[:3]] == ["71341001", "12611008", "64234005"]


def test_the_phantom_label_layout_builds_a_valid_seg(tmp_path):
    """Models trained on engines/training/knee_mri_phantoms.py label 11 other structures (one cartilage label, MCL,
    LCL, effusion): the same builder describes them from the same catalogue."""
    assert [s.key for s in PHANTOM_STRUCTURES] == ["femur", "tibia", "patella", "cartilage", "medial_meniscus",
                                                   "lateral_meniscus", "acl", "pcl", "mcl", "lcl", "effusion"]
    study = mri_study()
    remap = np.array([0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 0], dtype=np.uint8)  # default layout -> phantom layout
    segmentation = SegmentationResult("sagittal", remap[study.segmentation.labels], PHANTOM_STRUCTURES)
    path = write(build_seg(dataclasses.replace(study, segmentation=segmentation), 9002), tmp_path / "seg.dcm")
    assert dciodvfy_errors(path)[0] == []
    back = decode(path.read_bytes())
    assert [s.SegmentLabel for s in back.SegmentSequence][-3:] == ["Medial collateral ligament",
                                                                   "Lateral collateral ligament", "Joint effusion"]
    assert back.SegmentSequence[10].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    with pytest.raises(ValueError, match="knee_codes"):
        structures_for(["femur", "quadriceps_tendon"])
    with pytest.raises(ValueError, match="once"):
        structures_for(["femur", "femur"])


@pytest.mark.orthanc
def test_orthanc_accepts_the_seg_sr_and_overlays(tmp_path):
    study = mri_study()
    seg = build_seg(study, 9002)
    objects = {"SEG": seg, "SR": build_mri_sr(study, 9000, seg, segment_volumes=True)}
    objects.update({f"SC{n}": sc for n, sc in enumerate(build_overlay_scs(study, 9001), start=1)})
    orthanc = Orthanc(tmp_path / "orthanc", {})
    orthanc.start()
    try:
        for name, dataset in objects.items():
            path = write(dataset, tmp_path / f"{name}.dcm")
            answer = orthanc.upload(path)
            assert answer["Status"] == "Success", (name, answer)
            stored = orthanc.get(f"/instances/{answer['ID']}/simplified-tags")
            assert stored["SOPInstanceUID"] == dataset.SOPInstanceUID
            assert stored["StudyInstanceUID"] == study.study_instance_uid
            assert orthanc.instance_file(answer["ID"]) == path.read_bytes(), f"{name} stored unchanged"
            again = orthanc.upload(path)
            assert again["Status"] == "AlreadyStored", (name, again)
        series = {s["MainDicomTags"]["SeriesNumber"]: s for s in
                  orthanc.get(f"/studies/{answer['ParentStudy']}/series?expand")}
        assert {"9000", "9001", "9002"} <= set(series)
        assert series["9002"]["MainDicomTags"]["Modality"] == "SEG"
    finally:
        orthanc.stop()


def test_seg_of_an_enhanced_mr_source_references_each_frame(tmp_path):
    """An Enhanced MR source (one multi-frame instance, its frames stored in reverse slice order here): the SEG puts
    each label slice on its source frame (highdicom reads it back by (instance, frame)), dciodvfy-clean; the
    series' slices are per-frame views carrying that frame's position."""
    import copy

    from engines.training.knee_mri_phantoms import default_protocol, generate_study
    from node.results.mri_model import frame_view

    phantom = generate_study(seed=3, protocol=default_protocol(48, 8, enhanced=True, localizer=False, t1=False))
    headers = {}
    for series in phantom.series:
        ds = copy.deepcopy(series.datasets[0])
        del ds.PixelData
        ds.PerFrameFunctionalGroupsSequence = list(reversed(ds.PerFrameFunctionalGroupsSequence))
        headers[series.spec.plane] = ds
    frames = 8
    planes = [PlaneSeries(plane, [frame_view(ds, frames - k) for k in range(frames)], frame_numbers=[
        frames - k for k in range(frames)], multiframe=ds) for plane, ds in headers.items()]
    sagittal = next(p for p in planes if p.plane == "sagittal")
    assert sagittal.references[0] == (str(headers["sagittal"].SOPInstanceUID), frames)
    labels = np.zeros(sagittal.shape, dtype=np.uint8)
    for k in range(frames):  # a block whose label and place tell the slice apart
        labels[k, 2 + k: 6 + k, 10:20] = 1 + k % 3
    study = dataclasses.replace(mri_study(study_uid=phantom.study_instance_uid), planes=planes,
                                segmentation=SegmentationResult("sagittal", labels))
    seg = build_seg(study, 9002)
    path = write(seg, tmp_path / "seg.dcm")
    errors, _ = dciodvfy_errors(path)
    assert errors == [], errors
    back = hd.seg.segread(str(path))
    sop = str(headers["sagittal"].SOPInstanceUID)
    numbers = list(range(1, frames + 1))
    read = back.get_pixels_by_source_frame(sop, source_frame_numbers=numbers, combine_segments=True,
                                           skip_overlap_checks=True)
    for index, frame in enumerate(numbers):
        np.testing.assert_array_equal(read[index], segment_numbers(study)[frames - frame], err_msg=f"frame {frame}")
