"""Eligibility rules: every refusal has a reason."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.pipeline.eligibility import ineligibility_reason
from node.settings import EligibilitySettings

CR = "1.2.840.10008.5.1.4.1.1.1"


def header(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.Modality = "CR"
    ds.SOPClassUID = CR
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BodyPartExamined = "KNEE"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = 10
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_a_knee_cr_is_eligible() -> None:
    assert ineligibility_reason(header(), "pacs", EligibilitySettings()) is None


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"Modality": "MR"}, "modality MR not eligible"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class 1.2.840.10008.5.1.4.1.1.7 not eligible"),
        ({"PhotometricInterpretation": "RGB"}, "photometric interpretation RGB not eligible"),
        ({"BodyPartExamined": "CHEST"}, "body part CHEST not musculoskeletal"),
        ({"ImageType": ["DERIVED", "LOCALIZER"]}, "image type LOCALIZER excluded"),
    ],
)
def test_refusals_name_the_reason(overrides: dict, expected: str) -> None:
    assert ineligibility_reason(header(**overrides), "pacs", EligibilitySettings()) == expected


def test_unknown_body_part_policy() -> None:
    unknown = header(BodyPartExamined=None)
    assert ineligibility_reason(unknown, "pacs", EligibilitySettings()) is None
    assert ineligibility_reason(unknown, "pacs", EligibilitySettings(allow_unknown_body_part=False)) == "body part unknown"


def test_calling_peer_filter() -> None:
    rules = EligibilitySettings(peers=["ortho-pacs"])
    assert ineligibility_reason(header(), "ortho-pacs", rules) is None
    assert "not configured for analysis" in ineligibility_reason(header(), "er-pacs", rules)
