"""The knee MRI results (issue #17) in the real OHIF v3 (npm @ohif/app 3.13.2) on Orthanc's DICOMweb, in Chromium:
the findings SR is placed on the sagittal middle slice with its probabilities, the SEG loads with its 11 named
segments, and neither raises a console error or an unhandled rejection.

(The optional TID 1411 segment-volume groups are left out: OHIF 3.13 throws on a group without SCOORD and then
places none; node/results/mri_sr.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.results.knee_codes import STRUCTURES
from node.results.mri_sr import build_mri_sr
from node.results.seg import build_seg
from tests.results.mri_sources import mri_study
from tests.viewer.ohif import DicomWebOrthanc, ViewerServer
from tests.viewer.test_ohif_viewer import Session, upload

pytestmark = pytest.mark.timeout(600)

SEGMENTATIONS = """() => (window.cornerstoneTools.segmentation.state.getSegmentations() || [])
  .map(s => ({label: s.label, segments: Object.values(s.segments || {}).map(x => x.label)}))"""


def test_ohif_shows_the_knee_mri_sr_and_seg(orthanc: DicomWebOrthanc, viewer: ViewerServer, browser: Any,
                                           artefacts: Path) -> None:
    study = mri_study(study_uid="1.2.826.0.1.3680043.8.498.171")
    seg = build_seg(study, 9002)
    sr = build_mri_sr(study, 9000)
    upload(orthanc, *[ds for plane in study.planes for ds in plane.slices], seg, sr)
    sagittal = study.plane_series("sagittal")
    middle = str(sagittal.slices[len(sagittal.slices) // 2].SOPInstanceUID)

    session = Session(browser, viewer)
    try:
        state = session.open_report(study.study_instance_uid, "knee MRI findings")
        session.screenshot(artefacts / "ohif-mri-sr.png")
        session.assert_clean(state)
        (report,) = state["reports"]
        assert report["shown"] == str(sr.SOPInstanceUID)
        (findings,) = report["measurements"]
        assert findings["loaded"] and findings["image"] == middle and findings["name"] == "Knee MRI findings"
        (annotation,) = state["annotations"]
        assert annotation["labels"][0] == "Probability of anterior cruciate ligament tear: 91.00 %"
        assert len(annotation["labels"]) == 8
    finally:
        session.close()

    session = Session(browser, viewer)
    try:
        page = session.page
        page.goto(f"{viewer.origin}/viewer?StudyInstanceUIDs={study.study_instance_uid}")
        thumbnail = page.get_by_text("knee segmentation").first
        thumbnail.wait_for(timeout=90_000)
        page.wait_for_load_state("networkidle")
        session._dismiss_tour()
        thumbnail.dblclick()
        page.wait_for_function(f"() => ({SEGMENTATIONS})().some(s => s.segments.length > 0)", timeout=90_000)
        page.wait_for_timeout(1500)
        session.screenshot(artefacts / "ohif-mri-seg.png")
        (segmentation,) = page.evaluate(SEGMENTATIONS)
        assert segmentation["label"] == str(seg.SeriesDescription)
        assert segmentation["segments"] == [structure.label for structure in STRUCTURES]
        session.assert_clean({"rejections": page.evaluate("() => window.__rejections")})
    finally:
        session.close()
