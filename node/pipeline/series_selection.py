"""Which series of an MR study feed a 3-D model: one per plane, chosen by rules, every decision with its reason.

Why: a knee MRI study holds a dozen series (localisers, T1, PD / T2 with and without fat saturation, repeats,
oblique and reformatted ones); a model trained on fat-saturated PD / T2 stacks must get one clean stack per
plane, and an admin must be able to see why each series was or was not used. This module decides from
headers only (no pixels), and is pure: the worker passes the headers and ``settings.mri`` in and stores
the :class:`SelectionReport` it gets back.

The rules follow the idea of MONAI Deploy's series selector (conditions on header attributes, a regular
expression for text) but score instead of filtering: each ``[[mri.rules]]`` entry whose conditions all hold
adds its score, series below ``mri.min_score`` are rejected, and the best per plane wins (ties: more slices,
then the lower series number). Before scoring, a series is rejected when it is not MR, is a localiser, has a
description matching ``mri.excluded_series_descriptions``, is oblique beyond ``mri.plane_tolerance_degrees``,
has too few slices, or is not one clean volume (``engines.imaging.volume.plan_volume``: missing slices,
duplicate positions, mixed echoes or orientations...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from engines.imaging.volume import VolumePlan, plan_volume, plane_of
from node.settings import MriSettings, SeriesRule


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules read of one series (first instance's header, Enhanced MR functional groups included)."""

    series_instance_uid: str
    series_number: int | None
    description: str
    modality: str
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    fat_saturated: bool
    repetition_time_ms: float | None
    echo_time_ms: float | None
    slices: int
    plane: str | None
    plane_angle_degrees: float | None
    nearest_plane: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid, "series_number": self.series_number,
            "description": self.description, "modality": self.modality, "image_type": list(self.image_type),
            "scanning_sequence": list(self.scanning_sequence), "sequence_variant": list(self.sequence_variant),
            "fat_saturated": self.fat_saturated, "repetition_time_ms": self.repetition_time_ms,
            "echo_time_ms": self.echo_time_ms, "slices": self.slices, "plane": self.plane,
            "plane_angle_degrees": None if self.plane_angle_degrees is None else round(self.plane_angle_degrees, 2),
        }


@dataclass(frozen=True)
class Reason:
    """Why a series was rejected: a stable ``code`` for programs, a ``message`` naming the setting for people."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class SeriesDecision:
    """One series and what became of it: chosen for ``plane``, or rejected with ``reasons``."""

    facts: SeriesFacts
    score: float | None  # None: rejected before scoring
    matched_rules: tuple[tuple[str, float], ...]
    chosen: bool
    reasons: tuple[Reason, ...]  # empty when chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.facts.to_dict(),
            "score": self.score,
            "matched_rules": [{"name": name, "score": score} for name, score in self.matched_rules],
            "chosen": self.chosen,
            "reasons": [reason.to_dict() for reason in self.reasons],
        }


@dataclass(frozen=True)
class SelectionReport:
    """The outcome for a study: the chosen series per plane, every rejected series, planes left without one."""

    chosen: Mapping[str, SeriesDecision]  # plane -> decision
    rejected: tuple[SeriesDecision, ...]
    missing_planes: Mapping[str, str] = field(default_factory=dict)  # plane -> why nothing was chosen

    @property
    def complete(self) -> bool:
        return not self.missing_planes

    def series_for(self, plane: str) -> str | None:
        decision = self.chosen.get(plane)
        return decision.facts.series_instance_uid if decision else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (only str, numbers, bools, None, lists, dicts)."""
        return {
            "chosen": {plane: decision.to_dict() for plane, decision in self.chosen.items()},
            "rejected": [decision.to_dict() for decision in self.rejected],
            "missing_planes": dict(self.missing_planes),
        }


# ---------------------------------------------------------------------------------------------------------
# Header facts
# ---------------------------------------------------------------------------------------------------------


