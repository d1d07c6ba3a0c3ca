"""``head_layout.json``: how a multi-head classifier's flat output vector splits into groups and findings.

SKELEX's region-guided tumour model is one ``ViTForImageClassification`` with 38 logits that are really five
heads (``External_validation.py`` ``predict_classes_as_tensor``): sigmoid on 0 (abnormal) and 37 (implant),
softmax over 1-4 (malignant / intermediate / benign / no tumour), 5-33 (29 anatomical sites) and 34-36
(fracture type). Nothing in the weights says so, so the layout is a file beside them::

    {"format": "msknode-head-layout/1", "num_outputs": 38,
     "groups": [{"name": "abnormal", "activation": "sigmoid", "indices": [0], "labels": ["Abnormal"]},
                {"name": "tumour_class", "activation": "softmax", "indices": [1, 2, 3, 4], "labels": [...]}, ...],
     "findings": [{"name": "bone_tumour", "label": "Bone tumour", "sum_of": [1, 2, 3], "threshold": 0.5,
                   "inclusive": false, "values": ["absent", "present"]},
                  {"name": "malignancy", "label": "Malignant", "sum_of": [1], "threshold": 0.5, "inclusive": true,
                   "requires": "bone_tumour", "values": ["benign", "malignant"]}]}

A *group* activates its indices together (``sigmoid``: each on its own; ``softmax``: over the group). A *finding*
is the released code's decision rule: its score is, over the whole image and the region crops, the maximum of the
sum of the listed outputs' probabilities; it is positive when the score is above ``threshold`` (``>=`` when
``inclusive``), and decided at all only when the finding it ``requires`` is positive. Every index belongs to
exactly one group. Errors name the key (``groups[2].indices``) and the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYOUT_FILE = "head_layout.json"
LAYOUT_FORMAT = "msknode-head-layout/1"
GROUP_ACTIVATIONS = ("sigmoid", "softmax")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class HeadLayoutError(ValueError):
    """A head-layout file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class OutputGroup:
    """Outputs activated together: ``indices`` into the logits, one label per index."""

    name: str
    activation: str
    indices: tuple[int, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Finding:
    """A decision over the region-guided maxima: score = max over crops of the sum of ``sum_of`` probabilities."""

    name: str
    label: str
    sum_of: tuple[int, ...]
    threshold: float = 0.5
    inclusive: bool = False
    requires: str | None = None
    values: tuple[str, str] = ("absent", "present")

    def positive(self, score: float) -> bool:
        return score >= self.threshold if self.inclusive else score > self.threshold


@dataclass(frozen=True)
class HeadLayout:
    num_outputs: int
    groups: tuple[OutputGroup, ...]
    findings: tuple[Finding, ...] = field(default=())

    def group(self, name: str) -> OutputGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "num_outputs": self.num_outputs,
            "groups": [
                {"name": g.name, "activation": g.activation, "indices": list(g.indices), "labels": list(g.labels)}
                for g in self.groups
            ],
            "findings": [
                {"name": f.name, "label": f.label, "sum_of": list(f.sum_of), "threshold": f.threshold,
                 "inclusive": f.inclusive, **({"requires": f.requires} if f.requires else {}),
                 "values": list(f.values)}
                for f in self.findings
            ],
        }


