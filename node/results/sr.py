"""Comprehensive 3D SR (TID 1500 Measurement Report) with the model's findings for one study.

Tree (see docs/results.md for the codes)::

    CONTAINER Imaging Measurement Report (TID 1500)
      HAS CONCEPT MOD  Language: en-US
      HAS OBS CONTEXT  Observer type: Device (uid, node name, manufacturer, model name, serial = encoder sha256)
      HAS CONCEPT MOD  Procedure reported: XR unspecified body region
      CONTAINS  Image Library (TID 1600): the analysed images
      CONTAINS  Imaging Measurements
        per (image, model): one TID 1410 group, placed by viewers: tracking identifier and UID, finding (highest-
        error region or whole image), algorithm (TID 4019), SCOORD POLYLINE (the region, or the image outline) in
        source pixels SELECTED FROM the image, NUMs most important first (probabilities in %, percentile in %,
        score in {score}), the class of softmax heads as qualitative evaluations
      CONTAINS  Qualitative Evaluations: triage priority; "not analysed" status and reasons

Every measurement group has a spatial coordinate: OHIF v3 turns each group into an annotation and stops placing
all of them at the first one without (``coords[0]`` undefined). The not-analysed variant keeps the header,
observer and procedure, and carries only the status and one reason per instance. Superseding goes through
Predecessor Documents Sequence (every SR the node built earlier for the study), the revision as InstanceNumber and
one report series per (study, model, description), so a viewer showing a series' highest InstanceNumber shows
the newest.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CompositeContentItem,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code
from pydicom.uid import SecondaryCaptureImageStorage
from pydicom.valuerep import DA, DT, TM

from node.results import codes
from node.results.headers import normalised, patient_orientation
from node.results.model import DocumentReference, HeadOutput, ImageResult, ModelInfo, StudyResult
from node.results.sop_classes import coded_modality, has_standard_iod, is_image_class, is_multi_frame_class
from node.results.uids import (
    content_digest,
    device_uid,
    instance_uid,
    report_series_uid,
    sorted_images,
    sr_instance_number,
    tracking_uid,
)

CONTAINS = RelationshipTypeValues.CONTAINS
HAS_ACQ_CONTEXT = RelationshipTypeValues.HAS_ACQ_CONTEXT
HAS_CONCEPT_MOD = RelationshipTypeValues.HAS_CONCEPT_MOD
INFERRED_FROM = RelationshipTypeValues.INFERRED_FROM
PIXELS = Code("{pixels}", "UCUM", "Pixels")
ENGLISH = Code("en-US", "RFC5646", "English (United States)")
SOURCE = Code("260753009", "SCT", "Source")


def series_description(kind: str, priority: str, model: ModelInfo) -> str:
    """"AI <PRIORITY> <what> <model> <version>", at most 64 characters (LO)."""
    what = {"sr": f"{priority} findings", "sr-not-analysed": "NOT ANALYSED", "sc": f"{priority} error map"}[kind]
    text = f"AI {what} {model.name} {model.version}"
    return text if len(text) <= 64 else text[:64]


# --- public builders -------------------------------------------------------------------------------------------
# One earlier SR, or all of them (each a dataset or its identifiers).
Previous = Dataset | DocumentReference | Sequence[Dataset | DocumentReference] | None


def build_sr(study: StudyResult, series_number: int, previous: Previous = None) -> hd.sr.Comprehensive3DSR:
    """The findings SR of a study with at least one analysed image (not-analysed instances listed too)."""
    if not study.images:
        raise ValueError("no analysed image: use build_not_analysed_sr")
    return _build(study, series_number, previous, kind="sr")


def build_not_analysed_sr(study: StudyResult, series_number: int, previous: Previous = None) -> hd.sr.Comprehensive3DSR:
    """A short SR saying the study was not analysed and why (one reason per instance), no measurements."""
    if study.images:
        raise ValueError("the study has analysed images: use build_sr")
    if not study.not_analysed:
        raise ValueError("nothing to report: no not-analysed instance given")
    return _build(study, series_number, previous, kind="sr-not-analysed")


# --- assembly --------------------------------------------------------------------------------------------------
def _build(study: StudyResult, series_number: int, previous: Previous, kind: str) -> hd.sr.Comprehensive3DSR:
    images = sorted_images(study.images)
    skipped = sorted(study.not_analysed, key=lambda pair: str(pair[0].SOPInstanceUID))
    sources = {str(im.source.SOPInstanceUID): normalised(im.source) for im in images}
    skipped_sources = [(normalised(ds), reason) for ds, reason in skipped]
    evidence = list(sources.values()) + [ds for ds, _ in skipped_sources if str(ds.SOPInstanceUID) not in sources]
    evidence, true_classes = _known_class_first(evidence)
    previous_refs = _previous_references(previous)

    series = report_series_uid(kind, study.study_instance_uid, study.model, series_number,
                               series_description(kind, study.priority, study.model))
    sop = instance_uid(kind, series, _digest(study, series_number, previous_refs, kind))

    root = ContainerContentItem(name=dcm_codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = ContentSequence()
    root.ContentSequence.extend(LanguageOfContentItemAndDescendants(ENGLISH))
    root.ContentSequence.extend(observation_context(study.model, study.node_name))
    root.ContentSequence.append(
        CodeContentItem(
            name=dcm_codes.DCM.ProcedureReported, value=codes.PROCEDURE_XR, relationship_type=HAS_CONCEPT_MOD
        )
    )
    library_images = [(sources[uid], frame) for uid, frame in _image_positions(images)]
    if kind == "sr-not-analysed":  # the findings SR's library holds only what was analysed
        library_images += [(ds, 0) for ds, _ in skipped_sources if is_image(ds)]
    if library_images:
        root.ContentSequence.append(_image_library(library_images))
    if images:
        root.ContentSequence.append(_imaging_measurements(study, images, sources))
    elif placeable := [(ds, reason) for ds, reason in skipped_sources if is_image(ds) and _has_size(ds)]:
        # OHIF 3.13's SR viewport throws on a report without a measurement group, so each not-analysed image
        # gets a group outlining it (no values); the reasons stay in Qualitative Evaluations.
        root.ContentSequence.append(_not_analysed_measurements(study, placeable))
    root.ContentSequence.append(_qualitative_evaluations(study, skipped_sources, with_priority=bool(images)))

    created = study.created_at
    sr = comprehensive_sr(evidence, root, series, series_number, sop, study.revision, study.model, created,
                          previous_refs, series_description(kind, study.priority, study.model))
    _restore_evidence_classes(sr, true_classes)
    freeze_timestamps(sr, created)
    add_algorithm_equipment(sr, study)
    return sr


def comprehensive_sr(evidence: Sequence[Dataset], content: Dataset, series: str, series_number: int, sop: str,
                     revision: int, model: ModelInfo, created: datetime, previous: Sequence[Dataset] | None,
                     description: str) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR every report of ours is (radiograph and knee MRI): our manufacturer, the model as
    manufacturer model name and software version, every date and time the study result's creation time."""
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=series,
        series_number=series_number,
        sop_instance_uid=sop,
        instance_number=sr_instance_number(revision),
        manufacturer=model.manufacturer,
        is_complete=True,
        previous_versions=previous or None,
        series_description=description,
        coding_schemes=codes.coding_schemes(),
        manufacturer_model_name=model.name,
        software_versions=model.version,
        content_date=created.date(),
        content_time=created.time(),
        series_date=created.date(),
        series_time=created.time(),
    )


