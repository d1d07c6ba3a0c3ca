"""The knee MRI code tables, in one place: segmented structures (SEG) and findings (SR).

Where a code is standard it comes from the DICOM standard's own tables (PS3.16 context groups, as shipped in
``pydicom.sr.codedict.codes``): Femur, Tibia, Patella, Meniscus, Cartilage, Knee joint, Distal femur, Tibial
plateau, Effusion, Morphologically Abnormal Structure, the anatomic modifiers Medial/Lateral, Present/Absent, the
planes. SNOMED CT has concepts
for the cruciate and collateral ligaments and for the tears below, but no DICOM context group lists them and
their identifiers could not be verified offline here, so they use our private scheme ``99MSKNODE`` (declared
in every object, codes.py) rather than a guessed SCTID. Replacing a private code with a verified SNOMED CT one
is a change of this file only (and of the tests that pin the table).

The finding labels (ACL, PCL, MM, LM, MCL, LCL, PD, EFFU) are the classifier's output names. ``PD`` is read as
*patellar dislocation*; that reading is still being checked against the authors' code (issue #17): fix the
meaning here if it turns out to be something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from node.results.codes import private

# --- segmented structures (SEG) --------------------------------------------------------------------------------
ANATOMICAL_STRUCTURE = dcm_codes.SCT.AnatomicalStructure  # CID 7150 Segmentation Property Category
TISSUE = dcm_codes.SCT.Tissue  # CID 7150
ABNORMAL_STRUCTURE = dcm_codes.SCT.MorphologicallyAbnormalStructure  # CID 7150, for an effusion
KNEE_JOINT = dcm_codes.SCT.KneeJoint
ACL = private("ACL", "Anterior cruciate ligament")
PCL = private("PCL", "Posterior cruciate ligament")
MCL = private("MCL", "Medial collateral ligament of knee")
LCL = private("LCL", "Lateral collateral ligament of knee")
COLLATERAL_LIGAMENTS = private("COLLIGS", "Collateral ligaments of knee")


@dataclass(frozen=True)
class Structure:
    """One segmented knee structure: its label value in the model's label volume and how the SEG describes it."""

    key: str
    label_value: int
    label: str  # Segment Label (LO)
    category: Code
    property_type: Code
    modifier: Code | None
    region: Code  # Anatomic Region Sequence: where the structure lies
    colour: tuple[int, int, int]  # sRGB shown by viewers (Recommended Display CIELab Value) and in the overlays


# Every structure a knee model may segment: key -> (label, category, type, modifier, region, colour).
_CATALOGUE: dict[str, tuple[str, Code, Code, Code | None, Code, tuple[int, int, int]]] = {
    "femur": ("Femur", ANATOMICAL_STRUCTURE, dcm_codes.SCT.Femur, None, KNEE_JOINT, (230, 220, 170)),
    "tibia": ("Tibia", ANATOMICAL_STRUCTURE, dcm_codes.SCT.Tibia, None, KNEE_JOINT, (200, 200, 120)),
    "patella": ("Patella", ANATOMICAL_STRUCTURE, dcm_codes.SCT.Patella, None, KNEE_JOINT, (240, 180, 90)),
    "cartilage": ("Articular cartilage", TISSUE, dcm_codes.SCT.Cartilage, None, KNEE_JOINT, (60, 200, 255)),
    "femoral_cartilage": ("Femoral cartilage", TISSUE, dcm_codes.SCT.Cartilage, None, dcm_codes.SCT.DistalFemur,
                          (60, 200, 255)),
    "tibial_cartilage": ("Tibial cartilage", TISSUE, dcm_codes.SCT.Cartilage, None, dcm_codes.SCT.TibialPlateau,
                         (60, 120, 255)),
    "patellar_cartilage": ("Patellar cartilage", TISSUE, dcm_codes.SCT.Cartilage, None, dcm_codes.SCT.Patella,
                           (150, 100, 255)),
    "medial_meniscus": ("Medial meniscus", ANATOMICAL_STRUCTURE, dcm_codes.SCT.Meniscus, dcm_codes.SCT.Medial,
                        KNEE_JOINT, (40, 220, 90)),
    "lateral_meniscus": ("Lateral meniscus", ANATOMICAL_STRUCTURE, dcm_codes.SCT.Meniscus, dcm_codes.SCT.Lateral,
                         KNEE_JOINT, (170, 240, 40)),
    "acl": ("Anterior cruciate ligament", ANATOMICAL_STRUCTURE, ACL, None, KNEE_JOINT, (255, 60, 60)),
    "pcl": ("Posterior cruciate ligament", ANATOMICAL_STRUCTURE, PCL, None, KNEE_JOINT, (255, 60, 200)),
    "mcl": ("Medial collateral ligament", ANATOMICAL_STRUCTURE, MCL, None, KNEE_JOINT, (255, 140, 0)),
    "lcl": ("Lateral collateral ligament", ANATOMICAL_STRUCTURE, LCL, None, KNEE_JOINT, (255, 200, 0)),
    "collateral_ligaments": ("Collateral ligaments", ANATOMICAL_STRUCTURE, COLLATERAL_LIGAMENTS, None, KNEE_JOINT,
                             (255, 140, 0)),
    "effusion": ("Joint effusion", ABNORMAL_STRUCTURE, dcm_codes.SCT.Effusion, None, KNEE_JOINT, (0, 255, 255)),
}
STRUCTURE_KEYS = tuple(_CATALOGUE)


