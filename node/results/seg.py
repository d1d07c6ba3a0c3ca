"""DICOM Segmentation (highdicom) of the knee structures on the grid of one source MR series.

**BINARY, not LABELMAP.** highdicom 0.28 can write both, but the Label Map Segmentation Storage SOP class
(``1.2.840.10008.5.1.4.1.1.66.7``, DICOM 2024) is unknown to what the node must interoperate with today:
OHIF 3.13.2's bundle (tests/viewer) does not contain its UID, and dciodvfy (dicom3tools 2022) answers
"Information Object Not found" for it. Segmentation Storage ``1.2.840.10008.5.1.4.1.1.66.4`` with
SegmentationType BINARY is read by OHIF, dcmjs, highdicom, Orthanc and 3D Slicer alike. Bits are packed, and
highdicom leaves out empty frames, so a sparse 11-segment mask stays small.

Segment number = position in :attr:`SegmentationResult.structures` (1-based; with the default table it equals
the label value, so a structure has the same number in every study). Every described structure is a segment,
also one the model did not find: it has no frame, and the SR reports its volume as 0 mm3. Each frame
references its source slice (Derivation Image Sequence / Source Image Sequence, purpose "Source image for
image processing operation"), which highdicom fills from ``source_images``; for an Enhanced MR source (one
multi-frame instance) the label slices are put in the instance's frame order, and each SEG frame references
(instance, Referenced Frame Number).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes as dcm_codes

from node.results import codes
from node.results.headers import normalised
from node.results.knee_codes import Structure
from node.results.mri_model import MRIStudyResult, PlaneSeries
from node.results.sr import algorithm_equipment_item, freeze_timestamps
from node.results.uids import content_digest, derive_uid, input_set, instance_uid, series_uid, tracking_uid

CONTENT_LABEL = "KNEE_STRUCTURES"  # CS, <= 16 characters


def mri_series_description(what: str, priority: str, model_name: str, model_version: str) -> str:
    """"AI <PRIORITY> <what> <model> <version>" clipped to 64 characters, as for the radiograph results."""
    text = f"AI {priority} {what} {model_name} {model_version}"
    return text[:64]


def seg_description(study: MRIStudyResult) -> str:
    return mri_series_description("knee segmentation", study.priority, study.model.name, study.model.version)


def series_input_set(series: PlaneSeries) -> str:
    """The input set of one plane's series: its slices' (SOP Instance UID, sha256), as uids.input_set."""
    hashes = series.sha256 or [""] * len(series.slices)
    return input_set(f"{sop}#{frame or 0}#{sha}" for (sop, frame), sha in zip(series.references, hashes))


def seg_series_uid(study: MRIStudyResult, series_number: int) -> str:
    """One SEG series per (study, model, source series content, number, description): changed inputs, new series."""
    if study.segmentation is None:
        raise ValueError("the study result has no segmentation")
    grid = study.plane_series(study.segmentation.plane)
    return series_uid("seg", study.study_instance_uid, study.model, series_input_set(grid), series_number,
                      seg_description(study))


def segment_tracking_uid(study: MRIStudyResult, structure: Structure) -> str:
    """Tracking UID of one structure in a study: the same in the SEG and the SR, and across revisions."""
    return tracking_uid(study.study_instance_uid, f"segment:{structure.key}", 0, f"seg|{study.model.name}")


def algorithm_sequence(study: MRIStudyResult) -> hd.AlgorithmIdentificationSequence:
    """The algorithm as the SR's TID 4019 names it: name, version, family AI, backend and weights hash."""
    model = study.model
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        version=model.version,
        family=dcm_codes.cid7162.ArtificialIntelligence,
        source=model.manufacturer,
        parameters={"backend": model.backend, "encoder_sha256": model.encoder_sha256},
    )


