"""Comprehensive 3D SR (TID 1500) with the knee MRI findings of one study.

Tree (codes in node/results/knee_codes.py, documented in docs/results.md)::

    CONTAINER Imaging Measurement Report (TID 1500)
      HAS CONCEPT MOD  Language en-US; HAS OBS CONTEXT device observer; HAS CONCEPT MOD procedure: MRI (LN 25056-3)
      CONTAINS  Image Library (TID 1600): one group per plane (sagittal, coronal, axial), every slice used
      CONTAINS  Imaging Measurements
        TID 1410 "Knee MRI findings": SCOORD outline of the central slice of the first plane's series (a viewer
          places the group there), algorithm (TID 4019), per label its probability (NUM, %) in table order,
          and per label a qualitative evaluation: the finding (e.g. ACL tear) = Present / Absent (threshold)
        optional (segment_volumes), TID 1411 per segmented structure: tracking identifier/UID as in the SEG,
          the referenced segment (SEG SOP Instance, segment number, source series), Volume (SCT 118565006) in mm3
      CONTAINS  Qualitative Evaluations: triage priority; per plane "AI input series" = Sagittal/Coronal/Axial with
        the series' Series Instance UID (UIDREF) and the selection reason (TEXT)

Probabilities are in percent, as the radiograph SR writes them (OHIF prints "<meaning>: 91.00 %"). The TID 1411
volume groups are standard but optional (``segment_volumes=True``): OHIF 3.13 reads
``coords[0].ReferencedSOPSequence`` of every group, throws on one without a SCOORD and then places none, the
findings group included (seen in the real OHIF 3.13.2 with this SR). So they are off by default; the SEG carries
the structures either way, and OHIF shows it (11 segments, no error).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    RelationshipTypeValues,
    SourceImageForRegion,
    SourceSeriesForSegmentation,
    TextContentItem,
    TrackingIdentifier,
    UIDRefContentItem,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import SegmentationStorage

from node.results import codes, knee_codes
from node.results.headers import normalised
from node.results.model import DocumentReference
from node.results.mri_model import MRIStudyResult
from node.results.seg import mri_series_description, segment_tracking_uid, series_input_set
from node.results.sr import (
    ENGLISH,
    SOURCE,
    algorithm_equipment_item,
    algorithm_identification,
    comprehensive_sr,
    freeze_timestamps,
    observation_context,
    percent,
    whole_image_outline,
)
from node.results.uids import (
    content_digest,
    instance_uid,
    report_series_uid,
    tracking_uid,
)

CONTAINS = RelationshipTypeValues.CONTAINS
HAS_CONCEPT_MOD = RelationshipTypeValues.HAS_CONCEPT_MOD
HAS_ACQ_CONTEXT = RelationshipTypeValues.HAS_ACQ_CONTEXT
HAS_PROPERTIES = RelationshipTypeValues.HAS_PROPERTIES
SELECTION_REASON = codes.private("SELREASON", "Series selection reason")

Previous = Dataset | DocumentReference | Sequence[Dataset | DocumentReference] | None


def mri_sr_description(study: MRIStudyResult) -> str:
    return mri_series_description("knee MRI findings", study.priority, study.model.name, study.model.version)


def build_mri_sr(study: MRIStudyResult, series_number: int, seg: Dataset | None = None, previous: Previous = None,
                 *, segment_volumes: bool = False) -> hd.sr.Comprehensive3DSR:
    """The knee MRI findings SR. With ``segment_volumes`` it adds a TID 1411 volume group per structure that names
    its segment in ``seg`` (the study's Segmentation from ``build_seg``, then required). Off by default: OHIF 3.13
    throws on a measurement group without SCOORD and then places no group at all (seen in a real OHIF run)."""
    if not study.findings and (study.segmentation is None or not segment_volumes):
        raise ValueError("nothing to report: no finding and no segment volume")
    volumes = segment_volumes and study.segmentation is not None
    if volumes:
        _check_seg(study, seg)
    planes = study.ordered_planes
    sources = {plane.plane: [normalised(ds) for ds in plane.slices] for plane in planes}
    evidence = list({str(ds.SOPInstanceUID): ds for plane in planes for ds in sources[plane.plane]}.values())
    if volumes:
        evidence.append(_reference_dataset(seg))  # type: ignore[arg-type]
    previous_refs = _previous_datasets(previous)

    description = mri_sr_description(study)
    series = report_series_uid("mri-sr", study.study_instance_uid, study.model, series_number, description)
    sop = instance_uid("mri-sr", series, _digest(study, series_number, previous_refs, seg if volumes else None))

    root = ContainerContentItem(name=dcm_codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = ContentSequence()
    root.ContentSequence.extend(LanguageOfContentItemAndDescendants(ENGLISH))
    root.ContentSequence.extend(observation_context(study.model, study.node_name))
    root.ContentSequence.append(
        CodeContentItem(name=dcm_codes.DCM.ProcedureReported, value=knee_codes.PROCEDURE_MR,
                        relationship_type=HAS_CONCEPT_MOD)
    )
    root.ContentSequence.append(_image_library(study, sources))
    measurements = ContainerContentItem(name=dcm_codes.DCM.ImagingMeasurements, relationship_type=CONTAINS)
    measurements.ContentSequence = ContentSequence()
    if study.findings:
        first = planes[0]
        middle = len(first.slices) // 2
        measurements.ContentSequence.extend(_findings_group(study, sources[first.plane][middle],
                                                            first.frame_of(middle)))
    if volumes:
        for group in _volume_groups(study, seg):  # type: ignore[arg-type]
            measurements.ContentSequence.extend(group)
    root.ContentSequence.append(measurements)
    root.ContentSequence.append(_qualitative_evaluations(study))

    created = study.created_at
    sr = comprehensive_sr(evidence, root, series, series_number, sop, study.revision, study.model, created,
                          previous_refs, description)
    freeze_timestamps(sr, created)
    sr.ContributingEquipmentSequence.append(algorithm_equipment_item(study.model, created, study.node_name))
    return sr


def _check_seg(study: MRIStudyResult, seg: Dataset | None) -> None:
    if seg is None:
        raise ValueError("the study has a segmentation: pass its SEG (build_seg) to reference the segments")
    if str(seg.SOPClassUID) != SegmentationStorage or str(seg.StudyInstanceUID) != study.study_instance_uid:
        raise ValueError("seg must be a Segmentation of this study")
    assert study.segmentation is not None
    if len(seg.SegmentSequence) != len(study.segmentation.structures):
        raise ValueError("seg does not describe this study's structures (another segmentation?)")
    for item, structure in zip(seg.SegmentSequence, study.segmentation.structures):
        if str(item.SegmentLabel) != structure.label:
            raise ValueError(f"seg segment {item.SegmentNumber} is {item.SegmentLabel!r}, expected {structure.label!r}")


def _reference_dataset(dataset: Dataset) -> Dataset:
    """The four UIDs highdicom's evidence needs, without copying the referenced object's pixel data."""
    reference = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        setattr(reference, keyword, dataset[keyword].value)
    return reference


def _previous_datasets(previous: Previous) -> list[Dataset]:
    """Earlier SRs of the study (datasets or references), one per SOP Instance UID, sorted by it."""
    if previous is None:
        return []
    items = [previous] if isinstance(previous, (Dataset, DocumentReference)) else list(previous)
    refs = {}
    for item in items:
        ref = item if isinstance(item, DocumentReference) else DocumentReference.from_dataset(item)
        refs[ref.sop_instance_uid] = ref
    result = []
    for uid in sorted(refs):
        ds = Dataset()
        ds.StudyInstanceUID = refs[uid].study_instance_uid
        ds.SeriesInstanceUID = refs[uid].series_instance_uid
        ds.SOPInstanceUID = refs[uid].sop_instance_uid
        ds.SOPClassUID = refs[uid].sop_class_uid
        result.append(ds)
    return result


def _digest(study: MRIStudyResult, series_number: int, previous: list[Dataset], seg: Dataset | None) -> str:
    """Everything that goes into the SR's content, so different content never shares a SOP Instance UID."""
    segmentation = study.segmentation
    return content_digest({
        "kind": "mri-sr",
        "study": study.study_instance_uid,
        "series_number": series_number,
        "revision": study.revision,
        "priority": study.priority,
        "created_at": study.created_at.isoformat(),
        "node": study.node_name,
        "model": study.model.identity,
        "backend": study.model.backend,
        "manufacturer": study.model.manufacturer,
        "previous": [str(ds.SOPInstanceUID) for ds in previous],
        "planes": [[plane.plane, series_input_set(plane), plane.reason] for plane in study.ordered_planes],
        "findings": [[f.label, repr(float(f.probability)), repr(float(f.threshold))] for f in study.findings],
        "seg": None if seg is None else str(seg.SOPInstanceUID),
        "volumes": None if seg is None or segmentation is None else sorted(segmentation.voxel_counts().items()),
    })


def _image_library(study: MRIStudyResult, sources: dict[str, list[Dataset]]) -> ContainerContentItem:
    """TID 1600 with one Image Library Group per plane: modality and plane as common descriptors, every slice."""
    library = ContainerContentItem(name=dcm_codes.DCM.ImageLibrary, relationship_type=CONTAINS)
    library.ContentSequence = ContentSequence()
    for plane in study.ordered_planes:
        group = ContainerContentItem(name=dcm_codes.DCM.ImageLibraryGroup, relationship_type=CONTAINS)
        group.ContentSequence = ContentSequence([
            CodeContentItem(name=dcm_codes.DCM.Modality, value=dcm_codes.cid29.MagneticResonance,
                            relationship_type=HAS_ACQ_CONTEXT),
            CodeContentItem(name=dcm_codes.DCM.ImageView, value=knee_codes.PLANES[plane.plane],
                            relationship_type=HAS_ACQ_CONTEXT),
        ])
        for index, source in enumerate(sources[plane.plane]):  # an Enhanced MR slice: its instance and frame
            group.ContentSequence.append(ImageContentItem(
                name=SOURCE,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                referenced_frame_numbers=plane.frame_of(index),
                relationship_type=CONTAINS,
            ))
        library.ContentSequence.append(group)
    return library


def finding_measurements(study: MRIStudyResult) -> list[Measurement]:
    """Each label's probability in %, in the order of the findings table (so the same labels sort the same)."""
    ordered = sorted(study.findings, key=lambda f: knee_codes.FINDINGS.index(knee_codes.FINDINGS_BY_LABEL[f.label]))
    return [Measurement(name=knee_codes.FINDINGS_BY_LABEL[f.label].probability, value=percent(f.probability),
                        unit=codes.UNITS_PERCENT) for f in ordered]


def finding_evaluations(study: MRIStudyResult) -> list[QualitativeEvaluation]:
    """Each label's finding, Present or Absent at its threshold."""
    ordered = sorted(study.findings, key=lambda f: knee_codes.FINDINGS.index(knee_codes.FINDINGS_BY_LABEL[f.label]))
    return [QualitativeEvaluation(knee_codes.FINDINGS_BY_LABEL[f.label].finding,
                                  knee_codes.PRESENT if f.present else knee_codes.ABSENT) for f in ordered]


def _findings_group(study: MRIStudyResult, source: Dataset,
                    frame: int | None = None) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    region = ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=whole_image_outline(source),
        source_image=SourceImageForRegion.from_source_image(source, None if frame is None else [frame]),
    )
    tracking = TrackingIdentifier(
        uid=tracking_uid(study.study_instance_uid, "knee-mri-findings", 0, f"mri|{study.model.name}"),
        identifier="Knee MRI findings",
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=knee_codes.FINDINGS_GROUP,
        algorithm_id=algorithm_identification(study.model),
        measurements=finding_measurements(study),
        qualitative_evaluations=finding_evaluations(study),
    )