def _known_class(dataset: Dataset) -> bool:
    return has_standard_iod(str(dataset.SOPClassUID))


def _known_class_first(evidence: list[Dataset]) -> tuple[list[Dataset], dict[str, str]]:
    """Evidence with an instance of a standard SOP class first: highdicom copies the patient and study modules
    from ``evidence[0]`` by looking up its IOD, which fails for private SOP classes (the node stores those too).
    If none is standard, the first gets a stand-in class; the true classes are put back afterwards."""
    for position, dataset in enumerate(evidence):
        if _known_class(dataset):
            return [dataset] + evidence[:position] + evidence[position + 1:], {}
    stand_in = copy.deepcopy(evidence[0])
    stand_in.SOPClassUID = SecondaryCaptureImageStorage
    return [stand_in] + evidence[1:], {str(evidence[0].SOPInstanceUID): str(evidence[0].SOPClassUID)}


def _restore_evidence_classes(sr: Dataset, true_classes: dict[str, str]) -> None:
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study_item in sr.get(keyword, []):
            for series in study_item.ReferencedSeriesSequence:
                for reference in series.ReferencedSOPSequence:
                    uid = str(reference.ReferencedSOPInstanceUID)
                    if uid in true_classes:
                        reference.ReferencedSOPClassUID = true_classes[uid]


