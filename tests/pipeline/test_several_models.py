"""Several models per study (issue #16): ``[[models]]`` with what each applies to. A CR knee gets the MAE and a
DINOv3 model, a CR hand only the MAE; the SR has one group per (image, model), each with its own algorithm
identification; SCs only for the model with an error map; a triage rule on the DINOv3 model's KL head decides;
dciodvfy finds no error. Tiny random models (CPU, seconds)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import torch
from sqlalchemy import select

from node.settings import ConfigError, parse_settings
from storage.db import Database
from storage.intake import InstanceRecord, IntakeRepository
from storage.models import ImageResultRow, OutboxItem, Study
from storage.spool import Spool
from tests.helpers.models import tiny_model
from tests.helpers.tools import require_tool


def tiny_dinov3(folder: Path, kl_top: int = 4) -> Path:
    """A random tiny DINOv3 folder with a ``kl_grade`` head whose answer is grade ``kl_top`` whatever the image."""
    from engines.dinov3.loaders import save_hf_dinov3
    from engines.dinov3.network import DINOv3Config, DINOv3ViT, encoder_sha256
    from engines.heads import LinearHead, save_head

    config = DINOv3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          num_register_tokens=1)
    network = DINOv3ViT(config).init_weights(1)
    network.init_buffers("cpu")
    save_hf_dinov3(network, folder, extra_config={"msknode_name": "knee-dino", "msknode_version": "7"})
    head = LinearHead("kl_grade", 32, [str(k) for k in range(5)], "softmax", encoder_sha256=encoder_sha256(network))
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.fill_(0.0)
        head.linear.bias[kl_top] = 5.0
    save_head(head.eval(), folder / "heads")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return tiny_model(base / "mae-tiny", width=32, layers=1), tiny_dinov3(base / "dino-tiny")


def settings_for(mae: Path, dino: Path, **extra):
    return parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "engine": {"batch_size": 4, "passes": 2},
        "models": [{"name": "mae", "path": str(mae)},
                   {"name": "knee", "path": str(dino), "body_parts": ["KNEE"], "modalities": ["CR", "DX"]}],
        "triage": {"rules": [{"name": "severe knee OA", "when": "knee.kl_grade == '4'", "priority": "urgent"},
                             {"name": "odd", "when": "mae.abnormality_score > 1e9 or abnormality_score < 0", "priority": "high"}]},
        **extra,
    })


def _groups(sr: pydicom.Dataset) -> list[dict]:
    """Per TID 1410 group: its tracking identifier, algorithm name / version / parameters, source image."""
    found = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "CONTAINER" and name == "125007":
                group = {"parameters": []}
                for child in item.ContentSequence:
                    code = child.ConceptNameCodeSequence[0].CodeValue
                    if code == "112039":
                        group["tracking"] = child.TextValue
                    elif code == "111001":
                        group["algorithm"] = child.TextValue
                    for sub in [child, *child.get("ContentSequence", [])]:  # TID 4019 rows: siblings or nested
                        key = sub.ConceptNameCodeSequence[0].CodeValue
                        if key == "111003":
                            group["version"] = sub.TextValue
                        elif key == "111002":
                            group["parameters"].append(sub.TextValue)
                    if child.ValueType == "SCOORD":
                        group["image"] = str(child.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                found.append(group)
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_knee_gets_both_models_hand_only_the_mae_and_the_kl_rule_triages(tmp_path: Path, folders) -> None:
    import engines
    from engines.training import phantoms
    from node.pipeline.models import ConfiguredModel
    from node.pipeline.worker import Worker
    from storage import completion
    from storage.job_inputs import JobInputs
    from storage.migrate import upgrade
    from storage.queue import JobQueue

    mae_folder, dino_folder = folders
    settings = settings_for(mae_folder, dino_folder)
    loaded = [ConfiguredModel(entry, engines.load(entry.path, backend="cpu")) for entry in settings.model_entries]
    assert [cm.model.family for cm in loaded] == ["mae", "dinov3"]
    url = f"sqlite:///{tmp_path}/m.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    worker = Worker(settings, JobQueue(database), JobInputs(database), spool, loaded, owner="w")
    index = IntakeRepository(database)
    association = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    knee = phantoms.to_dataset(phantoms.generate("knee", seed=5, narrowing_grade=3), patient_index=1,
                               study_key="multi", instance_number=1)
    hand = phantoms.to_dataset(phantoms.generate("hand", seed=6), patient_index=1, study_key="multi",
                               instance_number=2)
    assert knee.BodyPartExamined == "KNEE" and hand.BodyPartExamined == "HAND" and knee.Modality == "CR"
    for number, ds in enumerate((knee, hand)):
        path = tmp_path / f"in{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        staged = spool.incoming / "rx.dcm"
        shutil.copyfile(path, staged)
        stored = spool.commit_file(staged, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        index.index_instance(InstanceRecord(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
            ds.file_meta.TransferSyntaxUID, None, None, "CR", ds.BodyPartExamined, None, None, stored.relative_path,
            stored.size, stored.sha256, "PACS", association))
    completion.tick(database, JobQueue(database), lambda _ae: 0, force_complete_seconds=0)
    assert worker.run_once() == 1

    with database.session() as session:
        study = session.scalar(select(Study))
        rows = session.scalars(select(ImageResultRow)).all()
        outbox = session.scalars(select(OutboxItem)).all()
    assert study.status == "done"
    assert (study.priority, study.priority_reason) == (2, "severe knee OA")
    assert sorted(r.state for r in rows) == ["analysed", "analysed"]
    by_models = sorted(sorted(r.outputs["models"]) for r in rows)
    assert by_models == [["knee", "mae"], ["mae"]]
    assert sorted(item.kind for item in outbox) == ["SC", "SC", "SR"]  # error maps: the MAE's only

    sr = pydicom.dcmread(spool.absolute(next(i.path for i in outbox if i.kind == "SR")))
    assert sr.SeriesDescription.startswith("AI URGENT")
    groups = _groups(sr)
    pairs = sorted((g["image"], g["algorithm"]) for g in groups)
    assert pairs == sorted([(str(knee.SOPInstanceUID), "mae-tiny"), (str(knee.SOPInstanceUID), "knee-dino"),
                            (str(hand.SOPInstanceUID), "mae-tiny")])
    dino = next(g for g in groups if g["algorithm"] == "knee-dino")
    mae = next(g for g in groups if g["algorithm"] == "mae-tiny" and g["image"] == str(knee.SOPInstanceUID))
    assert dino["version"] == "7" and not any(p.startswith("passes=") for p in dino["parameters"])
    assert any(p.startswith("passes=2") for p in mae["parameters"])
    hashes = {g["algorithm"]: next(p for p in g["parameters"] if p.startswith("encoder_sha256=")) for g in groups}
    assert hashes["knee-dino"] == f"encoder_sha256={loaded[1].model.encoder_hash}" != hashes["mae-tiny"]
    equipment = {item.ManufacturerModelName for item in sr.ContributingEquipmentSequence
                 if "ManufacturerModelName" in item and item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"}
    assert equipment == {"mae-tiny", "knee-dino"}

    dciodvfy = require_tool("dciodvfy")
    for item in outbox:
        report = subprocess.run([dciodvfy, "-new", str(spool.absolute(item.path))], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors
    database.dispose()


def test_models_config_is_validated_with_the_key_and_engine_model_stays_a_one_model_list(folders) -> None:
    mae_folder, dino_folder = folders
    one = parse_settings({"engine": {"model": str(mae_folder)}})
    assert [(e.name, e.path, e.heads, e.body_parts) for e in one.model_entries] == [("mae_tiny", mae_folder, None, [])]
    with pytest.raises(ConfigError) as caught:
        parse_settings({"models": [{"name": "knee-dino", "path": "x"}, {"name": "b", "path": "y", "colour": 1},
                                   {"name": "b", "path": "z"}]})
    problems = " | ".join(caught.value.problems)
    assert "models[0].name" in problems and "models[1].colour: unknown key" in problems
    with pytest.raises(ConfigError) as caught:
        parse_settings({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    assert "models[1].name: duplicate model name 'a'" in caught.value.problems[0]
    with pytest.raises(ConfigError) as caught:
        parse_settings({"engine": {"model": "x"}, "models": [{"name": "a", "path": "y"}]})
    assert "engine.model" in caught.value.problems[0]


def test_config_check_checks_rule_names_and_heads_against_every_model(folders) -> None:
    from node.cli.node_commands import _check_triage_names

    mae_folder, dino_folder = folders
    _check_triage_names(settings_for(mae_folder, dino_folder), "t.toml")  # knee.kl_grade exists
    bad = settings_for(mae_folder, dino_folder, triage={"rules": [
        {"name": "x", "when": "knee.fracture > 0.5", "priority": "high"}]})
    with pytest.raises(ConfigError) as caught:
        _check_triage_names(bad, "t.toml")
    assert caught.value.problems[0].startswith("triage.rules[0].when: unknown name(s) knee.fracture")
    heads = parse_settings({"models": [{"name": "knee", "path": str(dino_folder), "heads": ["kl", "kl_grade"]}]})
    with pytest.raises(ConfigError) as caught:
        _check_triage_names(heads, "t.toml")
    assert caught.value.problems[0].startswith("models[0].heads: model") and "no head(s) kl " in caught.value.problems[0]


def test_status_and_health_list_every_model(folders) -> None:
    from node.runtime.status import configured_models, engine_from_roles, engines_from_roles

    mae_folder, dino_folder = folders
    settings = settings_for(mae_folder, dino_folder)
    listed = configured_models(settings)
    assert [(m["name"], m["applies_to"]) for m in listed] == [
        ("mae", "every eligible image"), ("knee", {"modalities": ["CR", "DX"], "body_parts": ["KNEE"]})]
    engines = [{"configured_name": "mae", "family": "mae"}, {"configured_name": "knee", "family": "dinov3"}]
    row = {"role": "worker", "alive": True, "detail": {"engine_loaded": True, "engine": engines[0], "engines": engines}}
    assert engines_from_roles([row]) == engines and engine_from_roles([row]) == engines[0]
    old = {"role": "worker", "alive": True, "detail": {"engine_loaded": True, "engine": {"family": "mae"}}}
    assert engines_from_roles([old]) == [{"family": "mae"}]  # a worker of before several models