def segment_volumes_mm3(study: MRIStudyResult) -> dict[str, float]:
    """Volume of each described structure (voxel count x voxel volume of the SEG's grid), by structure key."""
    if study.segmentation is None:
        return {}
    voxel = study.plane_series(study.segmentation.plane).voxel_volume_mm3
    counts = study.segmentation.voxel_counts()
    return {s.key: float(f"{counts[s.label_value] * voxel:.10g}") for s in study.segmentation.structures}


def _volume_groups(study: MRIStudyResult, seg: Dataset) -> list[VolumetricROIMeasurementsAndQualitativeEvaluations]:
    assert study.segmentation is not None
    grid = study.plane_series(study.segmentation.plane)
    volumes = segment_volumes_mm3(study)
    algorithm = algorithm_identification(study.model)
    groups = []
    for number, structure in enumerate(study.segmentation.structures, start=1):
        segment = ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number,
            source_series=SourceSeriesForSegmentation(grid.series_instance_uid),
        )
        groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=segment_tracking_uid(study, structure),
                                                   identifier=structure.label),
            referenced_segment=segment,
            finding_type=structure.property_type,
            finding_category=structure.category,
            algorithm_id=algorithm,
            measurements=[Measurement(name=knee_codes.SEGMENTATION_VOLUME, value=volumes[structure.key],
                                      unit=dcm_codes.UCUM.CubicMillimeter)],
        ))
    return groups


def _qualitative_evaluations(study: MRIStudyResult) -> ContainerContentItem:
    """Study-level items: the triage priority, then which series was used for each plane (and why)."""
    container = ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS, relationship_type=CONTAINS)
    container.ContentSequence = ContentSequence([
        CodeContentItem(name=codes.TRIAGE_PRIORITY, value=codes.PRIORITY_VALUES[study.priority],
                        relationship_type=CONTAINS)
    ])
    for plane in study.ordered_planes:
        item = CodeContentItem(name=knee_codes.INPUT_SERIES, value=knee_codes.PLANES[plane.plane],
                               relationship_type=CONTAINS)
        item.ContentSequence = ContentSequence([
            UIDRefContentItem(name=dcm_codes.DCM.SeriesInstanceUID, value=plane.series_instance_uid,
                              relationship_type=HAS_PROPERTIES),
        ])
        if plane.reason:
            item.ContentSequence.append(TextContentItem(name=SELECTION_REASON, value=plane.reason[:1024],
                                                        relationship_type=HAS_PROPERTIES))
        container.ContentSequence.append(item)
    return container
