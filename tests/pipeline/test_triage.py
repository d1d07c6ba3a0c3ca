"""Triage rules: the safe grammar, first match wins, unknown names refused with the key path, study values
aggregated from images; and the worker storing the decision (study, SR/SC, outbox, notifications)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.settings import ConfigError, TriageSettings, parse_settings
from node.pipeline.triage import (NO_RULE_MATCHED, PriorityDecision, Triage, TriageError, head_labels_from_model,
                                  model_study_values, study_values)

HEADS = {"fracture": ["fracture"], "lesion": ["none", "lytic", "sclerotic"]}


def rules(*items: tuple[str, str, str], default: str = "routine") -> TriageSettings:
    return TriageSettings.model_validate(
        {"default": default, "rules": [{"name": n, "when": w, "priority": p} for n, w, p in items]}
    )


def values(**overrides):  # type: ignore[no-untyped-def]
    base = {"abnormality_score": 0.01, "abnormality_percentile": 50.0, "fracture": 0.1, "lesion": "none",
            "lesion_none": 0.9, "lesion_lytic": 0.05, "lesion_sclerotic": 0.05, "peer": "pacs", "calling_ae": "PACS",
            "modality": "CR", "body_part": "KNEE", "requested_priority": None}
    base.update(overrides)
    return base


ISSUE_RULES = rules(
    ("fracture", "fracture >= 0.85", "urgent"),
    ("malignant", "lesion in ('lytic', 'sclerotic')", "urgent"),
    ("very abnormal", "abnormality_percentile >= 99", "high"),
)


@pytest.mark.parametrize(
    ("study", "priority", "reason"),
    [
        (values(fracture=0.9), "urgent", "fracture"),
        (values(lesion="lytic"), "urgent", "malignant"),
        (values(abnormality_percentile=99.5), "high", "very abnormal"),
        (values(fracture=0.9, abnormality_percentile=99.5), "urgent", "fracture"),  # first match wins
        (values(), "routine", NO_RULE_MATCHED),
        (values(abnormality_percentile=None), "routine", NO_RULE_MATCHED),  # a missing value never matches
    ],
)
def test_first_matching_rule_decides(study, priority: str, reason: str) -> None:
    triage = Triage(ISSUE_RULES, HEADS)
    decision = triage.decide(study, PriorityDecision(0, "peer default"))
    assert (decision.priority, decision.reason) == (priority, reason)


def test_order_of_rules_matters() -> None:
    first_high = rules(("p99", "abnormality_percentile >= 99", "high"), ("fracture", "fracture >= 0.85", "urgent"))
    decision = Triage(first_high, HEADS).decide(values(fracture=0.9, abnormality_percentile=99.5),
                                                PriorityDecision(0, "x"))
    assert (decision.priority, decision.reason) == ("high", "p99")


def test_peer_priority_is_the_floor_and_queue_time_rules_raise_it() -> None:
    triage = Triage(rules(("emergency department", "peer == 'ed' or calling_ae == 'ED_CR'", "urgent"),
                          ("fracture", "fracture >= 0.85", "high")), HEADS)
    assert triage.starting("PACS", "pacs", "high") == PriorityDecision(1, "peer default")
    started = triage.starting("ED_CR", None, None)
    assert (started.priority, started.reason) == ("urgent", "emergency department")
    assert triage.rules[0].queue_time and not triage.rules[1].queue_time
    # Results never lower the starting priority; they can raise it.
    assert triage.decide(values(), PriorityDecision(1, "peer default")) == PriorityDecision(1, "peer default")
    assert triage.decide(values(fracture=0.95), PriorityDecision(0, "peer default")).reason == "fracture"


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "fracture.real.imag > 0.5",  # one dot (model.head) is a name; more is an attribute chain
        "fracture().x > 0.5",
        "fracture * 2 > 1",
        "[x for x in ()]",
        "lambda: 1",
        "fracture",
        "fracture > abs(-1)",
        "lesion in 'lytic'",
        "open('/etc/passwd')",
    ],
)
def test_unsafe_or_unsupported_expressions_are_config_errors_naming_the_key(expression: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"triage": {"rules": [{"name": "ok", "when": "fracture > 0.5", "priority": "high"},
                                             {"name": "bad", "when": expression, "priority": "urgent"}]}})
    assert caught.value.problems and all(p.startswith("triage.rules[1].when: ") for p in caught.value.problems)


def test_unknown_names_and_type_mismatches_are_refused_with_the_key_path() -> None:
    with pytest.raises(TriageError) as caught:
        Triage(rules(("a", "fracture >= 0.85", "urgent"), ("b", "fractur >= 0.85", "urgent"),
                     ("c", "lesion > 0.5", "high"), ("d", "fracture == 'yes'", "high")), HEADS)
    problems = caught.value.problems
    assert problems[0].startswith("triage.rules[1].when: unknown name(s) fractur")
    assert problems[1].startswith("triage.rules[2].when: lesion is compared with 0.5")
    assert problems[2].startswith("triage.rules[3].when: fracture is compared with 'yes'")
    assert len(problems) == 3


def test_model_dot_head_names_each_models_outputs_and_bare_names_are_the_first_models() -> None:
    models = {"mae": HEADS, "knee": {"kl_grade": ["0", "1", "2", "3", "4"]}}
    triage = Triage(rules(("kl4", "knee.kl_grade == '4' or knee.kl_grade_4 >= 0.9", "urgent"),
                          ("fx", "fracture >= 0.85 and mae.abnormality_score > 0", "high")), None, models)
    assert triage.rules[0].names == {"knee.kl_grade", "knee.kl_grade_4"}
    with pytest.raises(TriageError) as caught:  # bare names are the first model's only; unknown model refused
        Triage(rules(("a", "kl_grade == '4'", "urgent"), ("b", "hip.kl_grade == '4'", "urgent"),
                     ("c", "knee.kl_grade > 3", "urgent")), None, models)
    assert [p.split(":")[0] for p in caught.value.problems] == [f"triage.rules[{i}].when" for i in range(3)]
    values = model_study_values(
        [("mae", [(0.2, None, {"fracture": [0.9]})], HEADS),
         ("knee", [(None, None, {"kl_grade": [0.0, 0.05, 0.05, 0.1, 0.8]})], models["knee"])],
        {"modality": "CR"})
    assert values["fracture"] == values["mae.fracture"] == 0.9 and values["knee.kl_grade"] == "4"
    assert "kl_grade" not in values and values.get("knee.abnormality_score") is None
    assert triage.decide(values, PriorityDecision(0, "x")).reason == "kl4"


def test_study_values_take_the_highest_probability_and_the_worst_class() -> None:
    images = [
        (0.02, 40.0, {"fracture": [0.2], "lesion": [0.1, 0.8, 0.1]}),
        (0.05, 99.2, {"fracture": [0.9], "lesion": [0.2, 0.1, 0.7]}),
        (0.01, None, {"fracture": [0.1], "lesion": [0.9, 0.05, 0.05]}),
    ]
    study = study_values(images, HEADS, {"modality": "CR", "peer": "pacs"})
    assert study["abnormality_score"] == 0.05 and study["abnormality_percentile"] == 99.2
    assert study["fracture"] == 0.9
    assert study["lesion"] == "sclerotic"  # the latest label in the head's order among the images' top classes
    assert study["lesion_lytic"] == 0.8
    assert study["modality"] == "CR" and study["body_part"] is None


def test_head_names_come_from_the_model_folder_without_loading_weights() -> None:
    labels = head_labels_from_model(Path(__file__).resolve().parents[2] / "models" / "demo-mae")
    assert labels is not None and labels["fracture"] == ["fracture"] and "lesion" in labels


def test_config_check_refuses_a_rule_naming_an_output_the_model_lacks(tmp_path: Path) -> None:
    from tests.cli.test_node_commands import msknode

    demo = Path(__file__).resolve().parents[2] / "models" / "demo-mae"
    path = tmp_path / "msknode.toml"
    path.write_text(
        f'[engine]\nmodel = "{demo}"\n\n'
        '[[triage.rules]]\nname = "fracture"\nwhen = "fracture >= 0.85"\npriority = "urgent"\n\n'
        '[[triage.rules]]\nname = "tumour"\nwhen = "tumour_class == \'malignant\'"\npriority = "urgent"\n'
    )
    checked = msknode("config", "check", str(path))
    assert checked.returncode == 1
    assert "triage.rules[1].when: unknown name(s) tumour_class" in checked.stderr
    assert "triage.rules[0]" not in checked.stderr
    path.write_text(path.read_text().replace("tumour_class == 'malignant'", "lesion == 'lytic'"))
    assert msknode("config", "check", str(path)).returncode == 0


# --- the worker stores and announces the decision --------------------------------------------------------------
@pytest.fixture(scope="module")
def model_with_heads(tmp_path_factory):
    """The tiny random MAE plus two heads whose bias makes the fracture head certain (p ~ 1)."""
    import torch

    import engines
    from engines.heads import LinearHead, save_head
    from tests.helpers.models import tiny_model

    folder = tiny_model(tmp_path_factory.mktemp("model") / "tiny", width=32, layers=1)
    encoder_hash = engines.load(folder, backend="cpu", load_heads=False).encoder_hash
    fracture = LinearHead("fracture", 32, ["fracture"], "sigmoid", encoder_sha256=encoder_hash)
    lesion = LinearHead("lesion", 32, ["none", "lytic", "sclerotic"], "softmax", encoder_sha256=encoder_hash)
    with torch.no_grad():
        for head in (fracture, lesion):
            head.linear.weight.zero_()
            head.linear.bias.zero_()
        fracture.linear.bias.fill_(8.0)
    save_head(fracture, folder / "heads")
    save_head(lesion, folder / "heads")
    return engines.load(folder, backend="cpu")


def test_worker_stores_priority_writes_it_into_results_and_queues_one_notification_per_channel(
    tmp_path: Path, model_with_heads
) -> None:
    from node.pipeline.worker import Worker
    from storage import completion
    from storage.db import Database
    from storage.intake import InstanceRecord, IntakeRepository
    from storage.migrate import upgrade
    from storage.models import Job, Notification, OutboxItem, Study
    from storage.queue import JobQueue
    from storage.spool import Spool
    from storage.job_inputs import JobInputs
    from tests.helpers.dicomdata import small_instance

    url = f"sqlite:///{tmp_path}/t.db"
    upgrade(url)
    database = Database(url)
    spool = Spool(tmp_path / "spool", fsync=False)
    settings = parse_settings({
        "peers": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "receives_results": True}],
        "engine": {"batch_size": 4, "passes": 2},
        "triage": {"rules": [
            {"name": "very abnormal", "when": "abnormality_score > 1e9", "priority": "high"},
            {"name": "fracture", "when": "fracture >= 0.85 and modality == 'CR'", "priority": "urgent"},
        ]},
        "notifications": {"webhooks": [{"url": "http://127.0.0.1:9/hook"}],
                          "smtp": {"host": "127.0.0.1", "from_address": "node@example.org", "to": ["a@example.org"]},
                          "dashboard_url": "https://node.example.org/"},
    })
    worker = Worker(settings, JobQueue(database), JobInputs(database), spool, model_with_heads, owner="w")
    index = IntakeRepository(database)
    association = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 1, "pacs", None)
    source = small_instance(seed=3)
    source.PatientName, source.PatientID, source.AccessionNumber = "Doe^Jane", "PID-4711", "ACC-77"
    path = tmp_path / "in.dcm"
    source.save_as(path, enforce_file_format=True)
    staged = spool.incoming / "rx.dcm"
    shutil.copyfile(path, staged)
    stored = spool.commit_file(staged, source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    index.index_instance(InstanceRecord(
        source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID, source.SOPClassUID,
        source.file_meta.TransferSyntaxUID, "ACC-77", None, "CR", "HAND", None, None, stored.relative_path,
        stored.size, stored.sha256, "PACS", association))
    completion.tick(database, JobQueue(database), lambda _ae: 0, force_complete_seconds=0)

    assert worker.run_once() == 1
    with database.session() as session:
        study = session.scalar(select(Study))
        outbox = session.scalars(select(OutboxItem)).all()
        notes = session.scalars(select(Notification)).all()
        job = session.scalar(select(Job))
    assert (study.priority, study.priority_reason) == (2, "fracture")
    assert outbox and {item.priority for item in outbox} == {2}
    for item in outbox:
        result = pydicom.dcmread(spool.absolute(item.path), stop_before_pixels=True)
        assert result.SeriesDescription.startswith("AI URGENT ")
    sr = pydicom.dcmread(spool.absolute(next(i.path for i in outbox if i.kind == "SR")))
    assert _has_priority_item(sr)
    assert sorted((n.channel, n.target) for n in notes) == [("smtp", "a@example.org"),
                                                             ("webhook", "http://127.0.0.1:9/hook")]
    payload = notes[0].payload
    assert payload["priority"] == "URGENT"
    assert "accession_number" not in payload and "ACC-77" not in str(payload)  # PHI only with include_phi
    assert payload["study_instance_uid"] == source.StudyInstanceUID
    assert payload["link"] == f"https://node.example.org/studies/{study.id}"
    assert payload["findings"]["rule"] == "fracture" and payload["findings"]["values"]["fracture"] > 0.85
    assert "Doe" not in str(payload) and "PID-4711" not in str(payload)

    # The same job handed to a worker again (e.g. a duplicate claim after a lost lease) announces nothing new.
    with database.session() as session:
        job_row = session.get(Job, job.id)
        job_row.state, job_row.lease_owner = "processing", "w"
    from storage.queue import ClaimedJob

    worker.process([ClaimedJob(job.id, study.id, study.study_instance_uid, job.study_revision, 0, 2)])
    with database.session() as session:
        assert session.query(Notification).count() == 2
    database.dispose()


def _has_priority_item(sr: pydicom.Dataset) -> bool:
    """Whether the SR's content tree holds the triage priority item with the value URGENT."""
    def walk(items):  # type: ignore[no-untyped-def]
        for item in items:
            code = item.get("ConceptCodeSequence")
            if code and "URGENT" in str(code[0].CodeMeaning).upper():
                return True
            if walk(item.get("ContentSequence", [])):
                return True
        return False

    return walk(sr.get("ContentSequence", []))


def test_worker_refuses_rules_naming_an_output_its_model_lacks(tmp_path: Path, model_with_heads) -> None:
    from node.pipeline.worker import Worker

    settings = parse_settings({"triage": {"rules": [
        {"name": "fracture", "when": "fracture >= 0.85", "priority": "urgent"},
        {"name": "tumour", "when": "tumour_class == 'malignant'", "priority": "urgent"},
    ]}})
    worker = Worker(settings, None, None, None, model_with_heads, owner="w")  # type: ignore[arg-type]
    with pytest.raises(TriageError) as caught:
        worker.triage  # noqa: B018 (compiling the rules is what raises)
    assert caught.value.problems == [caught.value.problems[0]]
    assert caught.value.problems[0].startswith("triage.rules[1].when: unknown name(s) tumour_class")
