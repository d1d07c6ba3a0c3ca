"""Knee MRI through the worker (issue #17): a phantom study (localiser, sagittal / coronal PD FS, axial T2 FS,
sagittal T1; 16 slices of 64 x 64) with a tiny random OrthoDiffusion model configured gives exactly one findings
SR, one overlay SC series and one SEG, dciodvfy-clean; the localiser and the T1 are not chosen and the stored
selection says why; a study missing a plane is not analysed, with the reason; a retry builds the same bytes; an
MR study without a 3-D model configured stays as before (stored, not analysed, with the reason); our SEG sent
back is recognised as our own result. Real parts: the model, pydicom/highdicom, dciodvfy, SQLite."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.settings import parse_settings
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.models import ImageResultRow, Instance, Job, OutboxItem, Series, Study
from storage.spool import Spool
from tests.helpers.models import tiny_model, tiny_orthodiffusion
from tests.helpers.tools import require_tool

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def mri_model(tmp_path_factory):
    import engines
    from node.pipeline.models import ConfiguredModel

    folder = tiny_orthodiffusion(tmp_path_factory.mktemp("models") / "od-tiny")
    settings = settings_for(folder)
    return folder, [ConfiguredModel(entry, engines.load(entry.path, backend="cpu"))
                    for entry in settings.model_entries]


def settings_for(folder: Path, **extra):
    return parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "models": [{"name": "knee_mri", "path": str(folder), "modalities": ["MR"]}],
        # every probability is >= 0: the rule always fires, so the MRI values reach triage by these names
        "triage": {"rules": [{"name": "ACL probability", "when": "knee_mri.knee_ACL >= 0", "priority": "urgent"}]},
        **extra,
    })


class Node:
    """A database, a spool and a worker in this process; instances indexed as the receiver would."""

    def __init__(self, tmp_path: Path, settings, models, database: Database | None = None) -> None:
        from node.pipeline.worker import Worker
        from storage.job_inputs import JobInputs
        from storage.migrate import upgrade
        from storage.queue import JobQueue

        if database is None:
            url = f"sqlite:///{tmp_path}/mri.db"
            upgrade(url)
            database = Database(url)
        self.database = database
        self.spool = Spool(tmp_path / "spool", fsync=False)
        self.queue = JobQueue(self.database)
        self.worker = Worker(settings, self.queue, JobInputs(self.database), self.spool, models, owner="w")
        self.index = IntakeRepository(self.database)
        self.association = self.index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
        self.staging = tmp_path / "staging"
        self.staging.mkdir()

    def store(self, datasets) -> None:
        for ds in datasets:
            path = self.staging / "in.dcm"
            ds.save_as(path, enforce_file_format=True)
            staged = self.spool.incoming / "rx.dcm"
            shutil.copyfile(path, staged)
            stored = self.spool.commit_file(staged, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            self.index.index_instance(InstanceRecord(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
                ds.file_meta.TransferSyntaxUID, None, None, ds.Modality, ds.get("BodyPartExamined"),
                int(ds.SeriesNumber), int(ds.InstanceNumber), stored.relative_path, stored.size, stored.sha256,
                "PACS", self.association))

    def run(self) -> int:
        from storage import completion
        from storage.queue import JobQueue

        completion.tick(self.database, JobQueue(self.database), lambda _ae: 0, force_complete_seconds=0)
        return self.worker.run_once()

    def outbox(self) -> list[OutboxItem]:
        with self.database.session() as session:
            return list(session.scalars(select(OutboxItem).order_by(OutboxItem.id)).all())


def phantom(protocol_names: tuple[str, ...] | None = None, seed: int = 1):
    from engines.training.knee_mri_phantoms import default_protocol, generate_study

    protocol = default_protocol(64, 16)
    if protocol_names is not None:
        protocol = [spec for spec in protocol if spec.name in protocol_names]
    return generate_study(seed=seed, protocol=protocol)


def all_datasets(study) -> list[pydicom.Dataset]:
    return [ds for series in study.series for ds in series.datasets]


def dciodvfy_errors(path: Path) -> list[str]:
    report = subprocess.run([require_tool("dciodvfy"), "-new", str(path)], capture_output=True, text=True)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


def test_phantom_study_gives_one_sr_one_sc_series_and_one_seg(tmp_path: Path, mri_model) -> None:
    from storage.studies import studies_summary

    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder), models)
    study = phantom()
    node.store(all_datasets(study))
    assert node.run() == 1

    with node.database.session() as session:
        job = session.scalar(select(Job))
        stored_study = session.scalar(select(Study))
        rows = session.execute(select(ImageResultRow, Series.series_instance_uid)
                               .join(Instance, Instance.id == ImageResultRow.instance_id)
                               .join(Series, Series.id == Instance.series_id)).all()
    assert (job.state, stored_study.status) == ("done", "done")
    assert (stored_study.priority, stored_study.priority_reason) == (2, "ACL probability")
    outbox = node.outbox()
    kinds = sorted(item.kind for item in outbox)
    assert kinds.count("SR") == 1 and kinds.count("SEG") == 1 and kinds.count("SC") >= 3
    objects = {item.kind: pydicom.dcmread(node.spool.absolute(item.path)) for item in outbox}
    assert objects["SEG"].SOPClassUID == SEG_CLASS and objects["SR"].SOPClassUID == SR_3D_CLASS
    assert all(ds.SeriesDescription.startswith("AI URGENT") for ds in objects.values())
    assert {item.sop_class_uid for item in outbox} == {SEG_CLASS, SC_CLASS, SR_3D_CLASS}
    sc_series = {pydicom.dcmread(node.spool.absolute(item.path), stop_before_pixels=True).SeriesInstanceUID
                 for item in outbox if item.kind == "SC"}
    assert len(sc_series) == 1
    for item in outbox:
        dataset = pydicom.dcmread(node.spool.absolute(item.path), stop_before_pixels=True)
        assert dataset.StudyInstanceUID == study.study_instance_uid
        assert dciodvfy_errors(node.spool.absolute(item.path)) == [], item.kind

    sagittal = study.by_name("sag_pd_fs")
    seg = objects["SEG"]
    referenced = {str(ref.ReferencedSOPInstanceUID)
                  for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sagittal.series_instance_uid
    assert referenced <= {str(ds.SOPInstanceUID) for ds in sagittal.datasets}
    assert [s.SegmentLabel for s in seg.SegmentSequence][:3] == ["Femur", "Tibia", "Patella"]

    chosen = {study.by_name(name).series_instance_uid for name in ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")}
    states = {(series_uid in chosen, row.state) for row, series_uid in rows}
    assert states == {(True, "analysed"), (False, "ineligible")}
    analysed = [row for row, series_uid in rows if row.state == "analysed"]
    assert len(analysed) == 48 and {row.outputs["plane"] for row in analysed} == {"sagittal", "coronal", "axial"}
    assert len(analysed[0].outputs["heads"]["knee"]) == 8

    summary = studies_summary(node.database)[0]
    selection = summary["series_selection"]
    assert {plane: item["series_instance_uid"] for plane, item in selection["chosen"].items()} == {
        "sagittal": study.by_name("sag_pd_fs").series_instance_uid,
        "coronal": study.by_name("cor_pd_fs").series_instance_uid,
        "axial": study.by_name("ax_t2_fs").series_instance_uid}
    rejected = {item["series_instance_uid"]: item["reasons"] for item in selection["rejected"]}
    localiser, t1 = study.by_name("localizer").series_instance_uid, study.by_name("sag_t1").series_instance_uid
    assert set(rejected) == {localiser, t1}
    assert any(reason["code"] == "image-type" and "LOCALIZER" in reason["message"] for reason in rejected[localiser])
    assert rejected[t1] and rejected[t1][0]["message"], rejected[t1]
    dashboard_shows_the_selection_and_the_overlays(tmp_path, node, stored_study.id, folder)
    node.database.dispose()


def dashboard_shows_the_selection_and_the_overlays(tmp_path: Path, node: Node, study_id: int, folder: Path) -> None:
    """The study page's "Series selection" table (chosen per plane, the others with their reasons) and the overlay
    SCs as thumbnails, addressed by database id and index only."""
    import re

    from starlette.testclient import TestClient

    from node.web import create_app
    from node.web.accounts import Accounts

    settings = parse_settings({"web": {"secret_key_file": str(tmp_path / "web-secret")},
                               "storage": {"spool_dir": str(node.spool.root)},
                               "models": [{"name": "knee_mri", "path": str(folder), "modalities": ["MR"]}]},
                              resolve_hosts=False)
    Accounts(node.database).add_user("victor", "correct horse battery", "viewer")
    browser = TestClient(create_app(settings, node.database, node.spool), base_url="http://127.0.0.1:8080",
                         follow_redirects=False)
    token = re.search(r'name="login_token" value="([^"]+)"', browser.get("/login").text).group(1)
    assert browser.post("/login", data={"login_token": token, "username": "victor",
                                        "password": "correct horse battery"}).status_code == 303
    page = browser.get(f"/studies/{study_id}").text
    table = page[page.index("<h2>Series selection</h2>"):page.index("<h2>Overlays</h2>")]
    assert "<h2>Images</h2>" not in page  # an MR study's page shows its overlays, not one figure per slice
    assert re.search(r"67 instances: 48 analysed \(the chosen series\),\s+19 not used", page)
    for description in ("SAG PD FS TSE", "COR PD FS TSE", "AX T2 FS TSE"):
        assert re.search(description + r".*?<strong>chosen</strong>", table, re.S), description
    assert re.search(r"3-PLANE LOC.*?not used — Image Type LOCALIZER", table, re.S)
    # Every label of the 3-D model's finding head, with its probability and call, not only the most probable one.
    findings = page[page.index("<h2>Findings</h2>"):page.index("<h2>Overlays</h2>")]
    row = r"<td>([^<]+)</td><td>([^<]+)</td><td>([\d.]+)%</td>\s*<td>(?:<strong>)?(present|absent)"
    rows = re.findall(row, findings)
    assert sorted(label for _, label, _, _ in rows) == sorted(["ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU"])
    assert all((float(p) >= 50) == (call == "present") for _, _, p, call in rows)
    assert re.search(r"SAG T1 TSE.*?not used — ", table, re.S)
    thumbnails = re.findall(r'src="(/studies/\d+/images/\d+\.png)"', page)
    assert thumbnails, "no overlay thumbnail on the study page"
    image = browser.get(thumbnails[0])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    listing = browser.get("/")
    assert listing.status_code == 200 and f"/studies/{study_id}" in listing.text


def test_retry_builds_byte_identical_objects(tmp_path: Path, mri_model) -> None:
    """The objects depend on the study, the inputs and the model only: a job run again (a worker killed before it
    recorded its results) writes the same bytes under the same UIDs, so the outbox never holds a second series."""
    from storage.job_inputs import JobInputs
    from storage.queue import ClaimedJob

    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder), models)
    study = phantom(("sag_pd_fs", "cor_pd_fs", "ax_t2_fs"), seed=2)
    node.store(all_datasets(study))
    assert node.run() == 1
    first = {item.sop_instance_uid: node.spool.absolute(item.path).read_bytes() for item in node.outbox()}
    with node.database.session() as session:
        job = session.scalar(select(Job))
        claimed = ClaimedJob(job.id, job.study_id, study.study_instance_uid, job.study_revision, job.priority, 2)
    inputs = JobInputs(node.database).inputs(study.study_instance_uid)
    again = node.worker.mri._analyse(claimed, inputs)
    rebuilt = {str(ds.SOPInstanceUID): ds for _, ds in again.objects}
    assert set(rebuilt) == set(first)
    from node.pipeline.mri import _dataset_bytes

    for uid, dataset in rebuilt.items():
        assert _dataset_bytes(getattr(dataset, "__wrapped__", dataset)) == first[uid]
    assert again.selection.to_dict() == job.series_selection  # the retry stores the same report
    node.database.dispose()


def test_study_missing_a_plane_is_not_analysed_with_the_reason(tmp_path: Path, mri_model, db: Database) -> None:
    """Also the selection's storage (migration 0005) on SQLite and PostgreSQL."""
    from storage.studies import studies_summary

    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder), models, db)
    study = phantom(("localizer", "sag_pd_fs", "ax_t2_fs"), seed=3)
    node.store(all_datasets(study))
    assert node.run() == 1
    with node.database.session() as session:
        job = session.scalar(select(Job))
        stored = session.scalar(select(Study))
        rows = session.scalars(select(ImageResultRow)).all()
    assert (job.state, stored.status) == ("not_analysed", "not_analysed")
    assert stored.status_reason.startswith("no coronal series"), stored.status_reason
    assert node.outbox() == []
    assert {row.state for row in rows} == {"ineligible"} and len(rows) == 3 + 16 + 16
    selection = studies_summary(node.database)[0]["series_selection"]
    assert set(selection["chosen"]) == {"sagittal", "axial"} and "coronal" in selection["missing_planes"]


