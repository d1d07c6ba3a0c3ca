"""Issue #15's "Done when", through the real pipeline and a real viewer: a phantom knee study stored into Orthanc,
pushed by Orthanc to a running node (C-STORE), the node's SR and SCs back at Orthanc (C-STORE), OHIF v3 in Chromium
on that Orthanc's DICOMweb opening the node's SR (region on the right image, its values, no error); then a late
instance pushed the same way, and OHIF, reloaded, showing the newer revision's SR.

Reuses the viewer fixtures (``viewer``, ``browser``, ``artefacts``; ``orthanc`` is overridden here by a PACS with a
DICOM server), the viewer session of test_ohif_viewer.py and the node configuration of the pipeline end-to-end
tests. Screenshots are kept under pytest's temporary directory (the paths are printed).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.helpers.models import tiny_model
from tests.helpers.node import NodeProcess, Peer, free_port, wait_for
from tests.helpers.orthanc import ORTHANC_AE
from tests.pipeline.test_orthanc_end_to_end import DEMO_MODEL, PipelineConfig, phantom_study, results_at
from tests.viewer.ohif import DicomWebPacs, ViewerServer
from tests.viewer.test_ohif_viewer import Session

pytestmark = [pytest.mark.orthanc, pytest.mark.slow, pytest.mark.timeout(900)]

REPORT_THUMBNAIL = re.compile(r"AI \w+ findings")  # the SR series' description (the priority varies)
TRACKING_IDENTIFIER, TRACKING_UID = "112039", "112040"


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, node_port: int) -> Iterator[DicomWebPacs]:
    """The PACS: Orthanc with a DICOM server that pushes to the node, and the DICOMweb plugin OHIF reads."""
    pacs = DicomWebPacs(tmp_path_factory.mktemp("pacs"), {"msknode": ("MSKNODE", "127.0.0.1", node_port)})
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


@pytest.fixture()
def node(orthanc: DicomWebPacs, node_port: int, tmp_path: Path) -> Iterator[NodeProcess]:
    config = PipelineConfig(directory=tmp_path / "node", port=node_port,
                            peers=(Peer("pacs", ORTHANC_AE, port=orthanc.dicom_port, receives_results=True),),
                            roles=("receiver", "scheduler", "worker", "sender"))
    if not (DEMO_MODEL / "config.json").exists():
        config.model = tiny_model(tmp_path / "tiny-model")
    process = NodeProcess(config).start(timeout=120)
    try:
        yield process
    finally:
        process.stop(timeout=60)


def measurement_groups(report: pydicom.Dataset) -> list[dict[str, Any]]:
    """Every TID 1410 group of the SR as OHIF shows it: tracking identifier and UID, the image its SCOORD is on,
    the number of points, and the NUM lines ("meaning: value unit", two decimals), in order."""
    groups = []

    def walk(items: Any) -> None:
        for item in items:
            children = item.get("ContentSequence", [])
            names = {child.ConceptNameCodeSequence[0].CodeValue: child for child in children
                     if "ConceptNameCodeSequence" in child}
            if item.ValueType == "CONTAINER" and TRACKING_IDENTIFIER in names:
                (scoord,) = [child for child in children if child.ValueType == "SCOORD"]
                groups.append({
                    "name": names[TRACKING_IDENTIFIER].TextValue,
                    "uid": names[TRACKING_UID].UID,
                    "image": scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                    "points": len(scoord.GraphicData) // 2,
                    "labels": [f"{child.ConceptNameCodeSequence[0].CodeMeaning}: "
                               f"{float(child.MeasuredValueSequence[0].NumericValue):.2f} "
                               f"{child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue}"
                               for child in children if child.ValueType == "NUM"],
                })
            else:
                walk(children)

    walk(report.ContentSequence)
    return groups


def reports_at(orthanc: DicomWebPacs, study_id: str) -> list[pydicom.Dataset]:
    """The node's SRs at the PACS, oldest revision first."""
    series, _ = results_at(orthanc, study_id)
    reports = [pydicom.dcmread(io.BytesIO(orthanc.instance_file(i))) for s in series for i in s["Instances"]]
    return sorted(reports, key=lambda report: int(report.InstanceNumber))


