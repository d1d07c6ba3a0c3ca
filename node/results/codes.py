"""Codes used in the result objects, standard where one exists, else from our private scheme 99MSKNODE.

No standard concept exists for an MAE abnormality score, its percentile, the Kellgren-Lawrence grade, an AI
triage priority or "not analysed", so these are private codes (designator ``99MSKNODE``, declared in every SR
via CodingSchemeIdentificationSequence). Head outputs use a fixed table for the heads we ship (fracture,
tumour, KL grade) and a derived, stable code for any other head a site trains, so a new head never needs a code
change. Code values are SH (at most 16 characters); meanings LO (at most 64).
"""

from __future__ import annotations

import hashlib

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99MSKNODE"
IHE_SCHEME = "99IHE"


def private(value: str, meaning: str) -> Code:
    """A code of our private scheme (value <= 16 characters, meaning <= 64)."""
    if len(value) > 16 or len(meaning) > 64:
        raise ValueError(f"code {value!r} / {meaning!r} exceeds SH/LO lengths")
    return Code(value, PRIVATE_SCHEME, meaning)


def coding_schemes(private_codes: bool = True) -> list[CodingSchemeIdentificationItem]:
    """Declarations of the non-standard schemes an object uses (the SC uses only 99IHE)."""
    declared = []
    if private_codes:
        declared.append(
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="msknode private codes",
                version="1",
                responsible_organization="msknode developers",
            )
        )
    return declared + [
        CodingSchemeIdentificationItem(
            designator=IHE_SCHEME,
            name="IHE trial implementation codes",
            responsible_organization="IHE",
        ),
    ]


# --- study and image level -----------------------------------------------------------------------------------
ABNORMALITY_SCORE = private("ABNSCORE", "Abnormality score (masked-autoencoder error)")
ABNORMALITY_PERCENTILE = private("ABNPCTL", "Abnormality score percentile")
HIGHEST_ERROR_REGION = private("HIGHERRREGION", "Region of highest reconstruction error")
WHOLE_IMAGE = private("WHOLEIMAGE", "Whole image")  # the ROI of an image's result when it has no region
TRIAGE_PRIORITY = private("TRIAGEPRIO", "AI triage priority")
PRIORITY_VALUES = {
    "ROUTINE": private("ROUTINE", "Routine"),
    "HIGH": private("HIGH", "High"),
    "URGENT": private("URGENT", "Urgent"),
}
ANALYSIS_STATUS = private("ANASTATUS", "AI analysis status")
NOT_ANALYSED = private("NOTANALYSED", "Not analysed")
REASON_NOT_ANALYSED = private("NOTANAREASON", "Reason not analysed")

# Standard concepts.
FINDING_TYPE_ABNORMALITY = Code("263654008", "SCT", "Abnormal")
FRACTURE = Code("72704001", "SCT", "Fracture")
PROCEDURE_XR = codes.LN.XRUnspecifiedBodyRegion  # LN 43468-8; CID 100
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 10
SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
UNITS_ONE = codes.UCUM.NoUnits  # UCUM "1": no longer written (viewers print it, "0.64 1")
UNITS_PERCENT = codes.UCUM.Percent  # probabilities are written as percent: "Fracture probability: 64.00 %"
# UCUM annotations ({...} = unity with a name): what a viewer prints after a dimensionless value.
UNITS_SCORE = Code("{score}", "UCUM", "score")
UNITS_VALUE = Code("{value}", "UCUM", "value")


def ucum(unit: str) -> Code:
    """A UCUM unit given by its code (a head's own unit, e.g. "a" for years); empty gives ``{value}``."""
    if not unit:
        return UNITS_VALUE
    if len(unit) > 16:
        raise ValueError(f"UCUM code {unit!r} longer than 16 characters")
    return Code(unit, "UCUM", unit)
# IHE AIR contributing equipment purpose. AIR Rev 1.1 (trial implementation) gives a placeholder value;
# "Newcode1" is what MONAI Deploy's AIR writer emits, so PACS that already parse AIR see the same triple.
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")

# --- heads -----------------------------------------------------------------------------------------------------
KL_GRADE = private("KLGRADE", "Kellgren-Lawrence grade")
TUMOUR_CLASS = private("TUMOURCLASS", "Bone tumour class")
FRACTURE_PROBABILITY = private("FXPROB", "Fracture probability")

# Head name -> concept naming the head's categorical result (softmax heads).
_HEAD_CONCEPTS: dict[str, Code] = {
    "kl_grade": KL_GRADE,
    "kl": KL_GRADE,
    "kellgren_lawrence": KL_GRADE,
    "tumour": TUMOUR_CLASS,
    "tumor": TUMOUR_CLASS,
    "tumour_class": TUMOUR_CLASS,
    "tumor_class": TUMOUR_CLASS,
}
# (concept, label) -> value code. Tumour classes map to SNOMED where a clean concept exists.
_CLASS_VALUES: dict[tuple[str, str], Code] = {
    **{(KL_GRADE.value, str(k)): private(f"KL{k}", f"Kellgren-Lawrence grade {k}") for k in range(5)},
    (TUMOUR_CLASS.value, "none"): Code("260385009", "SCT", "Negative"),
    (TUMOUR_CLASS.value, "normal"): Code("17621005", "SCT", "Normal"),
    (TUMOUR_CLASS.value, "benign"): private("TUMBENIGN", "Benign bone tumour"),
    (TUMOUR_CLASS.value, "malignant"): Code("93725000", "SCT", "Primary malignant neoplasm of bone"),
    (TUMOUR_CLASS.value, "metastasis"): Code("94222008", "SCT", "Secondary malignant neoplasm of bone"),
}


def _digest(*parts: str, length: int) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:length].upper()


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "~"


def head_concept(head: str) -> Code:
    """Concept naming a softmax head's categorical result (the argmax class)."""
    known = _HEAD_CONCEPTS.get(head.lower())
    return known if known is not None else private("H" + _digest(head, length=12), _clip(f"AI class: {head}"))


def class_value(head: str, label: str) -> Code:
    """Value code for one class of a softmax head."""
    concept = head_concept(head)
    known = _CLASS_VALUES.get((concept.value, label.lower()))
    if known is not None:
        return known
    return private("C" + _digest(head, label, length=14), _clip(label))


def probability_concept(head: str, label: str) -> Code:
    """Concept naming the probability of one label of one head (a NUM in percent)."""
    if head.lower() == "fracture" and label.lower() == "fracture":
        return FRACTURE_PROBABILITY
    concept = head_concept(head)
    if concept.value == KL_GRADE.value:
        return private(f"KLPROB{label}"[:16], _clip(f"Probability of Kellgren-Lawrence grade {label}"))
    return private("P" + _digest(head, label, length=14), _clip(f"Probability of {label} ({head})"))


def output_concept(head: str, label: str) -> Code:
    """Concept naming a raw (identity-activation) head output, a NUM in the head's unit (``{value}`` if none)."""
    return private("V" + _digest(head, label, length=14), _clip(f"AI output {label} ({head})"))