def test_broken_series_is_not_analysed_and_not_retried(tmp_path: Path, mri_model) -> None:
    """A chosen series that cannot be assembled (a slice's pixel data cut short) ends the study as not analysed
    with the reason; the job is finished, not handed back for ever."""
    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder), models)
    study = phantom(("sag_pd_fs", "cor_pd_fs", "ax_t2_fs"), seed=4)
    datasets = all_datasets(study)
    broken = study.by_name("cor_pd_fs").datasets[5]
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
    node.store(datasets)
    assert node.run() == 1
    with node.database.session() as session:
        job = session.scalar(select(Job))
    assert job.state == "not_analysed" and job.attempts == 1
    with node.database.session() as session:
        reason = session.scalar(select(Study.status_reason))
    assert reason.startswith("coronal series 3 is not one clean volume"), reason
    node.database.dispose()


def test_mr_study_without_a_3d_model_stays_not_analysed(tmp_path: Path) -> None:
    import engines
    from node.pipeline.models import ConfiguredModel

    settings = parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "engine": {"model": str(tiny_model(tmp_path / "mae", width=32, layers=1))},
    })
    models = [ConfiguredModel(entry, engines.load(entry.path, backend="cpu")) for entry in settings.model_entries]
    node = Node(tmp_path, settings, models)
    assert node.worker.mri is None
    node.store(all_datasets(phantom(("sag_pd_fs",), seed=5)))
    assert node.run() == 1
    with node.database.session() as session:
        stored = session.scalar(select(Study))
        job = session.scalar(select(Job))
    assert stored.status == "not_analysed" and "modality MR not eligible" in stored.status_reason
    assert job.series_selection is None and node.outbox() == []
    node.database.dispose()