def _digest(study: StudyResult, series_number: int, previous: list[Dataset], kind: str) -> str:
    """Everything that goes into the SR's content, so different content never shares a SOP Instance UID."""
    payload = {
        "kind": kind,
        "study": study.study_instance_uid,
        "series_number": series_number,
        "revision": study.revision,
        "priority": study.priority,
        "created_at": study.created_at.isoformat(),
        "node": study.node_name,
        "model": study.model.identity,
        "backend": study.model.backend,
        "manufacturer": study.model.manufacturer,
        # One predecessor digests as before (its UID), several as the sorted list of their UIDs.
        "previous": (None if not previous else str(previous[0].SOPInstanceUID) if len(previous) == 1
                     else [str(ref.SOPInstanceUID) for ref in previous]),
        "images": [
            {
                "sop": str(im.source.SOPInstanceUID),
                "frame": im.frame_index,
                "sha256": im.source_sha256,
                "model": None if im.model is None else [im.model.identity, im.model.backend, im.model.manufacturer],
                "score": None if im.score is None else repr(float(im.score)),
                "percentile": None if im.percentile is None else repr(float(im.percentile)),
                "heads": [
                    [h.name, h.labels, [repr(float(p)) for p in h.probabilities], h.activation]
                    + ([h.unit] if h.unit else []) + ([["finding", h.finding]] if h.finding is not None else [])
                    for h in im.heads
                ],
                "region": None if im.region is None else np.asarray(im.region, dtype=np.float64).tolist(),
            }
            for im in sorted_images(study.images)
        ],
        "not_analysed": sorted((str(ds.SOPInstanceUID), reason) for ds, reason in study.not_analysed),
    }
    return content_digest(payload)


def _previous_references(previous: Previous) -> list[Dataset]:
    """The four identifiers highdicom's Predecessor Documents Sequence needs, from datasets or references;
    one per SOP Instance UID, sorted by it (so the same set always builds the same SR)."""
    if previous is None:
        return []
    items = [previous] if isinstance(previous, (Dataset, DocumentReference)) else list(previous)
    refs = {}
    for item in items:
        ref = item if isinstance(item, DocumentReference) else DocumentReference.from_dataset(item)
        refs[ref.sop_instance_uid] = ref
    datasets = []
    for uid in sorted(refs):
        ref = refs[uid]
        ds = Dataset()
        ds.StudyInstanceUID = ref.study_instance_uid
        ds.SeriesInstanceUID = ref.series_instance_uid
        ds.SOPInstanceUID = ref.sop_instance_uid
        ds.SOPClassUID = ref.sop_class_uid
        datasets.append(ds)
    return datasets


def observation_context(model: ModelInfo, node_name: str) -> ObservationContext:
    """The device observer of every SR we write (TID 1004): its UID is tied to the weights, its serial number is
    the weights' hash, so a viewer tells two models' reports apart."""
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(model),
        name=node_name,
        manufacturer_name=model.manufacturer,
        model_name=model.name,
        serial_number=model.encoder_sha256,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentification:
    """TID 4019 with everything needed to reproduce the error map."""
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=dcm_codes.cid7162.ArtificialIntelligence,
        manufacturer=model.manufacturer,
        parameters=(
            [f"passes={model.passes}", f"mask_ratio={model.mask_ratio!r}", f"seed={model.seed}"]
            if model.has_error_map else []
        ) + [
            f"backend={model.backend}",
            f"encoder_sha256={model.encoder_sha256}",
        ],
    )


def frame_numbers(source: Dataset, frame_index: int) -> list[int] | None:
    """1-based referenced frame numbers, only for sources of a multi-frame IOD (highdicom refuses them else)."""
    if is_multi_frame_class(str(source.SOPClassUID)) and int(source.get("NumberOfFrames", 1) or 1) > 1:
        return [frame_index + 1]
    if frame_index != 0:
        raise ValueError(f"frame_index {frame_index} given for a single-frame source")
    return None


