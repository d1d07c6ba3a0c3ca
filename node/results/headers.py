"""Copies of received headers, normalised so the builders never trip over real-world gaps.

Modality headers often lack Type 2 attributes (highdicom's SR constructor reads PatientSex, StudyID, ... by
plain attribute access and raises) or carry empty ones. We never touch the caller's dataset: the builders
work on a copy without pixel data, with every attribute they read present (empty where unknown).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from highdicom import SpecificCharacterSetValues
from pydicom.dataset import Dataset

# Bulk data the builders never need (copying a 30 MB PixelData per call would be pointless).
_BULK_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009, 0x00282000, 0x00880200}

# Type 2 attributes of the Patient / General Study modules that highdicom copies from the source.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
)

BIPED_LETTERS = set("APLRHF")

# PS3.3 C.12.1.1.2, Table C.12-3 / C.12-4: the Defined Terms for Specific Character Set "with Code Extensions"
# (ISO 2022 escape sequences). A single-valued Specific Character Set must not be one of them; a multi-valued
# one must consist of them only and must not start with a multi-byte one (PS3.5 6.1.2.5.3). The lists are
# those highdicom's SOP class constructor applies (0.28: ISO 2022 IR 58 is accepted only on its own, and
# ISO 2022 IR 149 not at all, since its enum lacks that term) so that what we pass is what highdicom accepts;
# tests/dicom/test_header_checks.py compares the two.
_SINGLE_BYTE_CODE_EXTENSIONS = frozenset({
    "ISO 2022 IR 6", "ISO 2022 IR 100", "ISO 2022 IR 101", "ISO 2022 IR 109", "ISO 2022 IR 110", "ISO 2022 IR 144",
    "ISO 2022 IR 127", "ISO 2022 IR 126", "ISO 2022 IR 138", "ISO 2022 IR 148", "ISO 2022 IR 203", "ISO 2022 IR 13",
    "ISO 2022 IR 166",
})
_MULTI_BYTE_CODE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159"})
_CODE_EXTENSIONS = _SINGLE_BYTE_CODE_EXTENSIONS | _MULTI_BYTE_CODE_EXTENSIONS
# Every term highdicom knows (its public enum of the Defined Terms).
_DEFINED_TERMS = frozenset(term.value for term in SpecificCharacterSetValues)


def _is_overlay_data(tag: int) -> bool:
    return 0x6000 <= (tag >> 16) <= 0x601E and (tag & 0xFFFF) == 0x3000


def header_copy(dataset: Dataset) -> Dataset:
    """A deep copy of ``dataset`` without pixel data, overlays or an ICC profile."""
    result = Dataset()
    for element in dataset:
        if element.tag in _BULK_TAGS or _is_overlay_data(element.tag):
            continue
        result.add(copy.deepcopy(element))
    if hasattr(dataset, "file_meta"):
        result.file_meta = copy.deepcopy(dataset.file_meta)
    return result


def character_set(dataset: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set in a form highdicom accepts, else UTF-8.

    ``\\ISO 2022 IR 87`` (empty first value = default repertoire) is legal DICOM but highdicom refuses the
    empty value; "ISO 2022 IR 6" says the same thing explicitly. Anything highdicom cannot take (unknown or
    misspelt terms) becomes ISO_IR 192: the copied values are already decoded text, so UTF-8 can carry them.
    """
    value = dataset.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, str) else [str(v) for v in value]
    values = [v.strip() for v in values]
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    cleaned: str | list[str] = values[0] if len(values) == 1 else values
    if not is_accepted_character_set(cleaned):
        return "ISO_IR 192"
    return cleaned


def is_accepted_character_set(value: str | Sequence[str]) -> bool:
    """Whether ``value`` is a Specific Character Set value highdicom's constructors accept (PS3.3 C.12.1.1.2)."""
    terms = [value] if isinstance(value, str) else list(value)
    if not terms or any(term not in _DEFINED_TERMS for term in terms):
        return False
    if len(terms) == 1:
        return terms[0] not in _CODE_EXTENSIONS
    return terms[0] not in _MULTI_BYTE_CODE_EXTENSIONS and all(term in _CODE_EXTENSIONS for term in terms)


def normalised(dataset: Dataset) -> Dataset:
    """A header copy with every Type 2 patient/study attribute present (empty if the source lacks it) and a
    Specific Character Set highdicom accepts."""
    result = header_copy(dataset)
    charset = character_set(result)
    if charset is not None:
        result.SpecificCharacterSet = charset
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in result or result[keyword].value is None:
            setattr(result, keyword, "")
    for keyword in ("Modality", "Manufacturer"):
        if keyword not in result:
            setattr(result, keyword, "")
    return result


def patient_orientation(dataset: Dataset) -> list[str] | None:
    """The source's Patient Orientation when it is two valid biped codes (e.g. ``["A", "FL"]``), else None."""
    value = dataset.get("PatientOrientation")
    if value is None:
        return None
    values = [value] if isinstance(value, str) else [str(v) for v in value]
    if len(values) != 2 or any(not v or set(v) - BIPED_LETTERS for v in values):
        return None
    return values


def laterality(dataset: Dataset) -> str:
    """R or L from Laterality, else ImageLaterality, else empty (SC Laterality is Type 2C: keep it present)."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(dataset.get(keyword, "") or "").upper()
        if value in ("R", "L"):
            return value
    return ""
