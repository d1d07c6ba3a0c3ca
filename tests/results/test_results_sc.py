"""The error-map Secondary Capture: geometry, banner, overlay, header, determinism, dciodvfy."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

from node.results import build_sc
from node.results.render import plan_layout
from tests.results.helpers import dciodvfy_errors, decode, encode, write
from tests.results.sources import CR, display_and_map, image_result, model_info, source_header, study_result


def hot_spot_image(source, long_side: int = 256):
    """An ImageResult whose error map is hot in the top-left quarter-block and flat elsewhere."""
    display, _ = display_and_map(source, long_side=long_side)
    display = np.full_like(display, 128)
    error = np.zeros(display.shape, dtype=np.float32)
    h, w = display.shape
    error[h // 8: h // 3, w // 8: w // 3] = 1.0
    return dataclasses.replace(image_result(source), display=display, error_map=error)


def test_sc_keeps_the_source_aspect_and_long_side_limit():
    for rows, columns, long_side in ((2500, 2048, 256), (1800, 3000, 700), (3000, 2400, 2048)):
        source = source_header(1, rows=rows, columns=columns)
        display, error = display_and_map(source, long_side=long_side)
        image = dataclasses.replace(image_result(source), display=display, error_map=error)
        sc = decode(encode(build_sc(image, study_result([image]), 9001, 1)))
        layout = plan_layout(*display.shape)
        assert (sc.Rows, sc.Columns) == (layout.height, layout.width)
        assert max(sc.Rows, sc.Columns) <= 2048
        assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
        # The radiograph band keeps the source's aspect ratio (within one pixel of rounding).
        assert abs(layout.image_rows / layout.width - rows / columns) <= 1.0 / layout.width + 1e-9
        assert abs(layout.image_rows - round(layout.width * rows / columns)) <= 1


def test_banner_is_burned_in_and_names_the_model():
    source = source_header(1)
    image = hot_spot_image(source)
    study = study_result([image])
    pixels = decode(encode(build_sc(image, study, 9001, 1))).pixel_array
    layout = plan_layout(*image.display.shape)
    banner = pixels[: layout.banner_rows]
    assert (banner.max(axis=-1) >= 200).sum() > 50, "white text in the banner"
    assert (banner.max(axis=-1) <= 30).mean() > 0.5, "on a black band"
    other = study_result([image], name="other-model")
    other_pixels = decode(encode(build_sc(other.images[0], other, 9001, 1))).pixel_array
    assert not np.array_equal(other_pixels[: layout.banner_rows], banner), "banner text changes with the model"
    np.testing.assert_array_equal(other_pixels[layout.banner_rows:], pixels[layout.banner_rows:])


def test_error_map_is_blended_where_the_error_is_high():
    source = source_header(1)
    image = hot_spot_image(source)
    pixels = decode(encode(build_sc(image, study_result([image]), 9001, 1))).pixel_array.astype(int)
    layout = plan_layout(*image.display.shape)
    band = pixels[layout.image_top: layout.bar_top]
    h, w = band.shape[:2]
    hot = band[h // 5, w // 5]
    cold = band[h * 3 // 4, w * 3 // 4]
    assert hot[0] > hot[2] + 60, "hot spot is tinted red/yellow"
    assert abs(cold[0] - cold[2]) <= 2 and abs(cold[0] - 128) <= 2, "zero-error area stays the grey radiograph"
    bar = pixels[layout.bar_top:]
    assert bar[..., 0].max() > 200 and (bar[..., 0] - bar[..., 2]).max() > 150, "colour bar shows the ramp"


def test_header_references_the_radiograph_and_copies_patient_and_study():
    source = source_header(3, sop_class=CR, modality="CR")
    image = hot_spot_image(source)
    study = study_result([image], priority="URGENT")
    sc = decode(encode(build_sc(image, study, 9001, 4)))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber", "StudyID", "PatientSex"):
        assert sc[keyword].value == source[keyword].value, keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sc.SeriesNumber, sc.InstanceNumber) == (9001, 10004)  # revision 1, position 4
    assert sc.SeriesDescription.startswith("AI URGENT")
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    reference = sc.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    purpose = reference.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert "error map" in sc.DerivationDescription and study.model.name in sc.DerivationDescription
    assert sc.BurnedInAnnotation == "NO"
    assert (sc.Laterality, sc.BodyPartExamined, list(sc.PatientOrientation)) == ("L", "KNEE", ["A", "F"])
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    air = [e for e in sc.ContributingEquipmentSequence
           if e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"]
    assert len(air) == 1 and air[0].SoftwareVersions == study.model.version


def test_same_inputs_give_byte_identical_sc_and_one_series_per_input_set():
    first_source, second_source = source_header(1), source_header(2)
    first, second = hot_spot_image(first_source), hot_spot_image(second_source)
    study = study_result([first, second])
    a = encode(build_sc(first, study, 9001, 1))
    assert encode(build_sc(first, study_result([second, first]), 9001, 1)) == a
    b = decode(encode(build_sc(second, study, 9001, 2)))
    assert decode(a).SeriesInstanceUID == b.SeriesInstanceUID
    assert decode(a).SOPInstanceUID != b.SOPInstanceUID
    fewer = study_result([first])
    assert decode(encode(build_sc(first, fewer, 9001, 1))).SeriesInstanceUID != b.SeriesInstanceUID


def test_a_newer_result_set_never_interleaves_with_an_older_one():
    """Same inputs, a later revision: the same SC series, every new InstanceNumber above every old one (a viewer
    stacks the series by InstanceNumber: the old set, then the new one, never 1, 2, 3, 1, 2, 3)."""
    images = [hot_spot_image(source_header(n)) for n in (1, 2, 3)]
    numbers = {}
    series = set()
    for revision in (1, 2):
        study = study_result(images, revision=revision)
        built = [decode(encode(build_sc(image, study, 9001, position))) for position, image in
                 enumerate(study.images, start=1)]
        numbers[revision] = [int(ds.InstanceNumber) for ds in built]
        series |= {ds.SeriesInstanceUID for ds in built}
    assert len(series) == 1
    assert numbers == {1: [10001, 10002, 10003], 2: [20001, 20002, 20003]}
    assert max(numbers[1]) < min(numbers[2])
    with pytest.raises(ValueError):
        build_sc(images[0], study_result(images), 9001, 10_000)


def test_several_models_get_one_sc_series_each():
    image = hot_spot_image(source_header(1))
    other = dataclasses.replace(image, model=model_info(name="fracture-net", version="2.0"))
    study = study_result([image, other])
    mine, theirs = (decode(encode(build_sc(im, study, 9001, 1))) for im in (image, other))
    assert mine.SeriesInstanceUID != theirs.SeriesInstanceUID
    assert theirs.SeriesDescription.endswith("fracture-net 2.0") and theirs.ManufacturerModelName == "fracture-net"


def test_inputs_are_not_mutated():
    source = source_header(1)
    source.PixelData = b"\x00\x00" * 8
    image = hot_spot_image(source)
    before = (copy.deepcopy(source), image.display.copy(), image.error_map.copy())
    build_sc(image, study_result([image]), 9001, 1)
    assert image.source == before[0]
    np.testing.assert_array_equal(image.display, before[1])
    np.testing.assert_array_equal(image.error_map, before[2])


def test_image_must_belong_to_the_study():
    image = hot_spot_image(source_header(1))
    with pytest.raises(ValueError):
        build_sc(image, study_result([hot_spot_image(source_header(2))]), 9001, 1)


@pytest.mark.parametrize("jpeg", [False, True])
def test_sc_validates_with_real_world_headers(tmp_path, jpeg):
    bare = source_header(1, sop_class=CR, modality="CR", charset=["", "ISO 2022 IR 87"],
                         patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう",
                         drop=("StudyID", "PatientSex", "PatientBirthDate", "AccessionNumber", "ReferringPhysicianName",
                               "StudyDate", "StudyTime", "Laterality", "BodyPartExamined"))
    bare.PatientOrientation = ""
    received = decode(encode(bare))
    normal = source_header(2)
    study = study_result([hot_spot_image(received), hot_spot_image(normal)])
    for number, image in enumerate(study.images, start=1):
        sc = build_sc(image, study, 9001, number, jpeg=jpeg)
        path = write(sc, tmp_path / f"sc{number}.dcm")
        errors, _ = dciodvfy_errors(path)
        assert errors == [], errors
        back = decode(path.read_bytes())
        assert back.file_meta.TransferSyntaxUID == (JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian)
        assert back.pixel_array.shape == (back.Rows, back.Columns, 3)
        assert str(back.PatientName) == str(image.source.PatientName)
        if jpeg:
            assert back.PhotometricInterpretation == "YBR_FULL_422" and back.LossyImageCompression == "01"
    first = decode((tmp_path / "sc1.dcm").read_bytes())
    assert first.PatientOrientation == "" and first.Laterality == ""


def test_a_reduced_overlay_says_its_scale(tmp_path):
    """The SC shows the radiograph reduced: its Pixel Spacing is the source's times the reduction per axis (so a
    distance measured on it stays right), the derivation names both sizes, and dciodvfy accepts it."""
    source = source_header(1, rows=2500, columns=2048)
    source.PixelSpacing = [0.15, 0.15]
    display, error = display_and_map(source, long_side=600)
    image = dataclasses.replace(image_result(source), display=display, error_map=error)
    sc = build_sc(image, study_result([image]), 9001, 1)
    layout = plan_layout(*display.shape)
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx(
        [0.15 * 2500 / layout.image_rows, 0.15 * 2048 / layout.width], rel=1e-5)
    assert f"shown at {layout.width} x {layout.image_rows} of its 2048 x 2500 pixels" in sc.DerivationDescription
    errors, _ = dciodvfy_errors(write(sc, tmp_path / "sc.dcm"))
    assert errors == [], errors

    imager_only = source_header(2, rows=2500, columns=2048)  # Imager Pixel Spacing alone: no patient-plane claim
    assert "PixelSpacing" not in imager_only
    other = dataclasses.replace(image_result(imager_only), display=display, error_map=error)
    assert "PixelSpacing" not in build_sc(other, study_result([other]), 9001, 1)