def test_our_seg_sent_back_is_recognised_as_our_own_result(tmp_path: Path, mri_model) -> None:
    from node.dicom.provenance import OWN_RESULT, ResultRecognition, classify

    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder), models)
    node.store(all_datasets(phantom(("sag_pd_fs", "cor_pd_fs", "ax_t2_fs"), seed=6)))
    assert node.run() == 1
    for item in node.outbox():
        header = pydicom.dcmread(node.spool.absolute(item.path), stop_before_pixels=True)
        assert classify(header, True, ResultRecognition.default())[0] == OWN_RESULT, item.kind
    node.database.dispose()


def test_config_check_knows_the_3d_model_heads(mri_model) -> None:
    from node.cli.node_commands import _check_triage_names
    from node.settings import ConfigError

    folder, _models = mri_model
    _check_triage_names(settings_for(folder), "t.toml")  # knee_mri.knee_ACL: read from orthodiffusion.json
    bad = settings_for(folder, triage={"rules": [{"name": "x", "when": "knee_mri.knee_XYZ > 0.5", "priority": "high"}]})
    with pytest.raises(ConfigError) as caught:
        _check_triage_names(bad, "t.toml")
    assert "knee_mri.knee_XYZ" in caught.value.problems[0]


def test_study_over_the_instance_bound_is_not_analysed_without_reading_it(tmp_path: Path, mri_model) -> None:
    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder, pipeline={"max_instances_per_job": 20}), models)
    node.store(all_datasets(phantom(("sag_pd_fs", "cor_pd_fs"), seed=7)))
    assert node.run() == 1
    with node.database.session() as session:
        stored = session.scalar(select(Study))
        job = session.scalar(select(Job))
    assert stored.status == "not_analysed" and "max_instances_per_job" in stored.status_reason
    assert job.series_selection is None and node.outbox() == []
    node.database.dispose()