def _image_library(entries: Sequence[tuple[Dataset, int]]) -> ContainerContentItem:
    """TID 1600, written here because highdicom's needs ImagerPixelSpacing and a 2-value PatientOrientation,
    which CR headers often lack; rows that the source cannot fill are left out (all are optional in TID 1602)."""
    group = ContainerContentItem(name=dcm_codes.DCM.ImageLibraryGroup, relationship_type=CONTAINS)
    group.ContentSequence = ContentSequence()
    for source, frame_index in entries:
        item = ImageContentItem(
            name=SOURCE,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            referenced_frame_numbers=frame_numbers(source, frame_index),
            relationship_type=CONTAINS,
        )
        item.ContentSequence = ContentSequence(_library_descriptors(source))
        group.ContentSequence.append(item)
    library = ContainerContentItem(name=dcm_codes.DCM.ImageLibrary, relationship_type=CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def _library_descriptors(source: Dataset) -> list:
    descriptors: list = []
    modality = coded_modality(str(source.SOPClassUID))
    if modality is not None:
        descriptors.append(
            CodeContentItem(name=dcm_codes.DCM.Modality, value=modality, relationship_type=HAS_ACQ_CONTEXT)
        )
    for concept, keyword in ((dcm_codes.DCM.PixelDataRows, "Rows"), (dcm_codes.DCM.PixelDataColumns, "Columns")):
        if source.get(keyword):
            descriptors.append(
                NumContentItem(name=concept, value=int(source[keyword].value), unit=PIXELS,
                               relationship_type=HAS_ACQ_CONTEXT)
            )
    orientation = patient_orientation(source)
    if orientation is not None:
        for concept, value in zip((dcm_codes.DCM.PatientOrientationRow, dcm_codes.DCM.PatientOrientationColumn),
                                  orientation):
            descriptors.append(TextContentItem(name=concept, value=value, relationship_type=HAS_ACQ_CONTEXT))
    spacing = source.get("ImagerPixelSpacing") or source.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        for concept, value in ((dcm_codes.DCM.HorizontalPixelSpacing, spacing[1]),
                                            (dcm_codes.DCM.VerticalPixelSpacing, spacing[0])):
            descriptors.append(
                NumContentItem(name=concept, value=float(value), unit=dcm_codes.UCUM.Millimeter,
                               relationship_type=HAS_ACQ_CONTEXT)
            )
    return descriptors


def _header_int(source: Dataset, keyword: str) -> int:
    """An IS attribute as an int for ordering; missing or malformed (dirty headers) counts as 0."""
    try:
        return int(source.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _viewer_order(source: Dataset, frame: int) -> tuple[int, int, str, int]:
    """The order a viewer lists images in (series number, instance number), then the UID: "Image n" is the n-th."""
    return (_header_int(source, "SeriesNumber"), _header_int(source, "InstanceNumber"), str(source.SOPInstanceUID),
            frame)


def _image_positions(images: Sequence[ImageResult]) -> list[tuple[str, int]]:
    """The distinct analysed (SOP Instance UID, frame) pairs in viewer order."""
    first = {}
    for image in images:
        first.setdefault((str(image.source.SOPInstanceUID), image.frame_index), image.source)
    return sorted(first, key=lambda position: _viewer_order(first[position], position[1]))


def _imaging_measurements(
    study: StudyResult, images: Sequence[ImageResult], sources: dict[str, Dataset]
) -> ContainerContentItem:
    """One TID 1410 group per (image, model); several models on one image give several groups."""
    container = ContainerContentItem(name=dcm_codes.DCM.ImagingMeasurements, relationship_type=CONTAINS)
    container.ContentSequence = ContentSequence()
    positions = _image_positions(images)
    several_models = len(study.models) > 1
    for image in images:
        model = study.model_of(image)
        number = positions.index((str(image.source.SOPInstanceUID), image.frame_index)) + 1
        source = sources[str(image.source.SOPInstanceUID)]
        frames = frame_numbers(source, image.frame_index)
        label = f"Image {number}" + (f" {model.name}" if several_models else "")
        container.ContentSequence.extend(_result_group(study, model, image, source, frames, label))
    return container


def _has_size(source: Dataset) -> bool:
    return _header_int(source, "Rows") > 0 and _header_int(source, "Columns") > 0


def _not_analysed_measurements(study: StudyResult, skipped: Sequence[tuple[Dataset, str]]) -> ContainerContentItem:
    """One TID 1410 group per not-analysed image: its outline, finding "Not analysed", no measurement."""
    container = ContainerContentItem(name=dcm_codes.DCM.ImagingMeasurements, relationship_type=CONTAINS)
    container.ContentSequence = ContentSequence()
    algorithm = algorithm_identification(study.model)
    ordered = sorted(skipped, key=lambda pair: _viewer_order(pair[0], 0))
    for number, (source, _reason) in enumerate(ordered, start=1):
        frames = [1] if is_multi_frame_class(str(source.SOPClassUID)) and _header_int(source, "NumberOfFrames") > 1 \
            else None
        region = ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=whole_image_outline(source),
            source_image=SourceImageForRegion.from_source_image(source, frames),
        )
        tracking = TrackingIdentifier(
            uid=tracking_uid(study.study_instance_uid, str(source.SOPInstanceUID), 0, f"not-analysed|{study.model.name}"),
            identifier=f"Image {number} not analysed",
        )
        container.ContentSequence.extend(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=region, finding_type=codes.NOT_ANALYSED,
            algorithm_id=algorithm,
        ))
    return container


