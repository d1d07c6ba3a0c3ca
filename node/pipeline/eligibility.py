"""Which images the model is for: a pure decision over header attributes, with the reason when not.

The reason is stored per image and shown by ``msknode studies`` — an image is never skipped silently.
Every rule reads the header only (the worker reads headers with ``stop_before_pixels``), so the pixel data
of an ineligible instance is never loaded; ``job_bound_reason`` bounds a whole job before any pixel is read.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.settings import EligibilitySettings, PipelineSettings


def _upper(value: object) -> str:
    return str(value or "").strip().upper()


def frame_count(header: Dataset) -> int:
    """Number of Frames from the header (1 when absent or unreadable as a positive integer)."""
    try:
        value = int(str(header.get("NumberOfFrames", 1) or 1).strip())
    except (TypeError, ValueError):
        return 1
    return max(1, value)


def job_bound_reason(instances: int, frames: int, pipeline: PipelineSettings) -> str | None:
    """None if a job of ``instances`` stored instances with ``frames`` eligible frames may run, else why not."""
    if instances > pipeline.max_instances_per_job:
        return (f"study has {instances} instances, more than pipeline.max_instances_per_job "
                f"({pipeline.max_instances_per_job})")
    if frames > pipeline.max_frames_per_job:
        return (f"study has {frames} eligible frames, more than pipeline.max_frames_per_job "
                f"({pipeline.max_frames_per_job})")
    return None


def ineligibility_reason(header: Dataset, calling_peer: str | None, rules: EligibilitySettings) -> str | None:
    """None if the image is eligible, else a short human-readable reason (no PHI)."""
    if rules.peers and calling_peer not in rules.peers:
        return f"sender {calling_peer or 'unknown'} is not configured for analysis"
    modality = _upper(header.get("Modality"))
    if modality not in {m.upper() for m in rules.modalities}:
        return f"modality {modality or 'missing'} not eligible"
    sop_class = str(header.get("SOPClassUID", ""))
    if rules.sop_classes and sop_class not in rules.sop_classes:
        return f"SOP class {sop_class or 'missing'} not eligible"
    if "PixelData" not in header and "Rows" not in header:
        return "no pixel data"
    photometric = _upper(header.get("PhotometricInterpretation"))
    if photometric not in {p.upper() for p in rules.photometric_interpretations}:
        return f"photometric interpretation {photometric or 'missing'} not eligible"
    image_type = [_upper(v) for v in (header.get("ImageType") or [])]
    excluded = {t.upper() for t in rules.excluded_image_types}
    hit = next((value for value in image_type if value in excluded), None)
    if hit:
        return f"image type {hit} excluded"
    body_part = _upper(header.get("BodyPartExamined"))
    if not body_part:
        if not rules.allow_unknown_body_part:
            return "body part unknown"
    elif body_part not in {b.upper() for b in rules.body_parts}:
        return f"body part {body_part} not musculoskeletal"
    frames = frame_count(header)
    if frames > rules.max_frames_per_instance:
        return f"{frames} frames, more than eligibility.max_frames_per_instance ({rules.max_frames_per_instance})"
    return None
