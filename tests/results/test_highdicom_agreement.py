"""Our standard tables (node/results/sop_classes.py, the character-set rules in node/results/headers.py) agree
with what the installed highdicom applies inside its own constructors.

node/results uses public APIs only; this test alone reads highdicom's private helpers, to notice when a highdicom
upgrade changes them (the SR built for some source would then change, or fail). On a mismatch: update the table
to the new highdicom (and check the results tests), do not silence the test.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools

import pytest
from highdicom import SpecificCharacterSetValues
from pydicom.dataset import Dataset

from node.results.headers import is_accepted_character_set
from node.results.sop_classes import (
    STANDARD_SOP_CLASSES,
    coded_modality,
    has_standard_iod,
    is_image_class,
    is_multi_frame_class,
)


def _private(module: str, name: str):  # type: ignore[no-untyped-def]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(f"highdicom no longer has {module}.{name}: compare our table with the new highdicom by hand "
                    "and rewrite this check against what replaced it")


def _highdicom_modalities() -> dict[str, str]:
    """The SOP class -> code table written inside highdicom's ``_get_coded_modality``, as "cidNN.Keyword"."""
    function = _private("highdicom.sr.templates", "_get_coded_modality")
    table = next(node for node in ast.walk(ast.parse(inspect.getsource(function))) if isinstance(node, ast.Dict))
    return {ast.literal_eval(key): ast.unparse(value).removeprefix("codes.")  # type: ignore[arg-type]
            for key, value in zip(table.keys, table.values)}


def test_the_same_sop_classes_have_an_iod() -> None:
    get_sop_class_iod_map = _private("highdicom._standard_utils", "get_sop_class_iod_map")
    assert set(STANDARD_SOP_CLASSES) == set(get_sop_class_iod_map())


def test_image_and_multi_frame_flags_match() -> None:
    does_iod_have_pixel_data = _private("highdicom._standard_utils", "does_iod_have_pixel_data")
    is_multiframe_image = _private("highdicom._standard_utils", "is_multiframe_image")
    for uid in [*STANDARD_SOP_CLASSES, "1.2.3.4.5.6"]:
        try:
            theirs_image = bool(does_iod_have_pixel_data(uid))
        except KeyError:
            theirs_image = False
        assert is_image_class(uid) is theirs_image, uid
        dataset = Dataset()
        dataset.SOPClassUID = uid
        try:
            theirs_frames: bool | None = bool(is_multiframe_image(dataset))
        except KeyError:
            theirs_frames = None
        if theirs_frames is None:
            with pytest.raises(KeyError):
                is_multi_frame_class(uid)
        else:
            assert is_multi_frame_class(uid) is theirs_frames, uid


def test_coded_modalities_match() -> None:
    get_coded_modality = _private("highdicom.sr.templates", "_get_coded_modality")
    theirs = _highdicom_modalities()
    assert set(theirs) <= set(STANDARD_SOP_CLASSES)
    for uid in [*STANDARD_SOP_CLASSES, "1.2.3.4.5.6"]:
        ours = coded_modality(uid)
        if uid not in theirs:
            assert ours is None, uid
            with pytest.raises(ValueError):
                get_coded_modality(uid)
            continue
        assert ours is not None, uid
        code = get_coded_modality(uid)
        assert (ours.value, ours.scheme_designator, ours.meaning) == (code.value, code.scheme_designator,
                                                                      code.meaning), uid


def test_private_and_unknown_classes() -> None:
    assert not has_standard_iod("1.2.3.4.5.6")
    assert not is_image_class("1.2.3.4.5.6")
    assert coded_modality("1.2.3.4.5.6") is None
    with pytest.raises(KeyError):
        is_multi_frame_class("1.2.3.4.5.6")


_TERMS = sorted({term.value for term in SpecificCharacterSetValues}
                | {"ISO 2022 IR 149", "ISO_IR 6", "bogus", "", "ISO 2022 IR 58"})


def test_character_set_rules_match_highdicom() -> None:
    check = _private("highdicom.valuerep", "_check_specific_character_set")

    def theirs(value: str | list[str]) -> bool:
        try:
            check(value)
        except (ValueError, TypeError):
            return False
        return True

    values: list[str | list[str]] = [*_TERMS, []]
    values += [list(pair) for pair in itertools.product(_TERMS, repeat=2)]
    values += [["ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"],
               ["ISO 2022 IR 6", "ISO 2022 IR 58", "ISO 2022 IR 87"],
               ["ISO 2022 IR 87", "ISO 2022 IR 6", "ISO 2022 IR 100"]]
    mismatches = [value for value in values if is_accepted_character_set(value) != theirs(value)]
    assert not mismatches