def whole_image_outline(source: Dataset) -> np.ndarray:
    """Closed POLYLINE along the image border, (column, row) with (0, 0) the top-left corner of the first pixel
    and (Columns, Rows) the bottom-right corner of the last (PS3.3 C.18.6.1.2)."""
    columns, rows = float(source.Columns), float(source.Rows)
    return np.array([[0.0, 0.0], [columns, 0.0], [columns, rows], [0.0, rows], [0.0, 0.0]])


def percent(probability: float) -> float:
    """A probability in [0, 1] as percent, rounded to 10 significant digits (no 10.000000000000002)."""
    return float(f"{probability * 100.0:.10g}")


def ordered_measurements(image: ImageResult) -> list[Measurement]:
    """NUMs, the most important first (a viewer may show only the first few lines, OHIF shows 5):

    1. each head's key value: every label's probability of a sigmoid head, the top class's probability of a
       softmax head, every value of an identity head (in its own unit);
    2. the score's percentile (when calibrated); 3. the abnormality score;
    4. the other classes' probabilities of softmax heads.
    """
    first: list[Measurement] = []
    rest: list[Measurement] = []
    for head in image.heads:
        for label, value in zip(head.labels, head.probabilities):
            if head.activation == "identity":
                first.append(Measurement(name=codes.output_concept(head.name, label), value=float(value),
                                         unit=codes.ucum(head.unit)))
                continue
            item = Measurement(name=codes.probability_concept(head.name, label), value=percent(value),
                               unit=codes.UNITS_PERCENT)
            key_value = head.activation == "sigmoid" or label == head.top_label
            (first if key_value else rest).append(item)
    if image.percentile is not None:
        first.append(
            Measurement(name=codes.ABNORMALITY_PERCENTILE, value=float(image.percentile), unit=codes.UNITS_PERCENT)
        )
    if image.score is not None:  # a model without an error map has no abnormality score
        first.append(Measurement(name=codes.ABNORMALITY_SCORE, value=float(image.score), unit=codes.UNITS_SCORE))
    return first + rest


def class_evaluations(heads: Sequence[HeadOutput]) -> list[QualitativeEvaluation]:
    """The decided finding of a head that has one (a region-guided classifier's "Bone tumour: present"), else the
    argmax class of every softmax head (e.g. Kellgren-Lawrence grade = KL3)."""
    return [
        QualitativeEvaluation(codes.head_concept(head.name),
                              codes.class_value(head.name, head.finding if head.finding is not None else head.top_label))
        for head in heads
        if head.finding is not None or head.activation == "softmax"
    ]


