"""Triage: ``[[triage.rules]]`` over a study's result values, first match wins, never ``eval``'d.

A rule's ``when`` is parsed with :mod:`ast` and only a small grammar is accepted: comparisons
(``== != < <= > >= in not in``), ``and`` / ``or`` / ``not``, names, and number / string constants (a tuple or
list of constants on the right of ``in``). Anything else — calls, attributes, arithmetic, subscripts — is a
configuration error naming ``triage.rules[i].when``; so is a name that is neither a study attribute nor an
output of the configured model.

Names (see docs/configuration.md, ``[triage]``):

- study attributes, known before analysis: ``calling_ae``, ``peer``, ``modality``, ``body_part``,
  ``requested_priority`` (Requested Procedure Priority (0040,1003), e.g. ``"STAT"``);
- ``abnormality_score`` and ``abnormality_percentile`` (0-100; absent without a calibration): the study's
  highest image value;
- per model head: a one-label head (``fracture``) is its probability (study: the highest image's); a
  several-label head (``lesion``) is its class (study: the worst — the latest label in the head's order —
  among the images' top classes), and ``<head>_<label>`` the label's probability (study: highest).

Several models (``[[models]]``): every model's outputs are also named ``<model>.<name>`` with the model's
configured name (``knee.kl_grade``, ``knee.kl_grade_4``, ``mae.abnormality_score``); the bare names are the
**first** configured model's, so rules written for a one-model node keep working.

A missing value (no calibration, no header attribute) makes every comparison with it false. The grammar
itself (parse, check, evaluate) is :mod:`node.pipeline.triage_rules`; this module adds the names, their types
and the priorities, and :class:`Triage` is the one place that decides a study's priority.
A rule naming only ``calling_ae`` / ``peer`` also sets a study's starting priority when it is queued (with the
peer's ``priority`` the higher of the two wins), so the work queue already orders it; after analysis the whole
list decides, and the result is never below that starting priority.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.vit_classifier.layout import LAYOUT_FILE, HeadLayoutError, read_layout, reported_labels
from node.pipeline.triage_rules import check, evaluate, parse
from node.results.knee_codes import FINDINGS
from node.settings import PRIORITIES, TriageSettings, priority_rank

STRING_ATTRIBUTES = ("calling_ae", "peer", "modality", "body_part", "requested_priority")
QUEUE_TIME_NAMES = frozenset({"calling_ae", "peer"})
SCORE_NAMES = ("abnormality_score", "abnormality_percentile")
NO_RULE_MATCHED = "no triage rule matched"  # the reason recorded when ``[triage] default`` set the priority


class TriageError(ValueError):
    """Rules that cannot be used; ``problems`` are ``triage.rules[i].when: ...`` strings."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# --- which names exist -----------------------------------------------------------------------------------------
def value_kinds(head_labels: Mapping[str, Sequence[str]]) -> dict[str, type]:
    """Every name a rule may use, with its type (``float`` or ``str``), for a model with these heads."""
    kinds: dict[str, type] = {name: str for name in STRING_ATTRIBUTES}
    kinds.update({name: float for name in SCORE_NAMES})
    for head, labels in head_labels.items():
        if len(labels) == 1:
            kinds[head] = float
        else:
            kinds[head] = str
            for label in labels:
                kinds[f"{head}_{label}"] = float
    return kinds


def model_value_kinds(models: Mapping[str, Mapping[str, Sequence[str]]]) -> dict[str, type]:
    """Names for several models ({configured name: head labels}, in configuration order): ``<model>.<name>``
    for every model's outputs, and the bare names for the first model's."""
    kinds: dict[str, type] = {name: str for name in STRING_ATTRIBUTES}
    for index, (model, labels) in enumerate(models.items()):
        for name, kind in value_kinds(labels).items():
            if name in STRING_ATTRIBUTES:
                continue
            kinds[f"{model}.{name}"] = kind
            if index == 0:
                kinds[name] = kind
    return kinds


