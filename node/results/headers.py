"""Copies of received headers, normalised so the builders never trip over real-world gaps.

Modality headers often lack Type 2 attributes (highdicom's SR constructor reads PatientSex, StudyID, ... by
plain attribute access and raises) or carry empty ones. We never touch the caller's dataset: the builders
work on a copy without pixel data, with every attribute they read present (empty where unknown).

Dirty values never cost a result (docs/results.md, "Dirty headers"). Every top-level attribute of the copy
(the builders and highdicom copy the Patient and Study modules from it) is checked against its VR and VM:

* a valid value is copied unchanged;
* more values than the attribute's VM allows (a PatientName with two values) keep the first, if valid;
* anything else invalid (a malformed date or time, an overlong or control-character value, a PatientSex
  other than M/F/O, a value pydicom cannot even convert) is never repaired or truncated: a Type 2 attribute
  the results must carry becomes empty, any other is left out. Identifiers (PatientID, AccessionNumber,
  StudyID) are therefore either exact or empty, never altered;
* a value the output character set cannot encode switches the copy to UTF-8 (ISO_IR 192).

UIDs, sequences and binary values are left as received (intake already refused unusable UIDs).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from highdicom import SpecificCharacterSetValues
from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM
from pydicom.multival import MultiValue
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

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

# Attributes the results must carry even when the source value is unusable (present, empty).
KEEP_PRESENT = frozenset(TYPE2_PATIENT_STUDY) | {"Modality", "Manufacturer", "Laterality", "PatientOrientation"}
# Enumerated values highdicom enforces on what it copies.
_ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"})}
# The text VRs checked here; PS3.5 6.1.2.3: control characters other than ESC are not allowed in these, and
# ST/LT/UT also allow TAB, LF, FF and CR. C1 controls (U+0080-U+009F, what stray bytes often decode to) neither.
_SHORT_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC"})
_LONG_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_SHORT_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f-\x9f]")
_LONG_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f-\x9f]")

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


def _vm_bounds(tag: int) -> tuple[int, int | None]:
    """(minimum, maximum or None) of the dictionary VM ('1', '2', '1-3', '1-n', '2-2n')."""
    vm = dictionary_VM(tag)
    low, _, high = vm.partition("-")
    minimum = int(low) if low.isdigit() else 1
    if not high:
        return minimum, minimum
    return minimum, int(high) if high.isdigit() else None


def _valid(keyword: str, vr: str, value: object) -> bool:
    if value is None or value == "":
        return True
    text = str(value)
    control = _LONG_CONTROL if vr in _LONG_TEXT_VRS else _SHORT_CONTROL
    if control.search(text):
        return False
    if vr == "PN" and (text.count("=") > 2 or any(group.count("^") > 4 for group in text.split("="))):
        return False
    if keyword in _ENUMERATED and text not in _ENUMERATED[keyword]:
        return False
    if not isinstance(value, str):  # PersonName, IS, DSfloat objects: check the text that will be written
        value = getattr(value, "original_string", None) or text
    try:
        validate_value(vr, value, config.RAISE)
    except Exception:  # noqa: BLE001 - pydicom raises ValueError, and others on odd types
        return False
    return True


def clean_values(dataset: Dataset) -> list[str]:
    """Apply the rules of the module docstring to ``dataset``'s top-level text attributes, in place.

    Returns the keywords changed (never the values: they are PHI), for the caller's log or tests.
    """
    changed: list[str] = []
    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
            value, vr, keyword = element.value, element.VR, element.keyword
        except Exception:  # noqa: BLE001 - pydicom could not convert the raw value at all
            del dataset[tag]  # normalised() puts a Type 2 attribute back, empty
            changed.append(str(tag))
            continue
        if not keyword or (vr not in _SHORT_TEXT_VRS and vr not in _LONG_TEXT_VRS):
            continue
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        minimum, maximum = _vm_bounds(tag)
        first_only = maximum == 1 and len(values) > 1
        if first_only:
            values = values[:1]  # a second PatientName etc.: the first is kept (if valid)
        count_ok = len(values) <= 1 or (len(values) >= minimum and (maximum is None or len(values) <= maximum))
        valid = count_ok and all(_valid(keyword, vr, item) for item in values)
        if valid and not first_only:
            continue
        if valid:
            element.value = values[0]
        elif keyword in KEEP_PRESENT:
            element.value = ""
        else:
            del dataset[tag]
        changed.append(keyword)
    return changed


def _encodable(dataset: Dataset, charset: str | list[str] | None) -> bool:
    """Whether every text value of ``dataset`` can be written in ``charset`` (with code extensions: every
    character in one of its character sets)."""
    encodings = convert_encodings(charset or "ISO_IR 6")
    codecs = ["ascii" if codec == "iso8859" else codec for codec in encodings]
    if charset in (None, "", "ISO_IR 6"):
        codecs = ["ascii"]
    for element in dataset:
        if element.VR not in _SHORT_TEXT_VRS and element.VR not in _LONG_TEXT_VRS:
            continue
        items = element.value if isinstance(element.value, (list, tuple, MultiValue)) else [element.value]
        for item in items:
            if item in (None, ""):
                continue
            text = str(item)
            try:
                text.encode(codecs[0])
                continue
            except (UnicodeError, LookupError):
                pass
            if len(codecs) == 1 or not all(_in_any(char, codecs) for char in text):
                return False
    return True


def _in_any(char: str, codecs: list[str]) -> bool:
    for codec in codecs:
        try:
            char.encode(codec)
            return True
        except (UnicodeError, LookupError):
            continue
    return False


def normalised(dataset: Dataset) -> Dataset:
    """A header copy with every Type 2 patient/study attribute present (empty if the source lacks it or its
    value is unusable), every other text value valid for its VR and VM (or left out), and a Specific
    Character Set highdicom accepts and that can encode every value."""
    result = header_copy(dataset)
    clean_values(result)
    charset = character_set(result)
    if not _encodable(result, charset):
        charset = "ISO_IR 192"
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