def _values(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part.strip().upper() for part in value.split("\\") if part.strip())
    try:
        return tuple(str(part).strip().upper() for part in value if str(part).strip())
    except TypeError:
        return (str(value).strip().upper(),)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _functional_group(dataset: Dataset, sequence: str) -> Dataset | None:
    """The macro item from the shared functional groups, else from the first frame's."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = dataset.get(groups)
        if items:
            macro = items[0].get(sequence)
            if macro:
                return macro[0]
    return None


def _enhanced_scanning_sequence(dataset: Dataset) -> tuple[str, ...]:
    """Enhanced MR has no Scanning Sequence; derive its terms from Echo Pulse Sequence and Inversion Recovery."""
    echo = str(dataset.get("EchoPulseSequence", "")).upper()
    terms = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}.get(echo, ())
    modifier = _functional_group(dataset, "MRModifierSequence")
    if modifier is not None and str(modifier.get("InversionRecovery", "")).upper() == "YES":
        terms = terms + ("IR",)
    if str(dataset.get("EchoPlanarPulseSequence", "")).upper() == "YES":
        terms = terms + ("EP",)
    return terms


def series_facts(series_uid: str, headers: Sequence[Dataset], plan: VolumePlan, settings: MriSettings) -> SeriesFacts:
    """Read what the rules need from one series' headers (and its volume plan, for the plane and slice count)."""
    first = headers[0]
    enhanced = "PerFrameFunctionalGroupsSequence" in first
    description = str(first.get("SeriesDescription", "") or "")
    if enhanced:
        timing = _functional_group(first, "MRTimingAndRelatedParametersSequence")
        echo = _functional_group(first, "MREchoSequence")
        repetition = _number(timing.get("RepetitionTime")) if timing is not None else None
        echo_time = _number(echo.get("EffectiveEchoTime")) if echo is not None else None
        scanning = _enhanced_scanning_sequence(first)
        variant: tuple[str, ...] = ()
        fat_header = str(first.get("SpectrallySelectedSuppression", "")).upper() in ("FAT", "FAT_AND_WATER")
    else:
        repetition = _number(first.get("RepetitionTime"))
        echo_time = _number(first.get("EchoTime"))
        scanning = _values(first.get("ScanningSequence"))
        variant = _values(first.get("SequenceVariant"))
        fat_header = "FS" in _values(first.get("ScanOptions"))
    fat_description = re.search(settings.fat_saturation_description, description, re.IGNORECASE) is not None
    orientation = plan.orientation
    plane = angle = nearest = None
    if orientation is not None:
        try:
            plane, angle, nearest = plane_of(orientation, settings.plane_tolerance_degrees)
        except ValueError:
            pass
    return SeriesFacts(
        series_instance_uid=series_uid,
        series_number=int(first.SeriesNumber) if first.get("SeriesNumber") not in (None, "") else None,
        description=description,
        modality=str(first.get("Modality", "") or "").upper(),
        image_type=_values(first.get("ImageType")),
        scanning_sequence=scanning,
        sequence_variant=variant,
        fat_saturated=fat_header or fat_description,
        repetition_time_ms=repetition,
        echo_time_ms=echo_time,
        slices=len(plan.frames),
        plane=plane,
        plane_angle_degrees=angle,
        nearest_plane=nearest,
    )


# ---------------------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------------------


def _within(value: float | None, bounds: tuple[float, float] | None) -> bool:
    if bounds is None:
        return True
    return value is not None and bounds[0] <= value <= bounds[1]


def rule_matches(rule: SeriesRule, facts: SeriesFacts) -> bool:
    """Every condition the rule gives holds for the series."""
    if rule.planes and facts.plane not in rule.planes:
        return False
    if rule.series_description is not None and not re.search(rule.series_description, facts.description, re.IGNORECASE):
        return False
    if rule.scanning_sequence and not set(rule.scanning_sequence) & set(facts.scanning_sequence):
        return False
    if rule.sequence_variant and not set(rule.sequence_variant) & set(facts.sequence_variant):
        return False
    if rule.fat_saturated is not None and rule.fat_saturated != facts.fat_saturated:
        return False
    if rule.image_type and not set(rule.image_type) <= set(facts.image_type):
        return False
    return (_within(facts.repetition_time_ms, rule.repetition_time_ms)
            and _within(facts.echo_time_ms, rule.echo_time_ms)
            and _within(facts.slices, rule.slices))  # type: ignore[arg-type]