def structures_for(keys: Sequence[str], label_values: Sequence[int] | None = None) -> tuple[Structure, ...]:
    """The descriptions of a model's label layout: ``keys`` in segment order, label values 1, 2, ... unless given.

    A model folder names its labels (e.g. the phantom layout ``femur, tibia, patella, cartilage, medial_meniscus,
    lateral_meniscus, acl, pcl, mcl, lcl, effusion``); a name missing here is refused, so a new structure is a
    row in this file, never an invented code at run time."""
    values = list(range(1, len(keys) + 1)) if label_values is None else list(label_values)
    if len(values) != len(keys):
        raise ValueError("one label value per structure")
    unknown = [key for key in keys if key not in _CATALOGUE]
    if unknown:
        raise ValueError(f"no description for structures {unknown}: add them to node/results/knee_codes.py")
    if len(set(keys)) != len(keys):
        raise ValueError("each structure once")
    return tuple(Structure(key, value, *_CATALOGUE[key]) for key, value in zip(keys, values))


# The default layout (issue #17): bones, the three cartilage plates, menisci, cruciates, collateral ligaments.
# Label value = Segment Number: a structure keeps its number in every study (empty segments included).
STRUCTURES: tuple[Structure, ...] = structures_for((
    "femur", "tibia", "patella", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage", "medial_meniscus",
    "lateral_meniscus", "acl", "pcl", "collateral_ligaments",
))
# The layout of the synthetic knee phantoms (engines/training/knee_mri_phantoms.py) and models trained on them.
PHANTOM_STRUCTURES: tuple[Structure, ...] = structures_for((
    "femur", "tibia", "patella", "cartilage", "medial_meniscus", "lateral_meniscus", "acl", "pcl", "mcl", "lcl",
    "effusion",
))
STRUCTURES_BY_VALUE = {structure.label_value: structure for structure in STRUCTURES}
STRUCTURES_BY_KEY = {structure.key: structure for structure in STRUCTURES}

# --- findings (SR) ---------------------------------------------------------------------------------------------
PRESENT = dcm_codes.SCT.Present  # 52101004
ABSENT = dcm_codes.SCT.Absent  # 272519000


@dataclass(frozen=True)
class Finding:
    """One classifier label: the finding it names (a CODE evaluated Present/Absent) and its probability concept."""

    label: str
    finding: Code
    probability: Code


def _finding(label: str, value: str, meaning: str, standard: Code | None = None) -> Finding:
    return Finding(label, standard or private(value, meaning), private(f"P{value}"[:16], f"Probability of {meaning}"))


FINDINGS: tuple[Finding, ...] = (
    _finding("ACL", "ACLTEAR", "anterior cruciate ligament tear"),
    _finding("PCL", "PCLTEAR", "posterior cruciate ligament tear"),
    _finding("MM", "MMTEAR", "medial meniscus tear"),
    _finding("LM", "LMTEAR", "lateral meniscus tear"),
    _finding("MCL", "MCLTEAR", "medial collateral ligament tear"),
    _finding("LCL", "LCLTEAR", "lateral collateral ligament tear"),
    _finding("PD", "PATDISLOC", "patellar dislocation"),  # reading of "PD" to be confirmed (module docstring)
    _finding("EFFU", "EFFUSION", "knee joint effusion", standard=dcm_codes.SCT.Effusion),
)
# Other names for the same outputs: the flags of engines/training/knee_mri_phantoms.py (and models trained on them).
FINDING_ALIASES = {"acl_tear": "ACL", "pcl_tear": "PCL", "mm_tear": "MM", "lm_tear": "LM", "mcl_tear": "MCL",
                   "lcl_tear": "LCL", "pd": "PD", "effusion": "EFFU"}
FINDINGS_BY_LABEL = {finding.label: finding for finding in FINDINGS}
FINDINGS_BY_LABEL.update({alias: FINDINGS_BY_LABEL[label] for alias, label in FINDING_ALIASES.items()})

# --- planes ----------------------------------------------------------------------------------------------------
PLANES: dict[str, Code] = {
    "sagittal": dcm_codes.SCT.Sagittal,
    "coronal": dcm_codes.SCT.Coronal,
    "axial": dcm_codes.SCT.Axial,
}
INPUT_SERIES = private("INPUTSERIES", "AI input series")  # a plane's input series (value: the plane)
SEGMENTATION_VOLUME = dcm_codes.SCT.Volume  # 118565006, NUM in UCUM mm3
FINDINGS_GROUP = private("KNEEMRIFINDINGS", "Knee MRI findings")
PROCEDURE_MR = dcm_codes.LN.MRIUnspecifiedBodyRegion  # LN 25056-3, CID 100 (as XR unspecified for radiographs)
