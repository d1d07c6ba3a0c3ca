"""Several workers, late instances and killed or stalled workers (issue #14, item 2), on a real PostgreSQL and
Orthanc as the PACS.

Three ``msknode serve --role worker`` processes share one PostgreSQL database with a receiver, a scheduler and a
sender. Each study is sent; while its job is being processed a late instance arrives (a new revision), and then,
by study, nothing else happens, the worker holding the job is SIGKILLed (and restarted), or it is stopped
(SIGSTOP) past its lease and woken again after the newer revision was processed elsewhere (its stale results are
then refused). At the end, at the PACS, each study has exactly one current SR (every other SR of the study is
named in a later SR's Predecessor Documents Sequence) and it references every instance of the study; the last SR
delivered is the newest revision's; no job failed and nothing is left in flight.
"""

from __future__ import annotations

import collections
import io
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from storage.db import Database
from storage.models import Job, OutboxItem, Study
from tests.helpers.dicomdata import small_instance
from tests.helpers.models import tiny_model
from tests.helpers.node import MSKNODE, REPO_ROOT, Peer, free_port, wait_for
from tests.helpers.orthanc import ORTHANC_AE, Orthanc
from tests.reliability.harness import SENDER_AE, CrashConfig, RoleProcess, StudyPlan, StudySender

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.orthanc]

WORKERS = 3
SCENARIOS = ("plain", "kill", "stall", "kill", "plain", "stall")  # one study each, all at once
LEASE = 6.0


def instances(study_uid: str, series_uid: str, first: int, count: int) -> list[Any]:
    out = []
    for number in range(first, first + count):
        dataset = small_instance(study_uid=study_uid, series_uid=series_uid, rows=96, columns=96,
                                 seed=number, instance_number=number)
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        out.append(dataset)
    return out


class Node:
    """Receiver, scheduler and sender once, the worker three times; workers are killed, stopped and restarted."""

    def __init__(self, directory: Path, database_url: str, model: Path) -> None:
        self.port = free_port()
        self.orthanc = Orthanc(directory / "orthanc", {"msknode": ("MSKNODE", "127.0.0.1", self.port)})
        self.config = CrashConfig(directory=directory / "node", port=self.port, database_url=database_url,
                                  roles=("receiver", "scheduler", "worker", "sender"))
        self.config.model = model
        self.config.lease_seconds = LEASE
        self.config.settle_seconds = 1.5
        self.config.force_complete_seconds = 60.0
        self.database = Database(database_url)
        # Each batch is held a moment before its results are recorded: the window in which late instances arrive.
        env = {"MSKNODE_FAULTS": "worker.before_finish=sleep:3"}
        self.roles = {role: RoleProcess(role, self.config, env) for role in ("receiver", "scheduler", "sender")}
        self.workers = [RoleProcess("worker", self.config, env) for _ in range(WORKERS)]
        for number, worker in enumerate(self.workers):
            worker.log_path = self.config.directory / f"worker-{number}.log"
        self.lock = threading.Lock()
        self.kills = 0
        self.stalls = 0

    def start(self) -> None:
        self.orthanc.start()
        self.config.peers = (Peer("modality", SENDER_AE),
                             Peer("pacs", ORTHANC_AE, port=self.orthanc.dicom_port, receives_results=True))
        self.config.write()
        subprocess.run([*MSKNODE, "db", "upgrade", "-c", str(self.config.path)], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        for process in [*self.roles.values(), *self.workers]:
            process.start()
        self.roles["receiver"].wait_listening()

    def stop(self) -> None:
        for process in [*self.workers, *self.roles.values()]:
            if process.process is not None and process.process.poll() is None:
                process.process.send_signal(signal.SIGCONT)
            process.stop()
        self.orthanc.stop()
        self.database.dispose()

    def send(self, plan: StudyPlan) -> None:
        StudySender(self.port, [plan], give_up_seconds=60).run()
        assert len(plan.acknowledged) == len(plan.instances), f"not all of {plan.study_uid} acknowledged"

    def processing(self, study_uid: str, revision: int) -> tuple[int, str] | None:
        """(revision, lease owner) of a job of the study at ``revision`` or later being processed."""
        with self.database.session() as session:
            row = session.execute(
                select(Job.study_revision, Job.lease_owner).join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == study_uid, Job.state == "processing",
                       Job.study_revision >= revision)
            ).first()
        return (row[0], row[1]) if row else None

    def worker_of(self, owner: str) -> RoleProcess | None:
        pid = int(owner.rsplit(":", 1)[1])
        return next((w for w in self.workers if w.process is not None and w.process.pid == pid), None)

    def kill(self, owner: str) -> bool:
        with self.lock:
            worker = self.worker_of(owner)
            if worker is None or worker.process.poll() is not None:
                return False
            worker.kill()
            worker.start()
            self.kills += 1
            return True

    def stall(self, owner: str, seconds: float) -> bool:
        with self.lock:
            worker = self.worker_of(owner)
            if worker is None:
                return False
            worker.process.send_signal(signal.SIGSTOP)
            self.stalls += 1
        time.sleep(seconds)
        worker.process.send_signal(signal.SIGCONT)
        return True

    def quiet(self) -> str | None:
        with self.database.session() as session:
            waiting = session.scalar(select(Study.id).where(Study.revision > Study.queued_revision).limit(1))
            busy_job = session.scalar(select(Job.id).where(Job.state.in_(("queued", "processing"))).limit(1))
            busy_out = session.scalar(select(OutboxItem.id).where(OutboxItem.state.in_(("pending", "sending")))
                                      .limit(1))
        return None if (waiting or busy_job or busy_out) else "quiet"