def _gatekeeping(facts: SeriesFacts, plan: VolumePlan, settings: MriSettings) -> list[Reason]:
    """Reasons that exclude a series whatever its score."""
    reasons: list[Reason] = []
    if facts.modality not in settings.modalities:
        reasons.append(Reason("modality", f"modality {facts.modality or '(none)'} is not one of mri.modalities "
                                          f"({', '.join(settings.modalities)})"))
    excluded_types = sorted(set(facts.image_type) & set(settings.excluded_image_types))
    if excluded_types:
        reasons.append(Reason("image-type", f"Image Type {'/'.join(excluded_types)} is in mri.excluded_image_types"))
    for index, pattern in enumerate(settings.excluded_series_descriptions):
        if re.search(pattern, facts.description, re.IGNORECASE):
            reasons.append(Reason("description", f"Series Description {facts.description!r} matches "
                                                 f"mri.excluded_series_descriptions[{index}]"))
            break
    for problem in plan.problems:
        if problem.code == "localizer" and any(r.code == "image-type" for r in reasons):
            continue  # said once is enough
        reasons.append(Reason(problem.code, f"not one clean volume: {problem.message}"))
    geometry_broken = any(p.code in ("mixed-orientation", "no-geometry", "mixed-size") for p in plan.problems)
    if not geometry_broken and facts.plane_angle_degrees is not None:
        if facts.plane is None:
            reasons.append(Reason("oblique", f"oblique: slice normal {facts.plane_angle_degrees:.1f} degrees from the "
                                             f"{facts.nearest_plane} axis (mri.plane_tolerance_degrees = "
                                             f"{settings.plane_tolerance_degrees:g})"))
        elif facts.plane not in settings.planes:
            reasons.append(Reason("plane", f"{facts.plane} is not one of mri.planes"))
    if facts.slices < settings.min_slices and not geometry_broken:
        reasons.append(Reason("too-few-slices", f"{facts.slices} slices, fewer than mri.min_slices = "
                                                f"{settings.min_slices}"))
    return reasons


def _label(facts: SeriesFacts) -> str:
    number = f"series {facts.series_number}" if facts.series_number is not None else "series"
    return f"{number} {facts.description!r}" if facts.description else number


def select_series(headers_by_series: Mapping[str, Sequence[Dataset]], rules: MriSettings) -> SelectionReport:
    """Choose one series per plane of ``rules.planes`` from ``{SeriesInstanceUID: headers of its instances}``.

    Headers may be read without pixel data. Pure: nothing is read or written besides the arguments.
    """
    candidates: dict[str, list[SeriesDecision]] = {}
    rejected: list[SeriesDecision] = []
    for series_uid, headers in headers_by_series.items():
        if not headers:
            continue
        plan = plan_volume(headers)
        facts = series_facts(series_uid, headers, plan, rules)
        reasons = _gatekeeping(facts, plan, rules)
        if reasons:
            rejected.append(SeriesDecision(facts, None, (), False, tuple(reasons)))
            continue
        matched = tuple((rule.name, rule.score) for rule in rules.rules if rule_matches(rule, facts))
        score = float(sum(score for _, score in matched))
        if score < rules.min_score:
            described = ", ".join(f"{name} {score:+g}" for name, score in matched) or "no rule matched"
            rejected.append(SeriesDecision(facts, score, matched, False, (Reason(
                "score", f"score {score:g} is below mri.min_score = {rules.min_score:g} ({described})"),)))
            continue
        assert facts.plane is not None
        candidates.setdefault(facts.plane, []).append(SeriesDecision(facts, score, matched, False, ()))

    chosen: dict[str, SeriesDecision] = {}
    missing: dict[str, str] = {}
    for plane in rules.planes:
        ranked = sorted(candidates.get(plane, []), key=lambda d: (
            -(d.score or 0.0), -d.facts.slices,
            d.facts.series_number if d.facts.series_number is not None else 1 << 31, d.facts.series_instance_uid))
        if not ranked:
            missing[plane] = f"no {plane} series passed the checks (see the rejected series)"
            continue
        best = ranked[0]
        chosen[plane] = SeriesDecision(best.facts, best.score, best.matched_rules, True, ())
        for other in ranked[1:]:
            if other.score == best.score:
                why = (f"{_label(best.facts)} has more slices ({best.facts.slices} vs {other.facts.slices})"
                       if best.facts.slices != other.facts.slices else f"{_label(best.facts)} comes first")
                message = f"same score {other.score:g} as the chosen {plane} series; {why}"
            else:
                message = f"{_label(best.facts)} scores higher ({best.score:g} vs {other.score:g})"
            rejected.append(SeriesDecision(other.facts, other.score, other.matched_rules, False,
                                           (Reason("not-preferred", message),)))
    order = {uid: index for index, uid in enumerate(headers_by_series)}
    rejected.sort(key=lambda d: order.get(d.facts.series_instance_uid, 0))
    return SelectionReport(chosen, tuple(rejected), missing)
