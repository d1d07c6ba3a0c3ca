"""Mutated files fed to the worker's read + preprocessing + decoders in-process.

The contract (engines/imaging/preprocess.py): ``preprocess`` either returns model input or raises ``PreprocessError``
with a reason; never another exception type, never a hang. Reading is pydicom's: the worker records any
exception from ``dcmread`` as "unreadable", so only preprocessing is held to the single error type.
The named ``test_regression_*`` tests are the crashes the fuzzer found, kept as they were found.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections import Counter

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from engines.imaging.preprocess import PreprocessError, preprocess
from tests.reliability.fuzz import Case, base_dataset, cases, walk_explicit, _encode_dataset

CI_SEED = 20261122
CI_CASES = 300


def preprocess_outcome(case: Case) -> str:
    """``ok``, ``unreadable``, ``PreprocessError``, or ``CRASH <type>: <message>`` for anything else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = pydicom.dcmread(io.BytesIO(case.part10()))
        except Exception:  # noqa: BLE001 - the worker's contract for reading (see the module docstring)
            return "unreadable"
        try:
            preprocess(dataset)
        except PreprocessError as exc:
            assert exc.reason, "a PreprocessError must say why"
            return "PreprocessError"
        except Exception as exc:  # noqa: BLE001 - exactly what this test looks for
            return f"CRASH {type(exc).__name__}: {exc}"[:300]
    return "ok"


@pytest.mark.timeout(240)
def test_seeded_mutations_give_model_input_or_a_preprocess_error() -> None:
    outcomes: Counter[str] = Counter()
    crashes = []
    for case in cases(CI_SEED, CI_CASES):
        outcome = preprocess_outcome(case)
        outcomes[outcome if not outcome.startswith("CRASH") else "CRASH"] += 1
        if outcome.startswith("CRASH"):
            crashes.append(f"case {case.index} ({case.mutator}): {outcome}")
    assert crashes == []
    # The corpus really exercises both sides: images that survive, and errors that are caught.
    assert outcomes["ok"] > 0 and outcomes["PreprocessError"] > 0, outcomes


def _damaged(tag: tuple[int, int], *, vr: bytes | None = None, length: int | None = None,
             syntax: str = str(ExplicitVRLittleEndian)) -> Case:
    """A base instance with one element's VR and/or declared length rewritten in place."""
    import random

    ds = base_dataset(random.Random(7), syntax)
    data = bytearray(_encode_dataset(ds, syntax))
    (element,) = [e for e in walk_explicit(bytes(data)) if e.tag == tag and e.depth == 0]
    if vr is not None:
        data[element.start + 4: element.start + 6] = vr
    if length is not None:
        struct.pack_into("<H", data, element.length_offset, length)
    return Case(0, "regression", syntax, str(ds.SOPClassUID), str(ds.SOPInstanceUID), bytes(data))


def test_regression_odd_length_rows_is_a_preprocess_error() -> None:
    """Found by the fuzzer: Rows (US) declared 3 bytes long raised pydicom's BytesLengthException from
    ``require_attributes`` instead of a PreprocessError."""
    case = _damaged((0x0028, 0x0010), length=3)
    assert preprocess_outcome(case) == "PreprocessError"


def test_regression_rows_read_as_text_in_jpeg2000_is_a_preprocess_error() -> None:
    """Found by the fuzzer: Rows' VR swapped to SH reads as the text '@'; the JPEG 2000 reduced-decode check
    then raised ValueError from ``int(ds.Rows)``."""
    case = _damaged((0x0028, 0x0010), vr=b"SH", syntax=str(JPEG2000Lossless))
    assert preprocess_outcome(case) == "PreprocessError"


def test_regression_imager_pixel_spacing_with_an_unknown_vr_is_ignored() -> None:
    """Found by the 10,000-case run (seed 1, cases 5579 and 5912): byte noise in the VR of Imager Pixel
    Spacing made pydicom raise NotImplementedError (unknown VR) when preprocessing read the spacing. The
    spacing is optional, so the image is preprocessed without it."""
    case = _damaged((0x0018, 0x1164), vr=b"D\x0e")
    assert preprocess_outcome(case) == "ok"