def act_on_live_owner(node: Node, study_uid: str, act, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    """Kill or stall the live worker holding a job of the study. Under load the first owner seen may already be
    gone (killed for another study and restarted under a new pid): look again until a live one is hit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = node.processing(study_uid, 1)
        if held is not None and act(held[1]):
            return
        time.sleep(0.05)
    raise AssertionError(f"no live worker held a job of {study_uid} within {timeout:.0f} s")


def drive(node: Node, scenario: str, plan: StudyPlan, late: list[StudyPlan], notes: list[str],
          errors: list[BaseException]) -> None:
    try:
        node.send(plan)
        _, owner = wait_for(lambda: node.processing(plan.study_uid, 1), 60, f"{plan.study_uid} processing", 0.1)
        node.send(late[0])  # revision 2 arrives while revision 1 is being processed
        notes.append(f"{scenario}: late instance while revision 1 processing")
        if scenario == "kill":
            act_on_live_owner(node, plan.study_uid, node.kill)
            notes.append("kill: worker SIGKILLed mid-job")
        elif scenario == "stall":
            act_on_live_owner(node, plan.study_uid, lambda holder: node.stall(holder, LEASE * 2.5))
            notes.append("stall: worker stopped past its lease, then woken")
        elif scenario == "plain":
            # A third revision while the second is being processed.
            wait_for(lambda: node.processing(plan.study_uid, 2), 90, f"{plan.study_uid} revision 2 processing", 0.1)
            node.send(late[1])
            notes.append("plain: late instance while revision 2 processing")
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def sr_documents(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    found = orthanc._request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    study = next((item["ID"] for item in found if item["Type"] == "Study"), None)
    if study is None:
        return []
    documents = []
    for series in orthanc.study_series(study):
        if series["MainDicomTags"].get("Modality") != "SR":
            continue
        for instance in series["Instances"]:
            documents.append(pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance))))
    return documents


def referenced(sequence: Any) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID) for item in sequence or [] for series in item.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence}


def test_three_workers_late_instances_and_kills_leave_one_current_sr(tmp_path: Path, postgres_url: str) -> None:
    node = Node(tmp_path, postgres_url, tiny_model(tmp_path / "tiny-model"))
    plans, lates = [], []
    for _ in SCENARIOS:
        study_uid, series_uid = generate_uid(), generate_uid()
        plans.append(StudyPlan(study_uid, instances(study_uid, series_uid, 1, 2)))
        lates.append([StudyPlan(study_uid, instances(study_uid, series_uid, 3 + n, 1)) for n in range(2)])
    notes: list[str] = []
    errors: list[BaseException] = []
    started = time.monotonic()
    node.start()
    try:
        threads = [threading.Thread(target=drive, args=(node, scenario, plan, late, notes, errors))
                   for scenario, plan, late in zip(SCENARIOS, plans, lates)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        assert not any(thread.is_alive() for thread in threads), "a study driver did not finish"
        assert errors == [], errors
        wait_for(node.quiet, 120, "the node to finish every revision and delivery", 0.5)

        with node.database.session() as session:
            jobs = session.execute(select(Job.id, Job.study_revision, Job.state, Job.last_error,
                                          Study.study_instance_uid).join(Study, Study.id == Job.study_id)).all()
            delivered = session.execute(
                select(OutboxItem.job_id, OutboxItem.sop_instance_uid, OutboxItem.delivered_at, Job.study_revision,
                       OutboxItem.study_instance_uid)
                .join(Job, Job.id == OutboxItem.job_id)
                .where(OutboxItem.kind == "SR", OutboxItem.state == "delivered")
            ).all()
        states = collections.Counter(job.state for job in jobs)
        refused = [job for job in jobs if job.state == "superseded" and "discarded" in (job.last_error or "")]
        violations = [f"job {job.id} failed: {job.last_error}" for job in jobs if job.state == "failed"]
        sr_total = 0
        for plan, late in zip(plans, lates):
            everything = {str(ds.SOPInstanceUID) for p in [plan, *late] for ds in p.instances
                          if str(ds.SOPInstanceUID) in p.acknowledged}
            documents = sr_documents(node.orthanc, plan.study_uid)
            sr_total += len(documents)
            named = set().union(*(referenced(ds.get("PredecessorDocumentsSequence")) for ds in documents))
            current = [ds for ds in documents if str(ds.SOPInstanceUID) not in named]
            if len(current) != 1:
                violations.append(f"study {plan.study_uid}: {len(current)} current SRs at the PACS "
                                  f"({len(documents)} SRs)")
                continue
            evidence = referenced(current[0].get("CurrentRequestedProcedureEvidenceSequence"))
            if evidence != everything:
                violations.append(f"study {plan.study_uid}: the current SR references {len(evidence)} instances, "
                                  f"the study has {len(everything)}")
            study_rows = [row for row in delivered if row.study_instance_uid == plan.study_uid]
            if not study_rows:
                violations.append(f"study {plan.study_uid}: no SR delivery recorded")
                continue
            last = max(study_rows, key=lambda row: row.delivered_at)
            newest = max(job.study_revision for job in jobs if job.study_instance_uid == plan.study_uid
                         and job.state == "done")
            if last.study_revision != newest or last.sop_instance_uid != str(current[0].SOPInstanceUID):
                violations.append(f"study {plan.study_uid}: last SR delivered is revision {last.study_revision}'s, "
                                  f"newest done is {newest}")
        figures = (f"workers {WORKERS}, studies {len(plans)}, instances "
                   f"{sum(len(p.acknowledged) for p in plans) + sum(len(p.acknowledged) for group in lates for p in group)}, "
                   f"kills {node.kills}, stalls {node.stalls}, jobs {dict(states)}, stale results refused "
                   f"{len(refused)}, SRs at PACS {sr_total}, {time.monotonic() - started:.0f} s")
        print(figures, *notes, sep="\n  ")
        assert violations == [], "\n".join([figures, *violations])
        assert node.kills >= 2 and node.stalls >= 2, figures
        assert sum("late instance while revision 1" in note for note in notes) == len(SCENARIOS), notes
    finally:
        node.stop()
