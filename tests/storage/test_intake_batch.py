"""storage.intake: one group-commit transaction indexes several instances exactly as one-by-one indexing would."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from sqlalchemy import func, select

from storage.db import Database
from storage.intake import IndexOutcome, IndexResult, InstanceRecord, IntakeRepository
from storage.models import Counter, Instance, InstanceReplacement, Series, Study
from tests.helpers.components import run_threads

STUDY = "1.2.826.0.1.3680043.10.2.1"


ASSOCIATION: dict[str, str] = {}


@pytest.fixture
def index(db: Database) -> IntakeRepository:
    """An IntakeRepository with one open association (instances reference it)."""
    index = IntakeRepository(db)
    ASSOCIATION["id"] = index.association_requested("PACS", "MSKNODE", "127.0.0.1", 104, "pacs", None)
    return index


def record(sop: str, sha: str = "a", study: str = STUDY, accession: str | None = "ACC7") -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid=study, series_instance_uid=study + ".1", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        accession_number=accession, study_date="20261122", modality="CR", body_part_examined="KNEE",
        series_number=1, instance_number=1, spool_path=f"{sop}.{sha}.dcm", size_bytes=100, sha256=sha * 64,
        calling_ae_title="PACS", association_id=ASSOCIATION["id"],
    )


def test_one_batch_new_duplicate_and_replaced_in_order(db: Database, index: IntakeRepository) -> None:
    results = index._index_batch([record("1.1", "a"), record("1.1", "a"), record("1.2", "b"), record("1.2", "c")])
    assert results == [
        IndexResult(IndexOutcome.NEW), IndexResult(IndexOutcome.DUPLICATE),
        IndexResult(IndexOutcome.NEW), IndexResult(IndexOutcome.REPLACED, previous_spool_path="1.2.b.dcm"),
    ]
    with db.session() as session:
        assert session.scalar(select(func.count(Study.id))) == 1
        assert session.scalar(select(func.count(Series.id))) == 1
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        assert rows["1.2"].sha256 == "c" * 64 and rows["1.2"].replaced_count == 1
        assert session.scalar(select(func.count(InstanceReplacement.id))) == 1
        study = session.scalars(select(Study)).one()
        assert study.revision == 3  # new, new, replaced: the duplicate is not new content
        assert study.accession_number == "ACC7"
        counters = {(c.name, c.labels): c.value for c in session.scalars(select(Counter))}
    assert counters[("instances_received", "outcome=new")] == 2
    assert counters[("instances_received", "outcome=duplicate")] == 1
    assert counters[("instances_received", "outcome=replaced")] == 1
    assert counters[("received_bytes", "")] == 400


def test_a_missing_accession_is_filled_by_a_later_instance(db: Database, index: IntakeRepository) -> None:
    index.index_instance(record("2.1", accession=None))
    index.index_instance(record("2.2", accession="LATER"))
    with db.session() as session:
        assert session.scalars(select(Study)).one().accession_number == "LATER"


def test_a_bad_record_fails_alone(db: Database, index: IntakeRepository) -> None:
    bad = dataclasses.replace(record("3.2"), sop_class_uid=None)  # type: ignore[arg-type]  # NOT NULL column
    results = index._index_batch([record("3.1"), bad, record("3.3")])
    assert results[0] == IndexResult(IndexOutcome.NEW) and results[2] == IndexResult(IndexOutcome.NEW)
    assert isinstance(results[1], Exception)
    with db.session() as session:
        assert sorted(session.scalars(select(Instance.sop_instance_uid))) == ["3.1", "3.3"]


def test_concurrent_associations_each_get_their_own_committed_row(db: Database, index: IntakeRepository) -> None:
    outcomes: dict[str, IndexOutcome] = {}

    def receive(n: int) -> None:
        for i in range(10):
            sop = f"4.{n}.{i}"
            outcomes[sop] = index.index_instance(record(sop, study=f"{STUDY}.{n}")).outcome

    run_threads([lambda n=n: receive(n) for n in range(8)], timeout=60)  # all finished, none raised
    assert len(outcomes) == 80 and set(outcomes.values()) == {IndexOutcome.NEW}
    with db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 80
        assert session.scalar(select(func.count(Study.id))) == 8