def head_labels_from_model(model: Path) -> dict[str, list[str]] | None:
    """Head names and labels from ``<model>/heads/*.json`` without loading weights; None if not a folder.

    (Heads of other checkpoint kinds are known once the worker has loaded the model; it checks the rules again.)
    """
    heads_dir = Path(model) / "heads"
    if not Path(model).is_dir():
        return None
    labels: dict[str, list[str]] = {}
    if (Path(model) / LAYOUT_FILE).is_file():  # a multi-head classifier: its names are in its head layout
        try:
            labels.update(reported_labels(read_layout(model)))
        except HeadLayoutError:
            pass  # the loader reports a broken layout itself
    if (Path(model) / VOLUME_MODEL_CONFIG).is_file():  # OrthoDiffusion: its heads are listed in its config
        try:
            for head in json.loads((Path(model) / VOLUME_MODEL_CONFIG).read_text()).get("heads", []):
                labels[str(head["name"])] = [str(label) for label in head.get("labels", KNEE_FINDING_LABELS)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # the loader reports a broken config itself
    if heads_dir.is_dir():
        for meta in sorted(heads_dir.glob("*.json")):
            try:
                data = json.loads(meta.read_text())
                labels[str(data["name"])] = [str(label) for label in data["labels"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # the loader reports broken head files itself
    return labels


VOLUME_MODEL_CONFIG = "orthodiffusion.json"  # engines.orthodiffusion.family.CONFIG_FILE (read here without torch)
KNEE_FINDING_LABELS = tuple(finding.label for finding in FINDINGS)  # an OrthoDiffusion head's default labels


# --- compiling ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompiledRule:
    index: int
    name: str
    priority: str
    source: str
    tree: ast.Expression
    names: frozenset[str]

    @property
    def rank(self) -> int:
        return priority_rank(self.priority)

    @property
    def queue_time(self) -> bool:
        """Decidable before analysis (names only the sender): also sets the starting priority."""
        return self.names <= QUEUE_TIME_NAMES

    def matches(self, values: Mapping[str, Any]) -> bool:
        return bool(evaluate(self.tree.body, values))


def compile_rules(settings: TriageSettings, kinds: Mapping[str, type] | None) -> list[CompiledRule]:
    """Parse and check every rule; raise :class:`TriageError` listing every problem with its key path.

    ``kinds`` (from :func:`value_kinds`) enables the unknown-name and type checks; None checks grammar only.
    """
    problems: list[str] = []
    compiled: list[CompiledRule] = []
    seen: dict[str, int] = {}
    for index, rule in enumerate(settings.rules):
        key = f"triage.rules[{index}]"
        if rule.name in seen:
            problems.append(f"{key}.name: duplicate rule name {rule.name!r} (also triage.rules[{seen[rule.name]}])")
        seen.setdefault(rule.name, index)
        names: set[str] = set()
        try:
            tree = parse(rule.when)
            check(tree.body, names, kinds)
        except ValueError as exc:
            problems.append(f"{key}.when: {exc}")
            continue
        if kinds is not None:
            unknown = sorted(names - set(kinds))
            if unknown:
                known = ", ".join(sorted(kinds))
                problems.append(f"{key}.when: unknown name(s) {', '.join(unknown)} (known: {known})")
                continue
        compiled.append(CompiledRule(index, rule.name, rule.priority, rule.when, tree, frozenset(names)))
    if problems:
        raise TriageError(problems)
    return compiled


# --- deciding --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriorityDecision:
    """A study's priority and why: the rule's name, "peer default", a queue-time rule's name, or
    :data:`NO_RULE_MATCHED` (``[triage] default``), in words a radiologist reads on the worklist."""

    rank: int
    reason: str
    rule: CompiledRule | None = None

    @property
    def priority(self) -> str:
        return PRIORITIES[self.rank]


class Triage:
    """The one place that decides a study's priority, from the compiled rules of one configuration.

    :meth:`starting` when a study is queued (the scheduler), :meth:`final` after analysis (the worker),
    :meth:`as_queued` when no result could be built. Callers pass the values in and store what it decided;
    storage never computes a priority.
    """

    def __init__(self, settings: TriageSettings, head_labels: Mapping[str, Sequence[str]] | None,
                 models: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> None:
        """``head_labels``: one model's heads (bare names); ``models``: several models' ({configured name: head
        labels}, first model's names also bare; :func:`model_value_kinds`), used instead when given."""
        self.settings = settings
        if models is not None:
            self.kinds: dict[str, type] | None = model_value_kinds(models)
        else:
            self.kinds = value_kinds(head_labels) if head_labels is not None else None
        self.rules = compile_rules(settings, self.kinds)

    def starting(self, calling_ae: str | None, peer_name: str | None, peer_priority: str | None) -> PriorityDecision:
        """Priority when a study is queued: the peer's, or the first matching queue-time rule's if higher."""
        best = PriorityDecision(priority_rank(peer_priority or "routine"), "peer default")
        values = {"calling_ae": calling_ae, "peer": peer_name}
        for rule in self.rules:
            if rule.queue_time and rule.matches(values):
                if rule.rank > best.rank:
                    best = PriorityDecision(rule.rank, rule.name, rule)
                break
        return best

    def decide(self, values: Mapping[str, Any], starting: PriorityDecision) -> PriorityDecision:
        """First matching rule (else ``triage.default``), never below the starting priority."""
        for rule in self.rules:
            if rule.matches(values):
                found = PriorityDecision(rule.rank, rule.name, rule)
                break
        else:
            found = PriorityDecision(priority_rank(self.settings.default), NO_RULE_MATCHED)
        return starting if starting.rank > found.rank else found

    def final(self, queued_rank: int, calling_ae: str | None, peer_name: str | None, peer_priority: str | None,
              values: Mapping[str, Any] | None) -> PriorityDecision:
        """Priority after analysis: the whole list over the study's ``values`` (:func:`study_values`).

        Never below the starting priority, which is the queue-time decision again, or the rank the job was
        queued with if that is higher (a "peer default"). ``values`` None (nothing analysed): the starting
        priority.
        """
        starting = self.starting(calling_ae, peer_name, peer_priority)
        if queued_rank > starting.rank:
            starting = PriorityDecision(queued_rank, "peer default")
        return starting if values is None else self.decide(values, starting)

    @staticmethod
    def as_queued(queued_rank: int) -> PriorityDecision:
        """Priority of a study whose results could not be built: the rank its job was queued with."""
        return PriorityDecision(queued_rank, "peer default")


def header_text(header: Any, keyword: str) -> str | None:
    """A header attribute (a pydicom Dataset's) as stripped text, None when absent or empty."""
    value = header.get(keyword) if header is not None else None
    text = str(value).strip() if value is not None else ""
    return text or None


def requested_priority(header: Any) -> str | None:
    """Requested Procedure Priority (0040,1003), top level or in the Request Attributes Sequence, upper case."""
    found = header_text(header, "RequestedProcedurePriority")
    if found is None and header is not None:
        for item in header.get("RequestAttributesSequence") or []:
            found = header_text(item, "RequestedProcedurePriority")
            if found:
                break
    return found.upper() if found else None


def study_attributes(header: Any, calling_ae: str | None, peer_name: str | None) -> dict[str, str | None]:
    """The study attributes a rule may name (``STRING_ATTRIBUTES``), from a received header and its sender."""
    return {
        "calling_ae": calling_ae,
        "peer": peer_name,
        "modality": header_text(header, "Modality"),
        "body_part": header_text(header, "BodyPartExamined"),
        "requested_priority": requested_priority(header),
    }


def study_values(
    images: Iterable[tuple[float, float | None, Mapping[str, Sequence[float]]]],
    head_labels: Mapping[str, Sequence[str]],
    attributes: Mapping[str, str | None],
) -> dict[str, Any]:
    """Aggregate per-image (score, percentile, {head: probabilities}) into the study's named values."""
    values: dict[str, Any] = {name: attributes.get(name) for name in STRING_ATTRIBUTES}
    for score, percentile, heads in images:
        _keep_max(values, "abnormality_score", score)
        _keep_max(values, "abnormality_percentile", percentile)
        for head, probabilities in heads.items():
            labels = list(head_labels.get(head, []))
            if len(labels) != len(probabilities):
                continue
            if len(labels) == 1:
                _keep_max(values, head, float(probabilities[0]))
                continue
            top = max(range(len(labels)), key=lambda i: probabilities[i])
            current = values.get(head)
            if current is None or top > labels.index(current):
                values[head] = labels[top]
            for label, probability in zip(labels, probabilities):
                _keep_max(values, f"{head}_{label}", float(probability))
    return values


def model_study_values(
    per_model: Sequence[tuple[str, Iterable[tuple[float | None, float | None, Mapping[str, Sequence[float]]]],
                              Mapping[str, Sequence[str]]]],
    attributes: Mapping[str, str | None],
) -> dict[str, Any]:
    """Several models' study values: (configured name, images, head labels) per model, in configuration order.

    Every value is named ``<model>.<name>``; the first model's are also bare (:func:`model_value_kinds`)."""
    values: dict[str, Any] = {name: attributes.get(name) for name in STRING_ATTRIBUTES}
    for index, (model, images, labels) in enumerate(per_model):
        own = study_values(images, labels, attributes)
        for name, value in own.items():
            if name in STRING_ATTRIBUTES:
                continue
            values[f"{model}.{name}"] = value
            if index == 0:
                values[name] = value
    return values


def _keep_max(values: dict[str, Any], name: str, value: float | None) -> None:
    if value is None:
        return
    current = values.get(name)
    values[name] = float(value) if current is None else max(current, float(value))


def summarise(values: Mapping[str, Any], decision: PriorityDecision, heads: Iterable[str] = ()) -> dict[str, Any]:
    """The findings part of a notification: the rule, the values it named, the scores and each head's value."""
    shown = set(SCORE_NAMES) | set(heads)
    if decision.rule is not None:
        shown |= set(decision.rule.names)
    shown -= {"calling_ae", "peer"}  # the sender's identity is no finding
    key_values = {}
    for name in sorted(shown):
        value = values.get(name)
        if value is not None:
            key_values[name] = round(value, 4) if isinstance(value, float) else value
    return {"rule": decision.reason, "when": decision.rule.source if decision.rule else None, "values": key_values}