def test_mr_study_gets_a_watchdog_group_of_its_own(tmp_path: Path, mri_model) -> None:
    """Claimed together, an MR study and a radiograph study are processed in separate groups, each under its own
    job timeout (a 3-D pass takes about a minute on a CPU); both end done."""
    import engines
    from engines.training import phantoms
    from node.pipeline.models import ConfiguredModel

    folder, models = mri_model
    mae = tiny_model(tmp_path / "mae", width=32, layers=1)
    settings = parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "models": [{"name": "mae", "path": str(mae), "modalities": ["CR", "DX"]},
                   {"name": "knee_mri", "path": str(folder), "modalities": ["MR"]}],
    })
    loaded = [ConfiguredModel(settings.model_entries[0], engines.load(mae, backend="cpu")),
              ConfiguredModel(settings.model_entries[1], models[0].model)]
    node = Node(tmp_path, settings, loaded)
    groups = []
    original = node.worker._process_with_watchdog
    node.worker._process_with_watchdog = lambda jobs: (groups.append(len(jobs)), original(jobs))[1]
    node.store(all_datasets(phantom(("sag_pd_fs", "cor_pd_fs", "ax_t2_fs"), seed=8)))
    radiograph = phantoms.to_dataset(phantoms.generate("knee", seed=5), patient_index=2, study_key="cr",
                                     instance_number=1)
    node.store([radiograph])
    assert node.run() == 2
    assert sorted(groups) == [1, 1]
    with node.database.session() as session:
        assert sorted(session.scalars(select(Study.status)).all()) == ["done", "done"]
    assert sorted(item.kind for item in node.outbox() if item.kind != "SC") == ["SEG", "SR", "SR"]
    node.database.dispose()


