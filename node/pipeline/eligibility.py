"""Which images the model is for: a pure decision over header attributes, with the reason when not.

The reason is stored per image and shown by ``msknode studies`` — an image is never skipped silently.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.settings import EligibilitySettings


def _upper(value: object) -> str:
    return str(value or "").strip().upper()


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
    return None
