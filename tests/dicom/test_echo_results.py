"""Echo loop (#14 item 1): our own SR and SC (and, configurably, other AI products' results) sent back to the
node are recognised from the header at intake, stored and acknowledged, recorded on the instance row, and
never start a study revision; a study of non-image objects only gets no job.

The header rules live in node/dicom/provenance.py, which may not import node/results: these tests build real
results with node/results and check that the receiver's header reading recognises them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node.dicom.header_checks import read_header
from node.dicom.provenance import ResultRecognition
from node.results.model import StudyResult
from node.results.sc import build_sc
from node.results.sr import build_not_analysed_sr, build_sr
from node.settings import ConfigError, IntakeSettings, parse_settings
from storage import completion
from storage.db import Database
from storage.models import Instance, Job, Study
from storage.queue import JobQueue
from tests.helpers.tools import storescu
from tests.results import sources
from tests.results.helpers import write

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def _phantom(tmp_path: Path, study_key: str) -> tuple[Path, Dataset]:
    from engines.training import phantoms

    path = phantoms.write_dicom(phantoms.generate("knee", seed=5), tmp_path / f"{study_key}-cr.dcm",
                                patient_index=4, study_key=study_key)
    return path, pydicom.dcmread(path, stop_before_pixels=True)


def _our_results(tmp_path: Path, header: Dataset, **model) -> list[Path]:
    """A findings SR, a not-analysed SR and an SC built by node/results for ``header``'s study."""
    header = copy.deepcopy(header)
    image = sources.image_result(header, region=None)
    study = StudyResult(study_instance_uid=str(header.StudyInstanceUID), images=[image], not_analysed=[],
                        priority="ROUTINE", model=sources.model_info(**model), created_at=sources.CREATED_AT)
    skipped = StudyResult(study_instance_uid=str(header.StudyInstanceUID), images=[],
                          not_analysed=[(header, "body part CHEST not musculoskeletal")], priority="ROUTINE",
                          model=study.model, created_at=study.created_at)
    return [
        write(build_sr(study, 9000), tmp_path / "sr.dcm"),
        write(build_not_analysed_sr(skipped, 9000), tmp_path / "sr-na.dcm"),
        write(build_sc(image, study, 9001, 1), tmp_path / "sc.dcm"),
    ]


def _foreign(tmp_path: Path, name: str, sop_class: str, study_uid: str, manufacturer: str,
             description: str) -> Path:
    """A non-image object of another vendor (an SR, a KO, a SEG header without frames)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG" if sop_class == SEGMENTATION else ("KO" if sop_class == KEY_OBJECT else "SR")
    ds.Manufacturer = manufacturer
    ds.SeriesDescription = description
    ds.PatientName = "Other^Vendor"
    ds.PatientID = "PID-9"
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# -- header rules ----------------------------------------------------------------------------------------------
def test_our_results_are_recognised_from_their_headers(tmp_path: Path) -> None:
    path, header = _phantom(tmp_path, "rules")
    rules = ResultRecognition.default()
    assert read_header(path, rules).intake_kind == "image"
    for result in _our_results(tmp_path, header):
        info = read_header(result, rules)
        assert info.intake_kind == "own_result", (result.name, info.intake_reason)
    # A changed [results] manufacturer does not hide results built before the change (IHE AIR equipment item).
    (tmp_path / "renamed").mkdir()
    for result in _our_results(tmp_path / "renamed", header, manufacturer="Hospital AI Lab"):
        assert read_header(result, rules).intake_kind == "own_result"


def test_other_ai_results_are_recognised_when_configured_and_other_objects_are_non_images(tmp_path: Path) -> None:
    study = generate_uid()
    vendor_sr = _foreign(tmp_path, "vendor-sr", COMPREHENSIVE_SR, study, "BoneAI Inc.", "BoneAI fracture report")
    vendor_seg = _foreign(tmp_path, "vendor-seg", SEGMENTATION, study, "Other", "AUTOSEG knee cartilage")
    key_object = _foreign(tmp_path, "ko", KEY_OBJECT, study, "BoneAI Inc.", "Key images")
    default = ResultRecognition.default()
    assert [read_header(p, default).intake_kind for p in (vendor_sr, vendor_seg, key_object)] == ["non_image"] * 3
    listed = ResultRecognition.from_settings(
        IntakeSettings(ai_manufacturers=["boneai inc."], ai_series_descriptions=["AutoSeg"]), "msknode")
    kinds = [read_header(p, listed) for p in (vendor_sr, vendor_seg, key_object)]
    assert [k.intake_kind for k in kinds] == ["ai_result", "ai_result", "non_image"]  # KO: not a result class
    assert "intake.ai_manufacturers" in (kinds[0].intake_reason or "")


def test_intake_settings_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"intake": {"result_sop_classes": ["1.2.840.10008.5.1.4.1.1.7", "SR"],
                                   "ai_manufacturers": [""], "ai_series_descriptions": ["x" * 65]}})
    problems = "\n".join(caught.value.problems)
    assert "intake.result_sop_classes: item 1: 'SR' is not a UID" in problems
    assert "intake.ai_manufacturers: item 0: must not be blank" in problems
    assert "intake.ai_series_descriptions: item 0: at most 64 characters" in problems


# -- the real receiver -----------------------------------------------------------------------------------------
def _tick(url: str) -> None:
    database = Database(url)
    try:
        completion.tick(database, JobQueue(database), lambda _ae: 0, force_complete_seconds=0)
    finally:
        database.dispose()


def test_echoed_results_are_stored_and_acknowledged_but_start_no_revision(node, tmp_path: Path) -> None:
    image, header = _phantom(tmp_path, "echo")
    result = storescu(node.port, [image])
    assert result.returncode == 0, result.stderr
    _tick(node.config.url)
    with node.database() as db, db.session() as session:
        assert session.query(Job).count() == 1
        assert session.scalars(select(Study)).one().revision == 1

    ours = _our_results(tmp_path, header)
    result = storescu(node.port, ours, extra=("-R",))  # the PACS forwards our results back: Success for every one
    assert result.returncode == 0, result.stderr
    echo = node.wait_for_associations_closed()[-1]
    assert echo.outcome == "released" and echo.instance_count == len(ours)  # counted = answered 0x0000
    _tick(node.config.url)
    with node.database() as db, db.session() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        study = session.scalars(select(Study)).one()
        jobs = session.query(Job).count()
    assert len(rows) == 4  # stored as received
    for path in ours:
        row = rows[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
        assert row.intake_kind == "own_result" and row.intake_reason and (node.spool / row.spool_path).exists()
    assert study.revision == 1 and jobs == 1  # no new revision, no new job


def test_study_of_non_image_objects_only_gets_no_job(node, tmp_path: Path) -> None:
    study_uid = generate_uid()
    files = [_foreign(tmp_path, "sr", COMPREHENSIVE_SR, study_uid, "Vendor", "Dictated report"),
             _foreign(tmp_path, "ko", KEY_OBJECT, study_uid, "Vendor", "Key images")]
    result = storescu(node.port, files, extra=("-R",))
    assert result.returncode == 0, result.stderr
    _tick(node.config.url)
    with node.database() as db, db.session() as session:
        kinds = sorted(row.intake_kind for row in session.scalars(select(Instance)))
        study = session.scalars(select(Study)).one()
        jobs = session.query(Job).count()
    assert kinds == ["non_image", "non_image"]
    assert jobs == 0 and study.revision == 0
    assert study.status == "stored" and "no image" in (study.status_reason or "")