def test_not_analysed_mr_study_gets_a_short_sr_when_asked(tmp_path: Path, mri_model) -> None:
    """``[results] report_not_analysed``: an MR study that cannot be analysed gets the not-analysed SR (every MR
    instance with its reason), dciodvfy-clean, and nothing else."""
    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder, results={"report_not_analysed": True}), models)
    node.store(all_datasets(phantom(("sag_pd_fs", "ax_t2_fs"), seed=9)))
    assert node.run() == 1
    outbox = node.outbox()
    assert [item.kind for item in outbox] == ["SR"]
    report = pydicom.dcmread(node.spool.absolute(outbox[0].path))
    assert report.SeriesDescription.startswith("AI NOT ANALYSED")
    assert dciodvfy_errors(node.spool.absolute(outbox[0].path)) == []
    node.database.dispose()


def test_enhanced_mr_study_is_analysed_with_frame_references(tmp_path: Path, mri_model) -> None:
    """An Enhanced MR study (one multi-frame instance per series) is analysed like a classic one: the SEG's frames,
    the SR's image library and findings region, and each overlay SC reference (instance, frame number) of the
    chosen series; every object dciodvfy-clean."""
    from engines.training.knee_mri_phantoms import default_protocol, generate_study

    folder, models = mri_model
    node = Node(tmp_path, settings_for(folder), models)
    protocol = [spec for spec in default_protocol(64, 16, enhanced=True) if spec.name != "sag_t1"]
    study = generate_study(seed=11, protocol=protocol)
    node.store(all_datasets(study))
    assert node.run() == 1
    with node.database.session() as session:
        job = session.scalar(select(Job))
        states = sorted(session.scalars(select(ImageResultRow.state)).all())
    assert job.state == "done"
    assert states == ["analysed"] * 3 + ["ineligible"] * 3  # the localiser's three slices are not used
    outbox = node.outbox()
    kinds = sorted(item.kind for item in outbox)
    assert kinds.count("SR") == 1 and kinds.count("SEG") == 1 and kinds.count("SC") >= 3
    for item in outbox:
        assert dciodvfy_errors(node.spool.absolute(item.path)) == [], item.kind

    enhanced = {series.spec.name: series.datasets[0] for series in study.series if series.spec.enhanced}
    assert all(int(ds.NumberOfFrames) == 16 for ds in enhanced.values())
    frames_of = {str(ds.SOPInstanceUID): set(range(1, 17)) for ds in enhanced.values()}
    objects = [pydicom.dcmread(node.spool.absolute(item.path)) for item in outbox]
    seg = next(ds for ds in objects if ds.SOPClassUID == SEG_CLASS)
    sagittal = str(enhanced["sag_pd_fs"].SOPInstanceUID)
    derived = [(str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedFrameNumber))
               for frame in seg.PerFrameFunctionalGroupsSequence
               for ref in frame.DerivationImageSequence[0].SourceImageSequence]
    assert derived and {sop for sop, _ in derived} == {sagittal}
    assert {number for _, number in derived} <= frames_of[sagittal]
    # Each SEG frame sits where its source frame is (same plane position).
    source_positions = [tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                        for f in enhanced["sag_pd_fs"].PerFrameFunctionalGroupsSequence]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        number = int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        position = tuple(float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        assert position == pytest.approx(source_positions[number - 1])
    for sc in (ds for ds in objects if ds.SOPClassUID == SC_CLASS):
        reference = sc.SourceImageSequence[0]
        assert int(reference.ReferencedFrameNumber) in frames_of[str(reference.ReferencedSOPInstanceUID)]
    sr = next(ds for ds in objects if ds.SOPClassUID == SR_3D_CLASS)
    library = [(str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedFrameNumber))
               for item in sr.ContentSequence if item.ValueType == "CONTAINER"
               for group in item.get("ContentSequence", []) if group.ValueType == "CONTAINER"
               for entry in group.get("ContentSequence", []) if entry.ValueType == "IMAGE"
               for ref in entry.ReferencedSOPSequence]
    assert len(library) == 48 and {sop for sop, _ in library} == {
        str(enhanced[name].SOPInstanceUID) for name in ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")}
    assert all(frame in frames_of[sop] for sop, frame in library)
    node.database.dispose()


def test_study_mixing_mr_and_radiographs_analyses_both(tmp_path: Path, mri_model) -> None:
    """A study holding MR series and a knee radiograph: the radiograph goes to the 2-D model, the MR series to the
    3-D model, both recorded in one job (one study revision): the radiograph SR (+ its SC) at series_number_base,
    the MR SR and overlay SCs at +3 / +4, the SEG at +2, so no two result series share a number or a UID; the
    selection is stored; every object dciodvfy-clean."""
    import engines
    from engines.training import phantoms
    from node.pipeline.models import ConfiguredModel
    from storage.studies import studies_summary

    folder, models = mri_model
    mae = tiny_model(tmp_path / "mae", width=32, layers=1)
    settings = parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "models": [{"name": "mae", "path": str(mae), "modalities": ["CR", "DX"]},
                   {"name": "knee_mri", "path": str(folder), "modalities": ["MR"]}],
        "eligibility": {"body_parts": ["KNEE"]},
    })
    loaded = [ConfiguredModel(settings.model_entries[0], engines.load(mae, backend="cpu")),
              ConfiguredModel(settings.model_entries[1], models[0].model)]
    node = Node(tmp_path, settings, loaded)
    study = phantom(("sag_pd_fs", "cor_pd_fs", "ax_t2_fs", "sag_t1"), seed=12)
    radiograph = phantoms.to_dataset(phantoms.generate("knee", seed=5), patient_index=2, study_key="mixed",
                                     instance_number=1)
    mr_header = study.series[0].datasets[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyDate", "StudyTime", "StudyID"):
        if keyword in mr_header:
            setattr(radiograph, keyword, mr_header[keyword].value)
    node.store(all_datasets(study) + [radiograph])
    assert node.run() == 1

    with node.database.session() as session:
        jobs = session.scalars(select(Job)).all()
        stored = session.scalar(select(Study))
        rows = session.execute(select(ImageResultRow, Instance.sop_instance_uid)
                               .join(Instance, Instance.id == ImageResultRow.instance_id)).all()
    assert len(jobs) == 1 and (jobs[0].state, stored.status) == ("done", "done")
    by_sop = {sop: row for row, sop in rows}
    assert by_sop[str(radiograph.SOPInstanceUID)].state == "analysed"
    assert "mae" in by_sop[str(radiograph.SOPInstanceUID)].outputs["models"]
    chosen = {study.by_name(name).series_instance_uid for name in ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")}
    for series in study.series:
        states = {by_sop[str(ds.SOPInstanceUID)].state for ds in series.datasets}
        assert states == ({"analysed"} if series.series_instance_uid in chosen else {"ineligible"}), series.spec.name
    assert len(rows) == 1 + 4 * 16  # one outcome per instance: nothing analysed twice
    assert set(studies_summary(node.database)[0]["series_selection"]["chosen"]) == {"sagittal", "coronal", "axial"}

    objects = [(item.kind, pydicom.dcmread(node.spool.absolute(item.path))) for item in node.outbox()]
    numbers: dict[str, set[str]] = {}
    for kind, ds in objects:
        numbers.setdefault(str(ds.SeriesInstanceUID), set()).add(f"{kind}:{int(ds.SeriesNumber)}")
        assert ds.StudyInstanceUID == study.study_instance_uid
    series_numbers = {int(next(iter(v)).split(":")[1]) for v in numbers.values()}
    assert all(len(v) == 1 for v in numbers.values()) and len(series_numbers) == len(numbers)
    srs = {int(ds.SeriesNumber): ds for kind, ds in objects if kind == "SR"}
    assert set(srs) == {9000, 9003}
    def evidence_series(sr) -> set[str]:
        return {str(series.SeriesInstanceUID) for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence}

    assert evidence_series(srs[9000]) == {str(radiograph.SeriesInstanceUID)}  # the radiograph SR: the radiograph
    assert evidence_series(srs[9003]) == chosen  # the MR SR: the chosen MR series
    assert {int(ds.SeriesNumber) for kind, ds in objects if kind == "SEG"} == {9002}
    sc_numbers = {int(ds.SeriesNumber) for kind, ds in objects if kind == "SC"}
    assert 9004 in sc_numbers and sc_numbers <= {9001, 9004}  # the MR overlays apart from any radiograph SC
    assert len({str(ds.SOPInstanceUID) for _, ds in objects}) == len(objects)
    for item in node.outbox():
        assert dciodvfy_errors(node.spool.absolute(item.path)) == [], item.kind

    # A second radiograph arrives: a new revision analyses the study again, and each of its two SRs names both SRs
    # of the first as the documents it supersedes (as every new SR names all earlier ones of the study).
    first_srs = {str(ds.SOPInstanceUID) for ds in srs.values()}
    second = phantoms.to_dataset(phantoms.generate("knee", seed=6), patient_index=2, study_key="mixed",
                                 instance_number=2)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyDate", "StudyTime", "StudyID", "SeriesInstanceUID"):
        source = radiograph if keyword == "SeriesInstanceUID" else mr_header
        if keyword in source:
            setattr(second, keyword, source[keyword].value)
    node.store([second])
    assert node.run() == 1
    with node.database.session() as session:
        latest = session.scalars(select(Job).order_by(Job.id.desc())).first()
    assert latest.id != jobs[0].id and latest.study_revision > jobs[0].study_revision and latest.state == "done"
    new_srs = [pydicom.dcmread(node.spool.absolute(item.path)) for item in node.outbox()
               if item.kind == "SR" and item.job_id == latest.id]
    assert sorted(int(ds.SeriesNumber) for ds in new_srs) == [9000, 9003]
    for sr in new_srs:
        predecessors = {str(instance.ReferencedSOPInstanceUID) for study_item in sr.PredecessorDocumentsSequence
                        for series in study_item.ReferencedSeriesSequence
                        for instance in series.ReferencedSOPSequence}
        assert predecessors == first_srs, int(sr.SeriesNumber)
    node.database.dispose()
