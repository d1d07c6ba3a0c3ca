"""The TID 1500 Comprehensive 3D SR: values, geometry, header copying, variants, determinism, validators."""

from __future__ import annotations

import copy
import dataclasses

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from node.results import build_not_analysed_sr, build_sr
from node.results import codes
from node.results.model import DocumentReference, HeadOutput
from tests.results.helpers import dciodvfy_errors, decode, dsrdump, encode, write
from tests.results.sources import (
    CR,
    model_info,
    MR,
    REGION,
    XA,
    STUDY_UID,
    image_result,
    source_header,
    study_result,
)

TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
         "ReferringPhysicianName", "StudyDate", "StudyTime")


# --- helpers: read the content tree back ----------------------------------------------------------------------
def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def children(item: Dataset, scheme: str, value: str) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if concept(child) == (scheme, value)]


def only(items: list[Dataset]) -> Dataset:
    assert len(items) == 1, items
    return items[0]


def measurement_groups(sr: Dataset) -> list[Dataset]:
    container = only(children(sr, "DCM", "126010"))  # Imaging Measurements
    return [g for g in container.ContentSequence if concept(g) == ("DCM", "125007")]


def group_source_uid(group: Dataset) -> str:
    """SOP Instance UID the group refers to (IMAGE child, or the SCOORD's selected-from IMAGE)."""
    for item in group.ContentSequence:
        if item.ValueType == "IMAGE":
            return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        if item.ValueType == "SCOORD":
            return str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    raise AssertionError("group without an image reference")


def numbers(group: Dataset) -> dict[tuple[str, str], float]:
    return {
        concept(item): float(item.MeasuredValueSequence[0].FloatingPointValue)
        for item in group.ContentSequence
        if item.ValueType == "NUM"
    }


def coded(group: Dataset) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        concept(item): (str(item.ConceptCodeSequence[0].CodingSchemeDesignator),
                        str(item.ConceptCodeSequence[0].CodeValue))
        for item in group.ContentSequence
        if item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"
    }


def key(code) -> tuple[str, str]:
    return code.scheme_designator, code.value


@pytest.fixture
def two_images():
    dx = source_header(1)
    cr = source_header(2, sop_class=CR, modality="CR")
    first = image_result(dx, score=0.0123, percentile=97.5)
    second = dataclasses.replace(
        image_result(cr, score=0.0042, percentile=None),
        heads=[HeadOutput("fracture", ["fracture"], [0.03125], "sigmoid"),
               HeadOutput("kl_grade", ["0", "1", "2", "3", "4"], [0.7, 0.1, 0.1, 0.05, 0.05], "softmax"),
               HeadOutput("site_bone_age", ["years"], [12.25], "identity")],
    )
    return first, second


# --- content ---------------------------------------------------------------------------------------------------
def scoord(group: Dataset) -> Dataset:
    return only([i for i in group.ContentSequence if i.ValueType == "SCOORD"])


def units(group: Dataset) -> dict[tuple[str, str], str]:
    return {concept(item): str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for item in group.ContentSequence if item.ValueType == "NUM"}


def test_measurements_equal_the_inputs(two_images):
    """One placed group per image: probabilities in percent, the score in {score}, raw outputs in {value}."""
    study = study_result(list(two_images))
    sr = decode(encode(build_sr(study, 9000)))
    groups = measurement_groups(sr)
    assert len(groups) == 2
    by_source = {group_source_uid(g): g for g in groups}
    for image in two_images:
        group = by_source[str(image.source.SOPInstanceUID)]
        values, unit_of = numbers(group), units(group)
        assert values.pop(key(codes.ABNORMALITY_SCORE)) == image.score
        assert unit_of[key(codes.ABNORMALITY_SCORE)] == "{score}"
        if image.percentile is None:
            assert key(codes.ABNORMALITY_PERCENTILE) not in values
        else:
            assert values.pop(key(codes.ABNORMALITY_PERCENTILE)) == image.percentile
        expected_codes = {}
        for head in image.heads:
            for label, probability in zip(head.labels, head.probabilities):
                if head.activation == "identity":
                    concept_key = key(codes.output_concept(head.name, label))
                    assert values.pop(concept_key) == probability and unit_of[concept_key] == "{value}"
                else:
                    concept_key = key(codes.probability_concept(head.name, label))
                    assert values.pop(concept_key) == pytest.approx(probability * 100, rel=1e-12)
                    assert unit_of[concept_key] == "%"
            if head.activation == "softmax":
                expected_codes[key(codes.head_concept(head.name))] = key(codes.class_value(head.name, head.top_label))
        assert values == {}, "no measurement beyond the inputs"
        assert {k: v for k, v in coded(group).items() if k != ("DCM", "121071")} == expected_codes
        assert "1" not in unit_of.values(), "UCUM 1 reads as '0.64 1' in a viewer"