def _result_group(
    study: StudyResult, model: ModelInfo, image: ImageResult, source: Dataset, frames: list[int] | None,
    label: str,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one image and one model: the region (highest-error region, else the whole image) as a closed
    SCOORD POLYLINE in source pixels, with the image's values. A viewer places it on the image and prints the
    values beside it; readers of TID 1500 find the same values, classes and algorithm as before."""
    if image.region is not None:
        points, finding, what = closed_polyline(image.region), codes.HIGHEST_ERROR_REGION, "highest-error region"
    else:
        points, finding, what = whole_image_outline(source), codes.WHOLE_IMAGE, "whole image"
    region = ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=SourceImageForRegion.from_source_image(source, frames),
    )
    tracking = TrackingIdentifier(
        uid=tracking_uid(study.study_instance_uid, str(source.SOPInstanceUID), image.frame_index,
                         f"image|{model.name}"),
        identifier=f"{label} {what}",
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=finding,
        algorithm_id=algorithm_identification(model),
        measurements=ordered_measurements(image),
        qualitative_evaluations=class_evaluations(image.heads) or None,
    )


def closed_polyline(region: np.ndarray) -> np.ndarray:
    """(column, row) float points with the first point repeated at the end (a closed POLYLINE)."""
    points = np.asarray(region, dtype=np.float64)
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def _qualitative_evaluations(
    study: StudyResult, skipped: Sequence[tuple[Dataset, str]], with_priority: bool
) -> ContainerContentItem:
    """TID 1500 row 10: study-level items (triage priority; not-analysed status with a reason per instance)."""
    container = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=CONTAINS)
    container.ContentSequence = ContentSequence()
    if with_priority:
        container.ContentSequence.append(
            CodeContentItem(name=codes.TRIAGE_PRIORITY, value=codes.PRIORITY_VALUES[study.priority],
                            relationship_type=CONTAINS)
        )
    else:
        container.ContentSequence.append(
            CodeContentItem(name=codes.ANALYSIS_STATUS, value=codes.NOT_ANALYSED, relationship_type=CONTAINS)
        )
    for source, reason in skipped:
        item = TextContentItem(name=codes.REASON_NOT_ANALYSED, value=reason, relationship_type=CONTAINS)
        item.ContentSequence = ContentSequence([_reference(source)])
        container.ContentSequence.append(item)
    return container


def is_image(source: Dataset) -> bool:
    """Whether the source's IOD has pixel data; private or unknown SOP classes count as not an image."""
    return is_image_class(str(source.SOPClassUID))


def _reference(source: Dataset) -> ImageContentItem | CompositeContentItem:
    if is_image(source):
        return ImageContentItem(
            name=SOURCE, referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type=INFERRED_FROM,
        )
    return CompositeContentItem(
        name=SOURCE, referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type=INFERRED_FROM,
    )


# --- shared with the SC builder --------------------------------------------------------------------------------
def freeze_timestamps(dataset: Dataset, created: datetime) -> None:
    """Replace every "now" highdicom wrote with ``created``, so rebuilding gives the same bytes."""
    dataset.InstanceCreationDate = DA(created.date())
    dataset.InstanceCreationTime = TM(created.time())
    if "DateOfSecondaryCapture" in dataset:
        dataset.DateOfSecondaryCapture = DA(created.date())
        dataset.TimeOfSecondaryCapture = TM(created.time())
    for item in dataset.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(created)
    if created.utcoffset() is not None:
        offset = int(created.utcoffset().total_seconds() // 60)
        sign = "+" if offset >= 0 else "-"
        dataset.TimezoneOffsetFromUTC = f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"


def add_algorithm_equipment(dataset: Dataset, study: StudyResult, models: Sequence[ModelInfo] | None = None) -> None:
    """IHE AIR: describe each algorithm in Contributing Equipment (purpose 99IHE "Processing Algorithm").

    Added by hand: highdicom's ContributingEquipment accepts only DCM purposes and raises on this code.
    ``models`` defaults to every model with a result in the study.
    """
    for model in (study.models if models is None else models):
        dataset.ContributingEquipmentSequence.append(
            algorithm_equipment_item(model, study.created_at, study.node_name))


def algorithm_equipment_item(model: ModelInfo, created: datetime, node_name: str) -> Dataset:
    """One IHE AIR Contributing Equipment item for ``model`` (also used by the MRI SEG / SR / SC builders)."""
    purpose = Dataset()
    purpose.CodeValue = codes.PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = codes.PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = codes.PROCESSING_ALGORITHM.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = model.manufacturer
    item.ManufacturerModelName = model.name
    item.SoftwareVersions = model.version
    item.DeviceUID = device_uid(model)
    item.ContributionDateTime = DT(created)
    item.ContributionDescription = f"AI algorithm {model.name} {model.version} (node {node_name})"
    return item