def show(session: Session, report: pydicom.Dataset, screenshot: Path) -> dict[str, Any]:
    """Open the study in OHIF, open the SR; clean (no console error or rejection) and showing ``report``."""
    state = session.open_report(str(report.StudyInstanceUID), REPORT_THUMBNAIL)
    session.screenshot(screenshot)
    session.assert_clean(state)
    print(f"OHIF opened revision {report.InstanceNumber} and placed it in {state['seconds']} s")
    shown = [r for r in state["reports"] if r["shown"] == report.SOPInstanceUID]
    assert shown, (report.SOPInstanceUID, state["reports"])
    groups = measurement_groups(report)
    (opened,) = shown
    assert sorted(m["uid"] for m in opened["measurements"]) == sorted(g["uid"] for g in groups)
    assert all(m["loaded"] for m in opened["measurements"])
    annotations = {a["uid"]: a for a in state["annotations"]}
    for group in groups:  # every group placed on its image, with its values
        annotation = annotations[group["uid"]]
        assert f"/instances/{group['image']}/" in annotation["image"], (group, annotation)
        assert annotation["points"] == group["points"]
        assert annotation["labels"] == group["labels"][:len(annotation["labels"])] and annotation["labels"]
    # What is on screen: the image of a group, its outline, and its values as drawn text.
    drawn = "\n".join(state["drawn"])
    visible = [g for g in groups if any(f"/instances/{g['image']}/" in (image or "") for image in state["viewports"])]
    assert visible and state["lines"] > 0
    assert all(g["labels"][0] in drawn for g in visible), (visible, drawn)
    return state


def test_orthanc_study_through_the_node_shows_in_ohif_newest_first(
        orthanc: DicomWebPacs, viewer: ViewerServer, browser: Any, node: NodeProcess, artefacts: Path,
        tmp_path: Path) -> None:
    lytic, plain, fracture = phantom_study(tmp_path / "study", 3, study_key="ohif-e2e")
    study_id = orthanc.upload(lytic)["ParentStudy"]
    orthanc.upload(plain)
    orthanc.store_to("msknode", study_id)
    wait_for(lambda: (lambda r: r if r[0] and r[1] and len(r[1][0]["Instances"]) == 2 else None)(
        results_at(orthanc, study_id)), timeout=240, what="the node's SR and 2 SCs at Orthanc")
    (first,) = reports_at(orthanc, study_id)
    groups = measurement_groups(first)
    lytic_uid = str(pydicom.dcmread(lytic, stop_before_pixels=True).SOPInstanceUID)
    # Each analysed radiograph has its highest-error region; the lesion's is the one to see.
    regions = [g for g in groups if g["image"] == lytic_uid and "region" in g["name"]]
    assert len(regions) == 1, groups

    session = Session(browser, viewer)
    try:
        state = show(session, first, artefacts / "ohif-node-sr-revision-1.png")
        # The region is drawn on the lesion's radiograph, which the SR viewport shows, with its values.
        (region,) = regions
        assert any(f"/instances/{lytic_uid}/" in (image or "") for image in state["viewports"])
        assert region["points"] > 2 and region["labels"][0] in "\n".join(state["drawn"])
    finally:
        session.close()

    # A late instance: Orthanc pushes it, the node builds the next revision, and OHIF (reloaded) shows that one.
    late = orthanc.upload(fracture)
    orthanc.store_to("msknode", late["ID"])
    newer = wait_for(lambda: (lambda r: r[-1] if len(r) >= 2 else None)(reports_at(orthanc, study_id)),
                     timeout=240, what="the newer SR at Orthanc")
    assert int(newer.InstanceNumber) > int(first.InstanceNumber)
    fracture_uid = str(pydicom.dcmread(fracture, stop_before_pixels=True).SOPInstanceUID)
    newer_groups = measurement_groups(newer)
    assert fracture_uid in {g["image"] for g in newer_groups} and len(newer_groups) > len(groups)
    session = Session(browser, viewer)
    try:
        state = show(session, newer, artefacts / "ohif-node-sr-revision-2.png")
        placed = {a["image"].split("/instances/")[1].split("/")[0] for a in state["annotations"]}
        assert fracture_uid in placed  # the newer revision's group for the late image, not the older SR's
        assert not any(r["shown"] == first.SOPInstanceUID for r in state["reports"])
    finally:
        session.close()