def _fail(source: str, key: str, why: str) -> HeadLayoutError:
    return HeadLayoutError(f"{source}: {key}: {why}")


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, where: str) -> Any:
    if key not in obj:
        raise _fail(source, f"{where}{key}", "missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(source, f"{where}{key}", f"expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _indices(value: Any, num_outputs: int, source: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(source, key, "a non-empty list of output indices is required")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < num_outputs:
            raise _fail(source, key, f"{item!r} is not an output index in 0..{num_outputs - 1}")
    if len(set(value)) != len(value):
        raise _fail(source, key, "an index is listed twice")
    return tuple(value)


def parse_layout(data: Any, source: str = LAYOUT_FILE) -> HeadLayout:
    """Validate a layout dictionary (see the module docstring); errors name ``source`` and the key."""
    if not isinstance(data, dict):
        raise _fail(source, "(top level)", "expected a JSON object")
    if data.get("format") != LAYOUT_FORMAT:
        raise _fail(source, "format", f"expected {LAYOUT_FORMAT!r}, got {data.get('format')!r}")
    unknown = sorted(set(data) - {"format", "num_outputs", "groups", "findings", "source"})
    if unknown:
        raise _fail(source, unknown[0], "unknown key")
    num_outputs = _require(data, "num_outputs", int, source, "")
    if num_outputs < 1:
        raise _fail(source, "num_outputs", "must be >= 1")
    groups_raw = _require(data, "groups", list, source, "")
    if not groups_raw:
        raise _fail(source, "groups", "at least one group is required")
    groups: list[OutputGroup] = []
    owner: dict[int, str] = {}
    for position, raw in enumerate(groups_raw):
        where = f"groups[{position}]."
        if not isinstance(raw, dict):
            raise _fail(source, f"groups[{position}]", "expected an object")
        name = _require(raw, "name", str, source, where)
        if not _NAME.match(name):
            raise _fail(source, f"{where}name", f"{name!r}: letters, digits and '_', starting with a letter")
        if name in {g.name for g in groups}:
            raise _fail(source, f"{where}name", f"{name!r} is used twice")
        activation = _require(raw, "activation", str, source, where)
        if activation not in GROUP_ACTIVATIONS:
            raise _fail(source, f"{where}activation", f"{activation!r} is not one of {GROUP_ACTIVATIONS}")
        indices = _indices(raw.get("indices"), num_outputs, source, f"{where}indices")
        labels = _require(raw, "labels", list, source, where)
        if len(labels) != len(indices) or not all(isinstance(lab, str) and lab.strip() for lab in labels):
            raise _fail(source, f"{where}labels", f"one non-empty label per index ({len(indices)}) is required")
        if activation == "softmax" and len(indices) < 2:
            raise _fail(source, f"{where}indices", "a softmax group needs at least two outputs")
        for index in indices:
            if index in owner:
                raise _fail(source, f"{where}indices", f"output {index} already belongs to group {owner[index]!r}")
            owner[index] = name
        groups.append(OutputGroup(name, activation, indices, tuple(labels)))
    orphans = sorted(set(range(num_outputs)) - set(owner))
    if orphans:
        raise _fail(source, "groups", f"outputs {orphans[:5]} belong to no group")
    findings: list[Finding] = []
    for position, raw in enumerate(data.get("findings", [])):
        where = f"findings[{position}]."
        if not isinstance(raw, dict):
            raise _fail(source, f"findings[{position}]", "expected an object")
        name = _require(raw, "name", str, source, where)
        if not _NAME.match(name) or name in {g.name for g in groups} | {f.name for f in findings}:
            raise _fail(source, f"{where}name", f"{name!r} is not a new plain name (groups and findings share names)")
        sum_of = _indices(raw.get("sum_of"), num_outputs, source, f"{where}sum_of")
        if any(owner[index] != owner[sum_of[0]] or any(g.activation == "sigmoid" for g in groups
                                                        if g.name == owner[index]) for index in sum_of[1:]):
            raise _fail(source, f"{where}sum_of", "summed outputs must belong to one softmax group")
        threshold = raw.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise _fail(source, f"{where}threshold", f"{threshold!r} is not a probability")
        inclusive = raw.get("inclusive", False)
        if not isinstance(inclusive, bool):
            raise _fail(source, f"{where}inclusive", "expected true or false")
        requires = raw.get("requires")
        if requires is not None and requires not in {f.name for f in findings}:
            raise _fail(source, f"{where}requires", f"{requires!r} names no earlier finding")
        values = raw.get("values", ["absent", "present"])
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, str) and v for v in values)):
            raise _fail(source, f"{where}values", "two labels are required: [negative, positive]")
        label = raw.get("label", name)
        if not isinstance(label, str) or not label.strip():
            raise _fail(source, f"{where}label", "a non-empty text is required")
        findings.append(Finding(name, label, sum_of, float(threshold), inclusive, requires, (values[0], values[1])))
    return HeadLayout(num_outputs, tuple(groups), tuple(findings))


def reported_labels(layout: HeadLayout) -> dict[str, list[str]]:
    """What the node reports per name, in order: each finding (one label: its score), then each group's labels."""
    return {**{f.name: [f.label] for f in layout.findings}, **{g.name: list(g.labels) for g in layout.groups}}


def read_layout(folder: str | Path) -> HeadLayout:
    """The folder's ``head_layout.json``, validated."""
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        raise HeadLayoutError(f"{path}: missing (a multi-head classifier needs its head layout beside the weights)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeadLayoutError(f"{path}: not readable JSON ({exc})") from None
    return parse_layout(data, str(path))


def write_layout(folder: str | Path, layout: HeadLayout) -> Path:
    path = Path(folder) / LAYOUT_FILE
    path.write_text(json.dumps(layout.to_dict(), indent=2) + "\n")
    return path


# SKELEX's config/classes.txt (the 38 outputs of the region-guided model) and External_validation.py's rule.
SKELEX_SITES = (
    "carpal bones", "clavicle", "distal femur", "distal fibula", "distal humerus", "distal radius", "distal tibia",
    "distal ulna", "femur diaphysis", "fibula diaphysis", "finger phalanges", "hindfoot", "humerus diaphysis",
    "metacarpal", "metatarsal", "midfoot", "patella", "pelvis", "proximal femur", "proximal fibula",
    "proximal humerus", "proximal radius", "proximal tibia", "proximal ulna", "radius diaphysis", "scapula",
    "tibia diaphysis", "toe phalanges", "ulna diaphysis",
)


def skelex_region_guided_layout() -> HeadLayout:
    """The layout of SKELEX's region-guided tumour classifier (38 outputs)."""
    return parse_layout({
        "format": LAYOUT_FORMAT,
        "num_outputs": 38,
        "groups": [
            {"name": "abnormal", "activation": "sigmoid", "indices": [0], "labels": ["Abnormal"]},
            {"name": "implant", "activation": "sigmoid", "indices": [37], "labels": ["Implant"]},
            {"name": "tumour_class", "activation": "softmax", "indices": [1, 2, 3, 4],
             "labels": ["malignant", "intermediate", "benign", "No bone tumor"]},
            {"name": "fracture_type", "activation": "softmax", "indices": [34, 35, 36],
             "labels": ["neoplastic pathologic fracture", "non-pathologic fracture", "No fracture"]},
            {"name": "site", "activation": "softmax", "indices": list(range(5, 34)), "labels": list(SKELEX_SITES)},
        ],
        "findings": [
            {"name": "bone_tumour", "label": "Bone tumour", "sum_of": [1, 2, 3], "threshold": 0.5,
             "inclusive": False, "values": ["absent", "present"]},
            {"name": "malignancy", "label": "Malignant bone tumour", "sum_of": [1], "threshold": 0.5,
             "inclusive": True, "requires": "bone_tumour", "values": ["benign", "malignant"]},
        ],
    }, "SKELEX region-guided layout")