def test_most_important_values_come_first(two_images):
    """OHIF prints the first 5 NUMs of a group: each head's key value, the percentile, the score, then the rest."""
    sr = decode(encode(build_sr(study_result([two_images[1]]), 9000)))
    order = [concept(i) for i in only(measurement_groups(sr)).ContentSequence if i.ValueType == "NUM"]
    assert order[:5] == [key(codes.FRACTURE_PROBABILITY), ("99MSKNODE", "KLPROB0"),
                         key(codes.output_concept("site_bone_age", "years")), key(codes.ABNORMALITY_SCORE),
                         ("99MSKNODE", "KLPROB1")]
    sr = decode(encode(build_sr(study_result([two_images[0]]), 9000)))
    order = [concept(i) for i in only(measurement_groups(sr)).ContentSequence if i.ValueType == "NUM"]
    assert order[:5] == [key(codes.FRACTURE_PROBABILITY), key(codes.probability_concept("tumour", "benign")),
                         ("99MSKNODE", "KLPROB3"), key(codes.ABNORMALITY_PERCENTILE), key(codes.ABNORMALITY_SCORE)]


def test_a_head_may_give_its_own_unit():
    image = dataclasses.replace(image_result(source_header(1)), heads=[
        HeadOutput("bone_age", ["years"], [12.5], "identity", unit="a")])
    sr = decode(encode(build_sr(study_result([image]), 9000)))
    assert units(only(measurement_groups(sr)))[key(codes.output_concept("bone_age", "years"))] == "a"


