"""One place decides a study's priority (node/pipeline/triage.Triage); the queue stores what it is given.

Also the layout rules of issue #13 that keep it so: the rule grammar (node/pipeline/triage_rules.py) is
imported by settings and triage alike, so settings never reaches back into triage, and storage imports
neither node/ nor engines/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.pipeline.triage import NO_RULE_MATCHED, PriorityDecision, Triage, requested_priority, study_attributes
from node.pipeline.triage_rules import check_expression
from node.settings import TriageSettings
from storage.db import Database
from storage.intake import IntakeRepository
from storage.models import Notification, OutboxItem, Study
from storage.notifications import NotificationEntry
from storage.queue import JobQueue, OutboxEntry
from tests.storage.test_queue_completion import make_study

REPO = Path(__file__).resolve().parents[2]
HEADS = {"fracture": ["fracture"]}


def triage(*rules: dict[str, str], default: str = "routine") -> Triage:
    return Triage(TriageSettings.model_validate({"rules": list(rules), "default": default}), HEADS)


ER_RULE = {"name": "emergency room", "when": "calling_ae == 'ER'", "priority": "high"}
FRACTURE_RULE = {"name": "fracture", "when": "fracture >= 0.85", "priority": "urgent"}


def test_the_starting_priority_is_the_peers_or_a_higher_queue_time_rule() -> None:
    rules = triage(ER_RULE, FRACTURE_RULE)
    assert rules.starting("PACS", "pacs", None) == PriorityDecision(0, "peer default")
    assert rules.starting("PACS", "pacs", "urgent") == PriorityDecision(2, "peer default")
    decision = rules.starting("ER", None, None)
    assert (decision.rank, decision.reason) == (1, "emergency room")
    assert rules.starting("ER", None, "urgent") == PriorityDecision(2, "peer default")


def test_after_analysis_the_whole_list_decides_never_below_the_starting_priority() -> None:
    rules = triage(ER_RULE, FRACTURE_RULE)
    found = rules.final(0, "PACS", "pacs", None, {"fracture": 0.9})
    assert (found.rank, found.reason, found.priority) == (2, "fracture", "urgent")
    assert rules.final(0, "PACS", "pacs", None, {"fracture": 0.1}) == PriorityDecision(0, NO_RULE_MATCHED)
    # the sender's queue-time rule still holds after analysis
    kept = rules.final(0, "ER", None, None, {"fracture": 0.1, "calling_ae": "ER"})
    assert (kept.rank, kept.reason) == (1, "emergency room")
    # a job queued higher than the rules now say (e.g. the peer's priority changed since) keeps its rank
    assert rules.final(2, "PACS", "pacs", None, {"fracture": 0.1}) == PriorityDecision(2, "peer default")
    # triage.default counts as a decision too
    assert triage(default="high").final(0, "PACS", "pacs", None, {}) == PriorityDecision(1, NO_RULE_MATCHED)


def test_nothing_analysed_keeps_the_starting_priority() -> None:
    rules = triage(ER_RULE, FRACTURE_RULE)
    assert rules.final(0, "PACS", "pacs", "high", None) == PriorityDecision(1, "peer default")
    assert rules.final(0, "ER", None, None, None).reason == "emergency room"
    assert rules.final(2, "ER", None, None, None) == PriorityDecision(2, "peer default")
    assert Triage.as_queued(1) == PriorityDecision(1, "peer default")


def test_study_attributes_come_from_the_header_and_the_sender() -> None:
    header = Dataset()
    header.Modality, header.BodyPartExamined = "CR ", "HAND"
    assert requested_priority(header) is None
    item = Dataset()
    item.RequestedProcedurePriority = "stat"
    header.RequestAttributesSequence = [item]
    assert requested_priority(header) == "STAT"
    header.RequestedProcedurePriority = "Routine"
    assert study_attributes(header, "PACS", "pacs") == {
        "calling_ae": "PACS", "peer": "pacs", "modality": "CR", "body_part": "HAND", "requested_priority": "ROUTINE",
    }
    assert study_attributes(None, None, None) == dict.fromkeys(
        ("calling_ae", "peer", "modality", "body_part", "requested_priority"))


def test_the_queue_stores_the_priority_it_is_given_and_computes_none(db: Database) -> None:
    index, queue = IntakeRepository(db), JobQueue(db)
    make_study(db, index, queue, 1, 2)  # queued urgent ...
    [job] = queue.claim("w", lease_seconds=60)
    entry = OutboxEntry("1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "SR", "out/sr.dcm", "pacs")
    note = NotificationEntry("webhook", "http://127.0.0.1:9/hook", {"priority": "ROUTINE"})
    # ... and triage decided routine: stored as given, not raised to the job's rank
    assert queue.record_results(job.id, "w", "done", [], [entry], priority=0, priority_reason="some rule",
                                notifications=[note])
    with db.session() as session:
        study = session.scalar(select(Study))
        assert (study.priority, study.priority_reason) == (0, "some rule")
        assert [item.priority for item in session.scalars(select(OutboxItem))] == [0]
        assert [n.priority for n in session.scalars(select(Notification))] == [0]


def test_record_results_needs_the_priority() -> None:
    with pytest.raises(TypeError):
        JobQueue.record_results(None, 1, "w", "done", [], [])  # type: ignore[arg-type, call-arg]


def test_settings_check_rule_syntax_without_importing_triage() -> None:
    check_expression("fracture >= 0.85 and modality == 'CR'")
    with pytest.raises(ValueError, match="not allowed"):
        check_expression("__import__('os').system('true')")
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, node.settings; print('node.pipeline.triage' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert loaded.stdout.strip() == "False"
