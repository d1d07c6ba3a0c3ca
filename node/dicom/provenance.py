"""What a received object is, from its header alone: an image to analyse, a non-image object, our own result
sent back to us, or another AI product's result. Pure; the receiver decides once at intake and the instance
row keeps the answer (``instances.intake_kind``), so completion, the scheduler and the worker never have to
look again.

Only ``image`` instances start a new study revision and are read by the worker. Everything else is still
stored, indexed and acknowledged with Success (a PACS that auto-routes a whole study back must never see a
failure for it), but never analysed: otherwise our own SR and SC, forwarded back, would start a new revision
and a second SR, for ever (the echo loop).

How our own results are recognised (every attribute is one node/results writes; a test builds real results
and checks that this module recognises them, since node/dicom may not import node/results):

* the SOP class is one of ``[intake] result_sop_classes`` (SR, SEG, SC by default), and
* a Contributing Equipment item with purpose (Newcode1, IHE, "Processing Algorithm") (IHE AIR) whose
  Contribution Description is ``AI algorithm <model> <version> (node <AE title>)`` — what every SR and SC of
  ours carries whatever the configured manufacturer; or
* Manufacturer equals ``[results] manufacturer`` and the Series Description starts with ``AI `` (every
  series description we write does).

Another AI product's result: a result SOP class whose Manufacturer is one of ``[intake] ai_manufacturers``
or whose Series Description starts with one of ``[intake] ai_series_descriptions`` (case-insensitive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.settings import IntakeSettings

IMAGE = "image"
NON_IMAGE = "non_image"
OWN_RESULT = "own_result"
AI_RESULT = "ai_result"
KINDS = (IMAGE, NON_IMAGE, OWN_RESULT, AI_RESULT)
# The kinds that never start a study revision and that the worker never reads.
RESULT_KINDS = (OWN_RESULT, AI_RESULT)

# IHE AIR "Processing Algorithm" purpose of reference, as node/results/codes.py writes it.
_PROCESSING_ALGORITHM = ("Newcode1", "99IHE")
_OUR_CONTRIBUTION = re.compile(r"^AI algorithm .+ \(node [^()]*\)$")
_OUR_SERIES_PREFIX = "AI "


def _text(dataset: Dataset, keyword: str) -> str:
    try:
        value = dataset.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value is simply not a match
        return ""
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__") and not hasattr(value, "family_name"):
        value = next(iter(value), "")
    return str(value).strip()


@dataclass(frozen=True)
class ResultRecognition:
    """The rules, normalised once (upper case, trimmed)."""

    own_manufacturer: str
    result_sop_classes: frozenset[str]
    ai_manufacturers: frozenset[str]
    ai_series_descriptions: tuple[str, ...]

    @classmethod
    def from_settings(cls, intake: IntakeSettings, own_manufacturer: str) -> ResultRecognition:
        return cls(
            own_manufacturer=own_manufacturer.strip().upper(),
            result_sop_classes=frozenset(uid.strip() for uid in intake.result_sop_classes),
            ai_manufacturers=frozenset(m.strip().upper() for m in intake.ai_manufacturers),
            ai_series_descriptions=tuple(d.strip().upper() for d in intake.ai_series_descriptions),
        )

    @classmethod
    def default(cls) -> ResultRecognition:
        return cls.from_settings(IntakeSettings(), "msknode")


def _our_contribution(dataset: Dataset) -> bool:
    try:
        items = list(dataset.get("ContributingEquipmentSequence") or [])
    except Exception:  # noqa: BLE001
        return False
    for item in items:
        try:
            purposes = list(item.get("PurposeOfReferenceCodeSequence") or [])
        except Exception:  # noqa: BLE001
            continue
        if not any((_text(p, "CodeValue"), _text(p, "CodingSchemeDesignator")) == _PROCESSING_ALGORITHM
                   for p in purposes):
            continue
        if _OUR_CONTRIBUTION.match(_text(item, "ContributionDescription")):
            return True
    return False


def classify(dataset: Dataset, has_pixel_data: bool, rules: ResultRecognition) -> tuple[str, str | None]:
    """``(kind, reason)``: reason is None for an image, else a short text without PHI (stored on the row)."""
    sop_class = _text(dataset, "SOPClassUID")
    if sop_class in rules.result_sop_classes:
        manufacturer = _text(dataset, "Manufacturer").upper()
        description = _text(dataset, "SeriesDescription").upper()
        if _our_contribution(dataset):
            return OWN_RESULT, "our own result (IHE AIR contributing equipment of this node)"
        if rules.own_manufacturer and manufacturer == rules.own_manufacturer and description.startswith(
                _OUR_SERIES_PREFIX):
            return OWN_RESULT, "our own result (manufacturer and series description)"
        if manufacturer and manufacturer in rules.ai_manufacturers:
            return AI_RESULT, "AI result (manufacturer listed in intake.ai_manufacturers)"
        if any(description.startswith(prefix) for prefix in rules.ai_series_descriptions if prefix):
            return AI_RESULT, "AI result (series description listed in intake.ai_series_descriptions)"
    if not has_pixel_data:
        return NON_IMAGE, "no pixel data"
    return IMAGE, None
