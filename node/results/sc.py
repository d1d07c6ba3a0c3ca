"""Secondary Capture of the error map over the radiograph, one per analysed image, in its own series."""

from __future__ import annotations

import hashlib

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from node.results import codes
from node.results.headers import laterality, normalised, patient_orientation
from node.results.model import ImageResult, ModelInfo, StudyResult
from node.results.render import ALPHA, render_error_map
from node.results.sr import add_algorithm_equipment, frame_numbers, freeze_timestamps, series_description
from node.results.uids import content_digest, input_key, input_set, instance_uid, sc_instance_number, series_uid

# highdicom insists on a valid orientation for PATIENT images; the source's own value (or empty) replaces it.
_PLACEHOLDER_ORIENTATION = ("A", "F")


def sc_series_uid(study: StudyResult, series_number: int, model: ModelInfo | None = None) -> str:
    """One SC series per (study, model, analysed input set, number, description): changed inputs give a new one.

    A newer revision with the same inputs joins the series; its InstanceNumbers (revision * 10000 + n) sort after
    the older set's, never between them. ``model``: whose maps (default the study's model).
    """
    model = study.model if model is None else model
    description = series_description("sc", study.priority, model)
    inputs = input_set(input_key(im) for im in study.images if study.model_of(im).identity == model.identity)
    return series_uid("sc", study.study_instance_uid, model, inputs, series_number, description)


def build_sc(
    image: ImageResult,
    study: StudyResult,
    series_number: int,
    position: int,
    *,
    jpeg: bool = False,
) -> hd.sc.SCImage:
    """RGB SC of ``image``'s error map; uncompressed Explicit VR LE, or JPEG baseline (YBR_FULL_422) if ``jpeg``.

    ``position`` is the image's 1-based place in this result set; InstanceNumber = revision * 10000 + position.
    """
    if not any(im is image for im in study.images):
        raise ValueError("the image must be one of the study's analysed images")
    if image.error_map is None:
        raise ValueError("the image's model has no error map: no secondary capture")
    model = study.model_of(image)
    instance_number = sc_instance_number(study.revision, position)
    source = normalised(image.source)
    pixels, layout = render_error_map(image.display, image.error_map, model.name, model.version)
    spacing = _scaled_pixel_spacing(source, layout.image_rows, layout.width)

    series = sc_series_uid(study, series_number, model)
    digest = content_digest(
        {
            "source": str(source.SOPInstanceUID),
            "frame": image.frame_index,
            "source_sha256": image.source_sha256,
            "pixels": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "shape": pixels.shape,
            "series_number": series_number,
            "instance_number": instance_number,
            "priority": study.priority,
            "created_at": study.created_at.isoformat(),
            "model": model.identity,
            "node": study.node_name,
            "jpeg": jpeg,
        }
    )
    orientation = patient_orientation(source)
    created = study.created_at
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="YBR_FULL_422" if jpeg else "RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series,
        series_number=series_number,
        sop_instance_uid=instance_uid("sc", series, digest),
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        patient_orientation=tuple(orientation) if orientation else _PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian,
        pixel_spacing=spacing,
        series_description=series_description("sc", study.priority, model),
        coding_schemes=codes.coding_schemes(private_codes=False),
        manufacturer_model_name=model.name,
        software_versions=model.version,
        content_date=created.date(),
        content_time=created.time(),
        series_date=created.date(),
        series_time=created.time(),
    )
    # Scaling keeps directions, so the source's orientation still holds; empty stays empty (Type 2C).
    sc.PatientOrientation = orientation if orientation else ""
    sc.Laterality = laterality(source)  # Type 2C; dciodvfy wants it present even when empty
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.BurnedInAnnotation = "NO"  # the banner carries no patient identifiers
    sc.RecognizableVisualFeatures = "NO"
    sc.SourceImageSequence = [_source_reference(source, image.frame_index)]
    sc.DerivationDescription = (
        f"Masked-autoencoder reconstruction error map of {model.name} {model.version} "
        f"({model.passes} passes, mask ratio {model.mask_ratio}, seed {model.seed}) "
        f"in the hot colormap at alpha {ALPHA} over the source radiograph, shown at {layout.width} x "
        f"{layout.image_rows} of its {int(source.Columns)} x {int(source.Rows)} pixels; banner and colour bar burned in"
    )[:1024]  # ST
    if jpeg:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = "ISO_10918_1"
    freeze_timestamps(sc, created)
    add_algorithm_equipment(sc, study, [model])
    return sc


def _scaled_pixel_spacing(source: Dataset, image_rows: int, image_columns: int) -> tuple[float, float] | None:
    """The source's Pixel Spacing (row, column mm) at the SC's scale, so distances measured on the SC stay right.

    The radiograph is shown reduced (``[results] overlay_max_size``), so its pixels are larger
    than the source's by source size / shown size, per axis. Only a source Pixel Spacing (patient plane) is carried
    over; a source with Imager Pixel Spacing alone gives none (its patient-plane calibration is unknown).
    """
    try:
        value = source.get("PixelSpacing")
        if value is None or len(value) != 2:
            return None
        row_mm, column_mm = float(value[0]), float(value[1])
        rows, columns = int(source.Rows), int(source.Columns)
    except Exception:  # noqa: BLE001 - a malformed element counts as absent, as in preprocessing
        return None
    if min(row_mm, column_mm, rows, columns) <= 0:
        return None
    return round(row_mm * rows / image_rows, 6), round(column_mm * columns / image_columns, 6)


def _source_reference(source: Dataset, frame_index: int) -> Dataset:
    purpose = Dataset()
    purpose.CodeValue = codes.SOURCE_IMAGE_PURPOSE.value
    purpose.CodingSchemeDesignator = codes.SOURCE_IMAGE_PURPOSE.scheme_designator
    purpose.CodeMeaning = codes.SOURCE_IMAGE_PURPOSE.meaning
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    frames = frame_numbers(source, frame_index)
    if frames is not None:
        item.ReferencedFrameNumber = frames[0]
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item
