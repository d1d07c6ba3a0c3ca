"""A region-guided classifier in the node (issue #16): ``[[models]]`` names it and the error-map model whose
regions it crops (``regions_from``). The worker runs the MAE first, then the classifier on the whole image plus
crops around the MAE's highest-error regions of the same frame; the image's stored outputs and the SR group
(its own algorithm identification, findings as qualitative evaluations) carry exactly what the engine computes
from that map; dciodvfy finds no error. Bad ``regions_from`` values are refused naming the key."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.settings import ConfigError, parse_settings
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.models import ImageResultRow, Instance, OutboxItem, Study
from storage.spool import Spool
from tests.engines.test_vit_classifier import brightness_classifier
from tests.helpers.models import tiny_model
from tests.helpers.tools import require_tool
from tests.pipeline.test_several_models import _groups, tiny_dinov3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return tiny_model(base / "mae-tiny", width=32, layers=1), brightness_classifier(base / "tumour-toy")


def settings_for(mae: Path, classifier: Path, **entry):
    return parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "engine": {"batch_size": 4, "passes": 2},
        "models": [{"name": "mae", "path": str(mae)},
                   {"name": "tumour", "path": str(classifier), "regions_from": "mae", "max_regions": 2, **entry}],
        "triage": {"rules": [{"name": "tumour", "when": "tumour.bone_tumour > 0.5", "priority": "urgent"}]},
    })


def _store(tmp_path: Path, spool: Spool, index: IntakeRepository, association, ds) -> None:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    staged = spool.incoming / "rx.dcm"
    shutil.copyfile(path, staged)
    stored = spool.commit_file(staged, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    index.index_instance(InstanceRecord(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID,
        None, None, ds.Modality, ds.BodyPartExamined, None, None, stored.relative_path, stored.size, stored.sha256,
        "PACS", association))


def _evaluations(sr: pydicom.Dataset) -> dict[str, str]:
    """Qualitative evaluations (CODE items) anywhere in the tree: concept meaning -> value meaning."""
    found: dict[str, str] = {}

    def walk(items):
        for item in items:
            if item.ValueType == "CODE":
                found[item.ConceptNameCodeSequence[0].CodeMeaning] = item.ConceptCodeSequence[0].CodeMeaning
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_classifier_crops_the_mae_regions_and_reports_in_the_sr(tmp_path: Path, folders) -> None:
    import engines
    from engines.training import phantoms
    from node.pipeline.models import ConfiguredModel, preprocess_options
    from node.pipeline.worker import Worker
    from storage import completion
    from storage.job_inputs import JobInputs
    from storage.migrate import upgrade
    from storage.queue import JobQueue

    mae_folder, classifier_folder = folders
    settings = settings_for(mae_folder, classifier_folder)
    loaded = [ConfiguredModel(entry, engines.load(entry.path, backend="cpu")) for entry in settings.model_entries]
    assert [cm.model.family for cm in loaded] == ["mae", "vit-classifier"]
    url = f"sqlite:///{tmp_path}/m.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    worker = Worker(settings, JobQueue(database), JobInputs(database), spool, loaded, owner="w")
    index = IntakeRepository(database)
    association = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    knee = phantoms.to_dataset(phantoms.generate("knee", seed=5, findings=["sclerotic"]), patient_index=1,
                               study_key="rg", instance_number=1)
    other = phantoms.to_dataset(phantoms.generate("knee", seed=9), patient_index=1, study_key="rg", instance_number=2)
    for ds in (knee, other):  # one batch of two frames: the classifier's crops of both go in one pass
        _store(tmp_path, spool, index, association, ds)
    completion.tick(database, JobQueue(database), lambda _ae: 0, force_complete_seconds=0)
    assert worker.run_once() == 1

    with database.session() as session:
        study = session.scalar(select(Study))
        rows = session.scalars(select(ImageResultRow)).all()
        outbox = session.scalars(select(OutboxItem)).all()
        uids = {row.id: session.get(Instance, row.instance_id).sop_instance_uid for row in rows}
    assert study.status == "done" and len(rows) == 2
    assert sorted(item.kind for item in outbox) == ["SC", "SC", "SR"]  # the classifier has no error map to show

    # The same values straight from the engines, per image: the MAE's seeded map of the frame, then the classifier.
    mae, classifier = loaded[0].model, loaded[1].model
    positive = False
    for row in rows:
        reported = row.outputs["models"]["tumour"]
        assert list(reported["heads"]) == ["bone_tumour", "malignancy", "abnormal", "implant", "tumour_class",
                                           "fracture_type", "site"]
        stored = next(p for p in spool.root.rglob("*.dcm") if uids[row.id] in p.name)
        prepared = engines.preprocess(pydicom.dcmread(stored), voi=settings.engine.voi,
                                      preprocessing=mae.preprocessing)
        maps, _ = mae.error_map(prepared.tensor, seed=settings.engine.seed, passes=settings.engine.passes)
        crop_source = engines.preprocess(pydicom.dcmread(stored), voi=settings.engine.voi,
                                         preprocessing=classifier.preprocessing, **preprocess_options(loaded[1]))
        assert crop_source.display[0].shape == (crop_source.geometry.rows, crop_source.geometry.columns)  # full size
        expected = classifier.region_guided_from_error_map(
            crop_source.display[0], crop_source.geometry, maps[0].numpy(), whole=crop_source.tensor[0], max_regions=2)
        assert len(expected.boxes) == 3  # whole image + the two highest-error regions
        values = expected.head_values(classifier.layout)
        for name, got in reported["heads"].items():
            assert np.allclose(got, values[name], atol=1e-5), name
        decisions = {f.name: f.decision for f in expected.findings if f.decision is not None}
        assert reported.get("findings", {}) == decisions and "bone_tumour" in decisions
        positive = positive or bool(expected.findings[0].positive)
        if uids[row.id] == str(knee.SOPInstanceUID):
            knee_decisions = decisions
    assert study.priority == (2 if positive else 0)

    sr = pydicom.dcmread(spool.absolute(next(i.path for i in outbox if i.kind == "SR")))
    groups = _groups(sr)
    toys = [g for g in groups if g["algorithm"] == "tumour-toy"]
    assert sorted(g["image"] for g in toys) == sorted([str(knee.SOPInstanceUID), str(other.SOPInstanceUID)])
    toy = toys[0]
    assert not any(p.startswith("passes=") for p in toy["parameters"])
    assert f"encoder_sha256={classifier.encoder_hash}" in toy["parameters"]
    assert _evaluations(sr)["AI class: bone_tumour"] in ("present", "absent")
    assert knee_decisions["bone_tumour"] in ("present", "absent")

    dciodvfy = require_tool("dciodvfy")
    for item in outbox:
        report = subprocess.run([dciodvfy, "-new", str(spool.absolute(item.path))], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors
    database.dispose()


def test_regions_from_is_checked(tmp_path: Path, folders) -> None:
    import engines
    from node.pipeline.models import ConfiguredModel, check_region_sources

    mae_folder, classifier_folder = folders
    with pytest.raises(ConfigError) as caught:
        settings_for(mae_folder, classifier_folder, regions_from="nothing")
    assert "models[1].regions_from: 'nothing' names no other [[models]] entry" in caught.value.problems[0]
    with pytest.raises(ConfigError) as caught:
        settings_for(mae_folder, classifier_folder, max_regions=0)
    assert "models[1].max_regions" in caught.value.problems[0]
    # a model without an error map cannot give regions; a non-classifier cannot take them
    dino = tiny_dinov3(tmp_path / "dino")
    settings = parse_settings({"models": [{"name": "knee", "path": str(dino)},
                                          {"name": "tumour", "path": str(classifier_folder), "regions_from": "knee"}]})
    loaded = [ConfiguredModel(e, engines.load(e.path, backend="cpu")) for e in settings.model_entries]
    with pytest.raises(ValueError, match=r"models\[1\].regions_from: 'knee' is not another configured model with an "
                                         "error map"):
        check_region_sources(loaded)
    settings = parse_settings({"models": [{"name": "a", "path": str(mae_folder)},
                                          {"name": "b", "path": str(mae_folder), "regions_from": "a"}]})
    loaded = [ConfiguredModel(e, engines.load(e.path, backend="cpu")) for e in settings.model_entries]
    with pytest.raises(ValueError, match=r"models\[1\].regions_from: .* is a mae model, not a region-guided"):
        check_region_sources(loaded)
    settings = parse_settings({"models": [{"name": "tumour", "path": str(classifier_folder)}]})
    loaded = [ConfiguredModel(e, engines.load(e.path, backend="cpu")) for e in settings.model_entries]
    assert check_region_sources(loaded) == {0: None}  # no regions_from: whole image only


def test_config_check_knows_the_classifier_outputs_from_its_layout(folders) -> None:
    from node.cli.node_commands import _check_triage_names

    mae_folder, classifier_folder = folders
    _check_triage_names(settings_for(mae_folder, classifier_folder), "t.toml")  # tumour.bone_tumour exists
    bad = settings_for(mae_folder, classifier_folder)
    bad.triage.rules[0].when = "tumour.osteosarcoma > 0.5"
    with pytest.raises(ConfigError) as caught:
        _check_triage_names(bad, "t.toml")
    assert "unknown name(s) tumour.osteosarcoma" in caught.value.problems[0]


def test_crops_are_cut_from_an_image_large_enough(folders) -> None:
    """The overlay image is small (DEFAULT_DISPLAY_SIZE); a region-guided model asks for one whose smallest crop
    (region_min_fraction of the short side) is at least the model input, up to 2048 px."""
    import engines
    from engines.imaging.preprocess import DEFAULT_DISPLAY_SIZE
    from node.pipeline.models import ConfiguredModel, preprocess_options, preprocessing_key

    mae_folder, classifier_folder = folders
    settings = settings_for(mae_folder, classifier_folder, region_min_fraction=0.2)
    mae, classifier = [ConfiguredModel(e, engines.load(e.path, backend="cpu")) for e in settings.model_entries]
    assert preprocess_options(mae) == {}
    assert preprocess_options(classifier) == {"display_size": 2048, "min_decoded_side": 1120}  # 224 / 0.2
    assert DEFAULT_DISPLAY_SIZE < 1120 and preprocessing_key(mae) != preprocessing_key(classifier)
