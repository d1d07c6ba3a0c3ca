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

A missing value (no calibration, no header attribute) makes every comparison with it false.
A rule naming only ``calling_ae`` / ``peer`` also sets a study's starting priority when it is queued (with the
peer's ``priority`` the higher of the two wins), so the work queue already orders it; after analysis the whole
list decides, and the result is never below that starting priority.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.settings import PRIORITIES, TriageSettings, priority_rank

STRING_ATTRIBUTES = ("calling_ae", "peer", "modality", "body_part", "requested_priority")
QUEUE_TIME_NAMES = frozenset({"calling_ae", "peer"})
SCORE_NAMES = ("abnormality_score", "abnormality_percentile")

_COMPARISONS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda left, right: left in right,
    ast.NotIn: lambda left, right: left not in right,
}


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


def head_labels_from_model(model: Path) -> dict[str, list[str]] | None:
    """Head names and labels from ``<model>/heads/*.json`` without loading weights; None if not a folder.

    (Heads of other checkpoint kinds are known once the worker has loaded the model; it checks the rules again.)
    """
    heads_dir = Path(model) / "heads"
    if not Path(model).is_dir():
        return None
    labels: dict[str, list[str]] = {}
    if heads_dir.is_dir():
        for meta in sorted(heads_dir.glob("*.json")):
            try:
                data = json.loads(meta.read_text())
                labels[str(data["name"])] = [str(label) for label in data["labels"]]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # the loader reports broken head files itself
    return labels


# --- parsing ---------------------------------------------------------------------------------------------------
def _constant(node: ast.AST) -> Any:
    """A number or string literal (``-1`` included), else raise ``ValueError``."""
    if (isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str))
            and not isinstance(node.value, bool)):
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    raise ValueError(f"only numbers and quoted strings may be compared, not {ast.unparse(node)!r}")


def _check(node: ast.AST, names: set[str], kinds: Mapping[str, type] | None) -> None:
    """Walk the tree, accepting only the grammar in the module docstring; collect the names used."""
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, names, kinds)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, names, kinds)
    elif isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if type(op) not in _COMPARISONS:
                raise ValueError(f"operator {type(op).__name__} is not allowed")
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, (ast.Tuple, ast.List, ast.Set)) or not isinstance(left, ast.Name):
                    raise ValueError("'in' needs a name on the left and a list of constants on the right")
                constants = [_constant(element) for element in right.elts]
                _check_operand(left, constants, names, kinds)
                continue
            for side, other in ((left, right), (right, left)):
                if isinstance(side, ast.Name):
                    other_values = [_constant(other)] if not isinstance(other, ast.Name) else []
                    _check_operand(side, other_values, names, kinds)
                else:
                    _constant(side)
    else:
        raise ValueError(
            f"{ast.unparse(node)!r} is not allowed: use comparisons (== != < <= > >= in) joined by and / or / not"
        )


def _check_operand(name: ast.Name, constants: list[Any], names: set[str], kinds: Mapping[str, type] | None) -> None:
    names.add(name.id)
    if kinds is None or name.id not in kinds:
        return
    for constant in constants:
        expected = kinds[name.id]
        if (expected is str) != isinstance(constant, str):
            wanted = "a quoted string" if expected is str else "a number"
            raise ValueError(f"{name.id} is compared with {constant!r}, but it is {wanted}")


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
        return bool(_evaluate(self.tree.body, values))


def _operand(node: ast.AST, values: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Name):
        return values.get(node.id)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return tuple(_constant(element) for element in node.elts)
    return _constant(node)


def _evaluate(node: ast.AST, values: Mapping[str, Any]) -> bool:
    if isinstance(node, ast.BoolOp):
        results = (_evaluate(value, values) for value in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        return not _evaluate(node.operand, values)
    assert isinstance(node, ast.Compare)
    operands = [node.left, *node.comparators]
    for op, left, right in zip(node.ops, operands, operands[1:]):
        a, b = _operand(left, values), _operand(right, values)
        if a is None or b is None:
            return False  # a missing value never matches
        try:
            if not _COMPARISONS[type(op)](a, b):
                return False
        except TypeError:  # e.g. a class compared with a number: validated away, but never crash the worker
            return False
    return True


def check_expression(source: str) -> None:
    """Raise ``ValueError`` if ``source`` is outside the rule grammar (names are checked later, per model)."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not a valid expression ({exc.msg})") from None
    _check(tree.body, set(), None)


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
        try:
            tree = ast.parse(rule.when.strip(), mode="eval")
        except SyntaxError as exc:
            problems.append(f"{key}.when: not a valid expression ({exc.msg})")
            continue
        names: set[str] = set()
        try:
            _check(tree.body, names, kinds)
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
class Decision:
    rank: int
    reason: str  # the rule's name, "peer default", a queue-time rule's name, or "default"
    rule: CompiledRule | None = None

    @property
    def priority(self) -> str:
        return PRIORITIES[self.rank]


class Triage:
    """The compiled rules of one configuration; :meth:`starting` before analysis, :meth:`decide` after."""

    def __init__(self, settings: TriageSettings, head_labels: Mapping[str, Sequence[str]] | None) -> None:
        self.settings = settings
        self.kinds = value_kinds(head_labels) if head_labels is not None else None
        self.rules = compile_rules(settings, self.kinds)

    def starting(self, calling_ae: str | None, peer_name: str | None, peer_priority: str | None) -> Decision:
        """Priority when a study is queued: the peer's, or the first matching queue-time rule's if higher."""
        best = Decision(priority_rank(peer_priority or "routine"), "peer default")
        values = {"calling_ae": calling_ae, "peer": peer_name}
        for rule in self.rules:
            if rule.queue_time and rule.matches(values):
                if rule.rank > best.rank:
                    best = Decision(rule.rank, rule.name, rule)
                break
        return best

    def decide(self, values: Mapping[str, Any], starting: Decision) -> Decision:
        """First matching rule (else ``triage.default``), never below the starting priority."""
        for rule in self.rules:
            if rule.matches(values):
                found = Decision(rule.rank, rule.name, rule)
                break
        else:
            found = Decision(priority_rank(self.settings.default), "default")
        return starting if starting.rank > found.rank else found


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


def _keep_max(values: dict[str, Any], name: str, value: float | None) -> None:
    if value is None:
        return
    current = values.get(name)
    values[name] = float(value) if current is None else max(current, float(value))


def summarise(values: Mapping[str, Any], decision: Decision, heads: Iterable[str] = ()) -> dict[str, Any]:
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