def segment_descriptions(study: MRIStudyResult) -> list[hd.seg.SegmentDescription]:
    if study.segmentation is None:
        raise ValueError("the study result has no segmentation")
    algorithm = algorithm_sequence(study)
    descriptions = []
    for number, structure in enumerate(study.segmentation.structures, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=structure.label,
            segmented_property_category=structure.category,
            segmented_property_type=structure.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=segment_tracking_uid(study, structure),
            tracking_id=structure.label,
            anatomic_regions=[structure.region],
            display_color=hd.color.CIELabColor.from_rgb(*structure.colour),
        )
        if structure.modifier is not None:  # e.g. Meniscus + Medial; highdicom has no argument for the modifier
            modifier = hd.sr.CodedConcept.from_code(structure.modifier)
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    return descriptions


def segment_numbers(study: MRIStudyResult) -> np.ndarray:
    """The label volume with each label value replaced by its segment number (uint8; 0 stays background)."""
    if study.segmentation is None:
        raise ValueError("the study result has no segmentation")
    structures = study.segmentation.structures
    lookup = np.zeros(max(s.label_value for s in structures) + 1, dtype=np.uint8)
    for number, structure in enumerate(structures, start=1):
        lookup[structure.label_value] = number
    return lookup[study.segmentation.labels]


def build_seg(study: MRIStudyResult, series_number: int) -> hd.seg.Segmentation:
    """The BINARY Segmentation of the study's label volume, one segment per described structure."""
    segmentation = study.segmentation
    if segmentation is None:
        raise ValueError("the study result has no segmentation")
    if len(segmentation.structures) > 255:
        raise ValueError("at most 255 segments")
    grid = study.plane_series(segmentation.plane)
    numbers = segment_numbers(study)
    if grid.multiframe is not None:  # one Enhanced MR instance: highdicom pairs pixel frame i with source frame i+1
        sources = [normalised(grid.multiframe)]
        frames = np.zeros((int(grid.multiframe.NumberOfFrames), *numbers.shape[1:]), dtype=numbers.dtype)
        frames[np.array(grid.frame_numbers) - 1] = numbers
    else:
        sources = [normalised(ds) for ds in grid.slices]
        frames = numbers
    model = study.model
    created = study.created_at

    series = seg_series_uid(study, series_number)
    digest = content_digest({
        "kind": "seg",
        "study": study.study_instance_uid,
        "inputs": series_input_set(grid),
        "labels": hashlib.sha256(np.ascontiguousarray(numbers).tobytes()).hexdigest(),
        "shape": numbers.shape,
        "structures": [[s.key, s.label_value, s.label, s.category.value, s.property_type.value,
                        None if s.modifier is None else s.modifier.value, s.region.value, s.colour]
                       for s in segmentation.structures],
        "series_number": series_number,
        "revision": study.revision,
        "priority": study.priority,
        "created_at": created.isoformat(),
        "model": model.identity,
        "backend": model.backend,
        "manufacturer": model.manufacturer,
        "node": study.node_name,
    })
    sop = instance_uid("seg", series, digest)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(study),
        series_instance_uid=series,
        series_number=series_number,
        sop_instance_uid=sop,
        instance_number=study.revision,
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.encoder_sha256,
        content_description="AI segmentation of knee structures",
        content_label=CONTENT_LABEL,
        omit_empty_frames=True,
        series_description=seg_description(study),
        coding_schemes=codes.coding_schemes(),
    )
    _make_deterministic(seg, sop, created)
    seg.ContributingEquipmentSequence.append(algorithm_equipment_item(model, created, study.node_name))
    return seg


def _make_deterministic(seg: hd.seg.Segmentation, sop: str, created: datetime) -> None:
    """Replace what highdicom makes up per call (a random Dimension Organization UID, "now") with values derived
    from the object, so a rebuild gives the same bytes."""
    organisation = derive_uid("dimension-organization", sop)
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = organisation
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = organisation
    seg.ContentDate = created.strftime("%Y%m%d")
    seg.ContentTime = created.strftime("%H%M%S.%f")
    seg.SeriesDate = seg.ContentDate
    seg.SeriesTime = seg.ContentTime
    freeze_timestamps(seg, created)

