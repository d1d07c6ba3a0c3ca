"""The grammar of a triage rule's ``when``: parse, check and evaluate, never ``eval``.

A ``when`` is parsed with :mod:`ast` and only a small grammar is accepted: comparisons
(``== != < <= > >= in not in``), ``and`` / ``or`` / ``not``, names (``fracture``, or a model's output as
``model.head``: one dot between two plain names, nothing else), and number / string constants (a tuple or
list of constants on the right of ``in``). Anything else — calls, other attributes, arithmetic, subscripts — is a
``ValueError``. A missing value (a name without a value) makes every comparison with it false.

This module knows neither the settings nor which names exist: :mod:`node.settings` checks a rule's syntax
with :func:`check_expression`, and :mod:`node.pipeline.triage` adds the names, their types and the
priorities.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any

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


def parse(source: str) -> ast.Expression:
    """The expression's tree; ``ValueError`` if it is not a Python expression at all."""
    try:
        return ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not a valid expression ({exc.msg})") from None


def _constant(node: ast.AST) -> Any:
    """A number or string literal (``-1`` included), else raise ``ValueError``."""
    if (isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str))
            and not isinstance(node.value, bool)):
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    raise ValueError(f"only numbers and quoted strings may be compared, not {ast.unparse(node)!r}")


def name_of(node: ast.AST) -> str | None:
    """The name an operand stands for: ``fracture`` (a Name) or ``knee.kl_grade`` (a Name's one attribute)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def check(node: ast.AST, names: set[str], kinds: Mapping[str, type] | None) -> None:
    """Walk the tree, accepting only the grammar in the module docstring; collect the names used into ``names``.

    ``kinds`` (name -> ``float`` or ``str``) enables the check that a name is compared with a constant of its
    type; None checks the grammar only.
    """
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            check(value, names, kinds)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        check(node.operand, names, kinds)
    elif isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if type(op) not in _COMPARISONS:
                raise ValueError(f"operator {type(op).__name__} is not allowed")
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(right, (ast.Tuple, ast.List, ast.Set)) or name_of(left) is None:
                    raise ValueError("'in' needs a name on the left and a list of constants on the right")
                constants = [_constant(element) for element in right.elts]
                _check_operand(left, constants, names, kinds)
                continue
            for side, other in ((left, right), (right, left)):
                if name_of(side) is not None:
                    other_values = [_constant(other)] if name_of(other) is None else []
                    _check_operand(side, other_values, names, kinds)
                else:
                    _constant(side)
    else:
        raise ValueError(
            f"{ast.unparse(node)!r} is not allowed: use comparisons (== != < <= > >= in) joined by and / or / not"
        )


def _check_operand(node: ast.AST, constants: list[Any], names: set[str], kinds: Mapping[str, type] | None) -> None:
    name = name_of(node)
    assert name is not None
    names.add(name)
    if kinds is None or name not in kinds:
        return
    for constant in constants:
        expected = kinds[name]
        if (expected is str) != isinstance(constant, str):
            wanted = "a quoted string" if expected is str else "a number"
            raise ValueError(f"{name} is compared with {constant!r}, but it is {wanted}")


def check_expression(source: str) -> None:
    """Raise ``ValueError`` if ``source`` is outside the rule grammar (names are checked later, per model)."""
    check(parse(source).body, set(), None)


def _operand(node: ast.AST, values: Mapping[str, Any]) -> Any:
    name = name_of(node)
    if name is not None:
        return values.get(name)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return tuple(_constant(element) for element in node.elts)
    return _constant(node)


def evaluate(node: ast.AST, values: Mapping[str, Any]) -> bool:
    """Whether a checked tree (its ``body``) holds for ``values``; a missing value never matches."""
    if isinstance(node, ast.BoolOp):
        results = (evaluate(value, values) for value in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        return not evaluate(node.operand, values)
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