def test_every_group_is_placeable_by_a_viewer(two_images):
    """What OHIF v3 needs of each group: a tracking UID of its own, a top-level SCOORD whose SELECTED FROM image
    is in the image library, and at least one NUM with a MeasuredValueSequence."""
    without_region = image_result(source_header(3), region=None)
    sr = decode(encode(build_sr(study_result(list(two_images) + [without_region]), 9000)))
    library = only(children(sr, "DCM", "111028"))
    in_library = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for group in library.ContentSequence for i in group.ContentSequence}
    tracking = []
    for group in measurement_groups(sr):
        tracking.append(only(children(group, "DCM", "112040")).UID)
        item = scoord(group)
        assert item.RelationshipType == "CONTAINS" and item.GraphicType == "POLYLINE"
        selected = only(list(item.ContentSequence))
        assert selected.RelationshipType == "SELECTED FROM"
        assert str(selected.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in in_library
        assert any(i.ValueType == "NUM" and "MeasuredValueSequence" in i for i in group.ContentSequence)
    assert len(tracking) == len(set(tracking)) == 3


def test_head_outputs_are_validated():
    with pytest.raises(ValueError):
        HeadOutput("fracture", ["fracture"], [1.5], "sigmoid")
    with pytest.raises(ValueError):
        HeadOutput("kl_grade", ["0", "1"], [0.5], "softmax")
    with pytest.raises(ValueError):
        HeadOutput("x", ["a"], [float("nan")], "identity")
    assert HeadOutput("x", ["a"], [42.0], "identity").probabilities == [42.0]


def test_derived_codes_are_stable_short_and_distinct():
    first = codes.probability_concept("site_head", "label a")
    assert first == codes.probability_concept("site_head", "label a")
    assert first != codes.probability_concept("site_head", "label b")
    assert first != codes.output_concept("site_head", "label a")
    long_label = "x" * 200
    for code in (codes.head_concept(long_label), codes.class_value(long_label, long_label),
                 codes.probability_concept(long_label, long_label)):
        assert len(code.value) <= 16 and len(code.meaning) <= 64 and code.scheme_designator == "99MSKNODE"


def test_kl_grade_and_tumour_class_use_declared_codes(two_images):
    sr = decode(encode(build_sr(study_result([two_images[0]]), 9000)))
    group = next(g for g in measurement_groups(sr) if any(i.ValueType == "NUM" for i in g.ContentSequence))
    values = coded(group)
    assert values[key(codes.KL_GRADE)] == ("99MSKNODE", "KL3")  # argmax of the fixture's KL probabilities
    assert values[key(codes.TUMOUR_CLASS)] == ("99MSKNODE", "TUMBENIGN")
    declared = {str(item.CodingSchemeDesignator) for item in sr.CodingSchemeIdentificationSequence}
    assert {"99MSKNODE", "99IHE"} <= declared


def test_scoord_is_the_input_polygon_in_source_pixels(two_images):
    sr = decode(encode(build_sr(study_result(list(two_images)), 9000)))
    regions = measurement_groups(sr)
    assert len(regions) == 2
    for group in regions:
        points = np.asarray(scoord(group).GraphicData, dtype=np.float64).reshape(-1, 2)
        np.testing.assert_array_equal(points, REGION)
        assert coded(group)[("DCM", "121071")] == key(codes.HIGHEST_ERROR_REGION)
        assert str(only(children(group, "DCM", "112039")).TextValue).endswith("highest-error region")


def test_open_polygon_is_closed_and_missing_region_gives_the_image_outline():
    open_region = REGION[:-1] + 0.5
    with_region = image_result(source_header(1), region=open_region)
    without = image_result(source_header(2, rows=2500, columns=2048), region=None)
    sr = decode(encode(build_sr(study_result([with_region, without]), 9000)))
    groups = {group_source_uid(g): g for g in measurement_groups(sr)}
    points = np.asarray(scoord(groups[str(with_region.source.SOPInstanceUID)]).GraphicData).reshape(-1, 2)
    np.testing.assert_array_equal(points, np.vstack([open_region, open_region[:1]]))
    whole = groups[str(without.source.SOPInstanceUID)]
    points = np.asarray(scoord(whole).GraphicData, dtype=np.float64).reshape(-1, 2)
    np.testing.assert_array_equal(points, [[0, 0], [2048, 0], [2048, 2500], [0, 2500], [0, 0]])
    assert coded(whole)[("DCM", "121071")] == key(codes.WHOLE_IMAGE)
    assert str(only(children(whole, "DCM", "112039")).TextValue) == "Image 2 whole image"


def test_several_models_on_one_image_give_one_group_each(tmp_path, two_images):
    """Designed for several models per image: a group per (image, model), each with its own tracking UID and
    algorithm; the library lists the image once; Contributing Equipment names every model."""
    other = model_info(name="fracture-net", version="2.0", encoder_sha256="cd" * 32)
    second_opinion = dataclasses.replace(two_images[0], model=other, region=None, percentile=None,
                                         heads=[HeadOutput("fracture", ["fracture"], [0.25], "sigmoid")])
    study = study_result([two_images[0], second_opinion])
    sr = decode(encode(build_sr(study, 9000)))
    groups = measurement_groups(sr)
    assert len(groups) == 2 and {group_source_uid(g) for g in groups} == {str(two_images[0].source.SOPInstanceUID)}
    names = sorted(str(only(children(g, "DCM", "111001")).TextValue) for g in groups)
    assert names == ["demo-mae", "fracture-net"]
    identifiers = sorted(str(only(children(g, "DCM", "112039")).TextValue) for g in groups)
    assert identifiers == ["Image 1 demo-mae highest-error region", "Image 1 fracture-net whole image"]
    assert len({only(children(g, "DCM", "112040")).UID for g in groups}) == 2
    library = only(children(sr, "DCM", "111028"))
    assert sum(len(group.ContentSequence) for group in library.ContentSequence) == 1
    air = {e.ManufacturerModelName for e in sr.ContributingEquipmentSequence
           if e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"}
    assert air == {"demo-mae", "fracture-net"}
    with pytest.raises(ValueError):
        study_result([two_images[0], dataclasses.replace(two_images[0])])  # one result per (image, frame, model)
    errors, _ = dciodvfy_errors(write(sr, tmp_path / "sr.dcm"))
    assert errors == []


def test_header_copies_study_patient_accession_and_identifies_the_device(two_images):
    study = study_result(list(two_images), priority="URGENT")
    sr = decode(encode(build_sr(study, 9042)))
    source = two_images[0].source
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber", "StudyID", "StudyDate",
                    "PatientBirthDate", "PatientSex"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == 9042
    assert sr.SeriesDescription.startswith("AI URGENT")
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(im.source.SOPInstanceUID) for im in two_images}
    # Observer: device with the encoder hash; AIR contributing equipment with the 99IHE purpose.
    observer = {concept(i): i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"}
    assert observer[("DCM", "121012")].UID  # Device Observer UID
    assert observer[("DCM", "121016")].TextValue == study.model.encoder_sha256  # serial number
    assert observer[("DCM", "121015")].TextValue == study.model.name  # model name
    air = [e for e in sr.ContributingEquipmentSequence
           if e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"]
    assert len(air) == 1 and air[0].ManufacturerModelName == study.model.name
    assert air[0].SoftwareVersions == study.model.version and air[0].DeviceUID == observer[("DCM", "121012")].UID


def test_algorithm_identification_carries_the_error_map_parameters(two_images):
    study = study_result([two_images[0]], seed=77)
    sr = decode(encode(build_sr(study, 9000)))
    group = measurement_groups(sr)[0]
    texts = {}
    for item in group.ContentSequence:
        if item.ValueType == "TEXT":
            texts.setdefault(concept(item), []).append(str(item.TextValue))
    assert texts[("DCM", "111001")] == [study.model.name]
    assert texts[("DCM", "111003")] == [study.model.version]
    assert {"passes=10", "mask_ratio=0.75", "seed=77", f"encoder_sha256={study.model.encoder_sha256}"} <= set(
        texts[("DCM", "111002")]
    )


def test_triage_priority_is_a_study_level_item(two_images):
    for priority in ("ROUTINE", "HIGH", "URGENT"):
        sr = decode(encode(build_sr(study_result(list(two_images), priority=priority), 9000)))
        evaluations = only(children(sr, *key(codes.QUALITATIVE_EVALUATIONS)))
        assert coded(evaluations) == {key(codes.TRIAGE_PRIORITY): key(codes.PRIORITY_VALUES[priority])}


def test_image_library_lists_the_analysed_images_with_their_frames():
    multi = source_header(1, sop_class=XA, modality="XA")  # a multi-frame IOD
    multi.NumberOfFrames = 3
    study = study_result([image_result(multi, frame_index=2)], not_analysed=[(source_header(9, sop_class=MR,
                                                                               modality="MR"), "modality MR")])
    sr = decode(encode(build_sr(study, 9000)))
    library = only(children(sr, "DCM", "111028"))
    images = [i for group in library.ContentSequence for i in group.ContentSequence if i.ValueType == "IMAGE"]
    assert [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in images] == [str(multi.SOPInstanceUID)]
    assert images[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 3
    scoord = next(i for g in measurement_groups(sr) for i in g.ContentSequence if i.ValueType == "SCOORD")
    assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 3
    # The not-analysed MR is still reported, with its reason, in the findings SR.
    evaluations = only(children(sr, *key(codes.QUALITATIVE_EVALUATIONS)))
    reason = only(children(evaluations, *key(codes.REASON_NOT_ANALYSED)))
    assert reason.TextValue == "modality MR"


# --- not-analysed variant and superseding ----------------------------------------------------------------------
def test_not_analysed_sr_says_why_per_image_and_has_no_measurements():
    """No values; each not-analysed image gets a group that outlines it (OHIF 3.13 throws on a report without a
    measurement group), the reasons are in Qualitative Evaluations."""
    mr = source_header(5, sop_class=MR, modality="MR")
    cr = source_header(6, sop_class=CR, modality="CR")
    reasons = {str(mr.SOPInstanceUID): "modality MR not eligible",
               str(cr.SOPInstanceUID): "body part CHEST not eligible"}
    study = study_result([], not_analysed=[(ds, reasons[str(ds.SOPInstanceUID)]) for ds in (mr, cr)])
    sr = decode(encode(build_not_analysed_sr(study, 9000)))
    assert sr.SeriesDescription.startswith("AI NOT ANALYSED")
    groups = measurement_groups(sr)
    assert sorted(group_source_uid(g) for g in groups) == sorted(reasons)
    for group in groups:
        assert not [i for i in group.ContentSequence if i.ValueType == "NUM"], "no measurement"
        assert coded(group)[("DCM", "121071")] == key(codes.NOT_ANALYSED)
        assert scoord(group).GraphicType == "POLYLINE"
    evaluations = only(children(sr, *key(codes.QUALITATIVE_EVALUATIONS)))
    assert coded(evaluations) == {key(codes.ANALYSIS_STATUS): key(codes.NOT_ANALYSED)}
    found = {
        str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID): str(item.TextValue)
        for item in children(evaluations, *key(codes.REASON_NOT_ANALYSED))
    }
    assert found == reasons
    assert sr.PatientID == mr.PatientID and sr.StudyInstanceUID == STUDY_UID
    with pytest.raises(ValueError):
        build_sr(study, 9000)
    with pytest.raises(ValueError):
        build_not_analysed_sr(study_result([image_result(source_header(1))]), 9000)


@pytest.mark.parametrize("as_reference", [False, True])
def test_new_sr_supersedes_the_previous_one(two_images, as_reference):
    old = decode(encode(build_not_analysed_sr(
        study_result([], not_analysed=[(source_header(7, sop_class=MR, modality="MR"), "modality MR")]), 9000)))
    previous = DocumentReference.from_dataset(old) if as_reference else old
    new = decode(encode(build_sr(study_result(list(two_images)), 9000, previous=previous)))
    item = only(list(new.PredecessorDocumentsSequence))
    assert item.StudyInstanceUID == old.StudyInstanceUID
    series = only(list(item.ReferencedSeriesSequence))
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    ref = only(list(series.ReferencedSOPSequence))
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (old.SOPInstanceUID, old.SOPClassUID)
    assert new.SOPInstanceUID != old.SOPInstanceUID


def test_new_sr_supersedes_every_earlier_sr(two_images):
    """Two earlier SRs (one may never have reached the PACS): the new one names both, in a stable order."""
    first = decode(encode(build_not_analysed_sr(
        study_result([], not_analysed=[(source_header(7, sop_class=MR, modality="MR"), "modality MR")]), 9000)))
    second = decode(encode(build_sr(study_result([two_images[0]]), 9000, previous=first)))
    earlier = [DocumentReference.from_dataset(second), first]
    new = decode(encode(build_sr(study_result(list(two_images)), 9000, previous=earlier)))
    named = {(str(series.SeriesInstanceUID), str(ref.ReferencedSOPInstanceUID))
             for item in new.PredecessorDocumentsSequence for series in item.ReferencedSeriesSequence
             for ref in series.ReferencedSOPSequence}
    assert named == {(str(old.SeriesInstanceUID), str(old.SOPInstanceUID)) for old in (first, second)}
    again = encode(build_sr(study_result(list(two_images)), 9000, previous=list(reversed(earlier))))
    assert again == encode(new)  # the order the earlier SRs are given in does not change the object
    assert decode(again).SOPInstanceUID != decode(encode(build_sr(study_result(list(two_images)), 9000,
                                                                  previous=second))).SOPInstanceUID


# --- determinism and UIDs --------------------------------------------------------------------------------------
def test_same_inputs_give_byte_identical_sr(two_images):
    first = encode(build_sr(study_result(list(two_images)), 9000))
    again = encode(build_sr(study_result(list(reversed(two_images))), 9000))  # order of the list must not matter
    assert first == again


def test_uids_follow_the_documented_rule(two_images):
    """One report series per (study, model, number, description): later revisions with other inputs join it."""
    base = decode(encode(build_sr(study_result(list(two_images)), 9000)))
    changed_value = dataclasses.replace(two_images[0], score=0.5)
    same_inputs = decode(encode(build_sr(study_result([changed_value, two_images[1]]), 9000)))
    assert same_inputs.SeriesInstanceUID == base.SeriesInstanceUID  # a retry never makes a second series
    assert same_inputs.SOPInstanceUID != base.SOPInstanceUID  # different content never reuses a UID
    fewer_inputs = decode(encode(build_sr(study_result([two_images[0]], revision=2), 9000)))
    assert fewer_inputs.SeriesInstanceUID == base.SeriesInstanceUID
    assert fewer_inputs.SOPInstanceUID != base.SOPInstanceUID
    replaced = dataclasses.replace(two_images[0], source_sha256="f" * 64)
    replaced_sr = decode(encode(build_sr(study_result([replaced, two_images[1]]), 9000)))
    assert replaced_sr.SeriesInstanceUID == base.SeriesInstanceUID
    assert replaced_sr.SOPInstanceUID != base.SOPInstanceUID
    other_model = decode(encode(build_sr(study_result(list(two_images), version="0.2.0"), 9000)))
    assert other_model.SeriesInstanceUID != base.SeriesInstanceUID
    other_priority = decode(encode(build_sr(study_result(list(two_images), priority="URGENT"), 9000)))
    assert other_priority.SeriesInstanceUID != base.SeriesInstanceUID
    for ds in (base, same_inputs, fewer_inputs, other_model):
        assert ds.SOPInstanceUID.startswith("2.25.") and ds.SeriesInstanceUID.startswith("2.25.")
    assert base.InstanceCreationDate == "20261122" and base.ContentTime.startswith("103015")


def test_a_newer_revision_sorts_last_in_a_viewer(two_images):
    """OHIF shows the SR of a series with the highest InstanceNumber (then the larger SOP Instance UID string):
    the revision is the InstanceNumber, so the newer result wins; a retry of a revision is the same object."""
    older = decode(encode(build_sr(study_result([two_images[0]], revision=3), 9000)))
    newer = decode(encode(build_sr(study_result(list(two_images), revision=4), 9000, previous=older)))
    assert newer.SeriesInstanceUID == older.SeriesInstanceUID
    assert (older.InstanceNumber, newer.InstanceNumber) == (3, 4)
    assert encode(build_sr(study_result(list(two_images), revision=4), 9000, previous=older)) == encode(newer)
    with pytest.raises(ValueError):
        study_result([two_images[0]], revision=0)


def test_input_headers_are_not_mutated(two_images):
    with_pixels = copy.deepcopy(two_images[0].source)
    with_pixels.PixelData = b"\x00\x01" * 16
    image = dataclasses.replace(two_images[0], source=with_pixels)
    skipped = source_header(8, sop_class=MR, modality="MR", drop=("StudyID", "PatientSex"))
    before = [copy.deepcopy(image.source), copy.deepcopy(skipped)]
    sr = build_sr(study_result([image], not_analysed=[(skipped, "modality MR")]), 9000)
    assert [image.source, skipped] == before
    assert "StudyID" not in skipped and "PixelData" not in sr


# --- robustness to real headers and character sets, validated by dciodvfy and dsrdump --------------------------
def test_sources_missing_type2_attributes_and_orientation_build_valid_sr(tmp_path):
    bare = source_header(1, sop_class=CR, modality="CR",
                         drop=TYPE2 + ("PatientOrientation", "ImagerPixelSpacing", "Laterality", "Manufacturer"))
    empty = source_header(2)
    empty.PatientOrientation = ""
    empty.PatientSex = ""
    study = study_result([image_result(bare), image_result(empty)])
    sr = decode(encode(build_sr(study, 9000)))
    for keyword in TYPE2:
        assert keyword in sr and not sr[keyword].value, keyword
    errors, _ = dciodvfy_errors(write(sr, tmp_path / "sr.dcm"))
    assert errors == []


@pytest.mark.parametrize(
    "charset, name",
    [
        ("ISO_IR 192", "Müller^Zoë=李^小龍"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("ISO_IR 100", "Müller^Zoë"),
    ],
)
def test_character_sets_survive(tmp_path, charset, name):
    received = decode(encode(source_header(1, charset=charset, patient_name=name)))  # as read from the wire
    sr = decode(encode(build_sr(study_result([image_result(received)]), 9000)))
    assert str(sr.PatientName) == name
    errors, _ = dciodvfy_errors(write(sr, tmp_path / "sr.dcm"))
    assert errors == []


def test_every_sr_variant_validates(tmp_path, two_images):
    mr = source_header(5, sop_class=MR, modality="MR")
    findings = build_sr(study_result(list(two_images), not_analysed=[(mr, "modality MR not eligible")]), 9000)
    not_analysed = build_not_analysed_sr(study_result([], not_analysed=[(mr, "modality MR not eligible")]), 9000)
    superseding = build_sr(study_result(list(two_images)), 9000, previous=not_analysed)
    for name, sr in (("findings", findings), ("not-analysed", not_analysed), ("superseding", superseding)):
        path = write(sr, tmp_path / f"{name}.dcm")
        errors, warnings = dciodvfy_errors(path)
        assert errors == [], (name, errors)
        unexpected = [w for w in warnings if "99MSKNODE" not in w and "99IHE" not in w and "DeviceUID" not in w]
        assert unexpected == [], (name, unexpected)
        tree = dsrdump(path)
        assert "Imaging Measurement Report" in tree
    assert "Fracture probability" in dsrdump(tmp_path / "findings.dcm")
    assert "Reason not analysed" in dsrdump(tmp_path / "not-analysed.dcm")


def test_not_analysed_private_and_non_image_instances_keep_their_classes(tmp_path):
    private = source_header(11, sop_class="1.2.826.0.1.3680043.8.498.99.1", modality="OT")
    text_sr = source_header(12, sop_class="1.2.840.10008.5.1.4.1.1.88.11", modality="SR")
    study = study_result([], not_analysed=[(private, "private SOP class not eligible"), (text_sr, "not an image")])
    sr = decode(encode(build_not_analysed_sr(study, 9000)))
    evidence = {
        str(ref.ReferencedSOPInstanceUID): str(ref.ReferencedSOPClassUID)
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in (private, text_sr)}
    evaluations = only(children(sr, *key(codes.QUALITATIVE_EVALUATIONS)))
    targets = {item.ContentSequence[0].ValueType for item in children(evaluations, *key(codes.REASON_NOT_ANALYSED))}
    assert targets == {"COMPOSITE"}
    assert private.SOPClassUID == "1.2.826.0.1.3680043.8.498.99.1", "input untouched"
    errors, _ = dciodvfy_errors(write(sr, tmp_path / "sr.dcm"))
    assert errors == []


def test_highdicom_reads_every_group_back(two_images):
    """highdicom's TID 1500 parser finds one planar ROI group per image with its region, values and classes."""
    without_region = image_result(source_header(3), region=None)
    sr = hd.sr.Comprehensive3DSR.from_dataset(decode(encode(build_sr(study_result(list(two_images) + [
        without_region]), 9000))))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 3 and not sr.content.get_image_measurement_groups()
    by_finding = {}
    for group in groups:
        assert group.roi is not None and group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        by_finding.setdefault(group.finding_type.value, []).append(group)
        measured = {m.name.value: (m.value, m.unit.value) for m in group.get_measurements()}
        assert measured["ABNSCORE"][1] == "{score}" and measured["FXPROB"][1] == "%"
    assert sorted((k, len(v)) for k, v in by_finding.items()) == [("HIGHERRREGION", 2), ("WHOLEIMAGE", 1)]
    classes = {q.name.value: q.value.value for g in groups for q in g.get_qualitative_evaluations()}
    assert classes["KLGRADE"] in {"KL0", "KL3"}
