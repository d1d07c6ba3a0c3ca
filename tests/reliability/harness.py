"""Crash-consistency harness: studies flow through a real node while its roles are SIGKILLed and restarted.

Used by the quick seeded test (tests/reliability/test_crash_consistency.py) and by ``make stress``
(benchmarks/stress.py). Each role runs as its own ``msknode serve --role X`` process so that exactly one role
dies at a time; the harness restarts it at once (the supervisor's restart backoff would only slow a run of
50 kills down). Studies go to the node over pynetdicom, and the harness remembers every C-STORE that was
answered Success. Results go to Orthanc, the PACS. At the end the run waits for quiescence and checks:

- every acknowledged instance is in the index and in the spool (file present, size as indexed);
- every study has exactly one current SR and one SC per analysed image at Orthanc, and nothing at Orthanc
  the node did not record in its outbox (a retry that built new UIDs would show up here as a duplicate);
- no job and no outbox row is left claimed, queued or pending; no job failed.

Also here, for the same reason (one place for node-under-test code): :func:`run_load`, concurrent sending
processes while the worker runs inference, used by tests/reliability/test_load.py and benchmarks/load.py.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import FileDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from storage.models import ImageResultRow, Instance, Job, OutboxItem, Study
from tests.helpers.dicomdata import small_instance
from tests.helpers.node import MSKNODE, REPO_ROOT, NodeConfig, Peer, free_port
from tests.helpers.orthanc import ORTHANC_AE, Orthanc

ROLES = ("receiver", "scheduler", "worker", "sender")
SENDER_AE = "PYSCU"


def machine_description() -> str:
    """CPU model, CPU count and load average: the figures of a shared VM mean little without them."""
    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{model}, {os.cpu_count()} CPU(s), load average {load}"


# -- the node, one process per role ---------------------------------------------------------------
class CrashConfig(NodeConfig):
    """Every role, short leases and timeouts so that a killed role's work comes back within seconds."""

    model: Path
    lease_seconds: float = 6.0
    settle_seconds: float = 2.0
    force_complete_seconds: float = 20.0
    poll_seconds: float = 0.3
    worker_nice: int | None = None  # None: the node's default (SCHED_IDLE); N: idle_priority off, [engine] nice = N

    def write(self) -> Path:
        path = super().write()
        text = path.read_text().replace(
            "[pipeline]\n",
            f"[pipeline]\nsettle_seconds = {self.settle_seconds}\n"
            f"force_complete_seconds = {self.force_complete_seconds}\npoll_seconds = {self.poll_seconds}\n"
            f"lease_seconds = {self.lease_seconds}\nmax_attempts = 20\n",
        )
        priority = "" if self.worker_nice is None else f"idle_priority = false\nnice = {self.worker_nice}\n"
        text += (
            "\n[engine]\n"
            f'model = "{self.model}"\nbatch_size = 4\npasses = 2\nseed = 0\n{priority}'
            # The sender's lease is timeout * 4 + 60 s: a short timeout keeps a killed sender's rows waiting
            # about a minute, not several.
            "\n[sender]\nbackoff_seconds = [0.5, 1.0, 2.0]\ntimeout_seconds = 3.0\n"
        )
        path.write_text(text)
        return path


class RoleProcess:
    """``msknode serve --role NAME`` as a child process; SIGKILL and restart on demand."""

    def __init__(self, role: str, config: CrashConfig, env: dict[str, str] | None = None) -> None:
        self.role = role
        self.config = config
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = config.directory / f"{role}.log"
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*MSKNODE, "serve", "--role", self.role, "-c", str(self.config.path)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env),
            )

    def wait_listening(self, timeout: float = 60.0) -> None:
        """The receiver logs "listening as" once its port is bound."""
        marker = f"--- start {self.starts} ---"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            text = self.log()
            if "listening as" in text[text.rfind(marker):]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.role} not listening after {timeout} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- what is sent --------------------------------------------------------------------------------
@dataclass
class StudyPlan:
    study_uid: str
    instances: list[FileDataset]
    acknowledged: set[str] = field(default_factory=set)  # SOP Instance UIDs answered 0x0000
    associations: int = 0


def plan_studies(count: int, images: int, seed: int, size: int = 96) -> list[StudyPlan]:
    """``count`` small eligible CR studies (HAND, MONOCHROME2) of ``images`` instances each."""
    plans = []
    for study in range(count):
        study_uid, series_uid = generate_uid(), generate_uid()
        instances = [
            small_instance(study_uid=study_uid, series_uid=series_uid, rows=size, columns=size,
                           seed=seed * 10_000 + study * 100 + i, instance_number=i + 1)
            for i in range(images)
        ]
        for instance in instances:  # sent as built: the dataset carries no explicit-VR encoding of its own
            instance.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        plans.append(StudyPlan(study_uid, instances))
    return plans


class StudySender(threading.Thread):
    """Sends its studies one association each, like a PACS; re-sends what was not acknowledged.

    ``in_study`` is set while an association is part-way through a study (the receiver-kill moment).
    """

    def __init__(self, port: int, studies: Sequence[StudyPlan], give_up_seconds: float = 180.0,
                 study_gap_seconds: float = 0.0, instance_gap_seconds: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.studies = studies
        self.study_gap_seconds = study_gap_seconds
        self.instance_gap_seconds = instance_gap_seconds
        self.give_up_seconds = give_up_seconds
        self.in_study = threading.Event()
        self.errors: list[str] = []

    def _send_once(self, plan: StudyPlan) -> None:
        ae = AE(ae_title=SENDER_AE)
        # pynetdicom notices a dead peer only at its DIMSE timeout; 10 s keeps a killed receiver's re-send
        # ahead of the force-complete timeout, as a PACS configured for a quick retry would.
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(plan.instances[0].SOPClassUID, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="MSKNODE")
        if not assoc.is_established:
            return
        plan.associations += 1
        try:
            for index, dataset in enumerate(plan.instances):
                if dataset.SOPInstanceUID in plan.acknowledged:
                    continue
                if index:
                    self.in_study.set()
                    time.sleep(self.instance_gap_seconds)
                status = assoc.send_c_store(dataset)
                if status is not None and status.get("Status") == 0x0000:
                    plan.acknowledged.add(dataset.SOPInstanceUID)
                if not assoc.is_established:
                    return
        finally:
            self.in_study.clear()
            if assoc.is_established:
                assoc.release()

    def run(self) -> None:
        for plan in self.studies:
            deadline = time.monotonic() + self.give_up_seconds
            while len(plan.acknowledged) < len(plan.instances):
                if time.monotonic() > deadline:
                    self.errors.append(f"study {plan.study_uid}: gave up with "
                                       f"{len(plan.acknowledged)}/{len(plan.instances)} acknowledged")
                    break
                try:
                    self._send_once(plan)
                except Exception as exc:  # the receiver died under us: try again
                    self.errors.append(f"send error (retried): {exc!r}")
                if len(plan.acknowledged) < len(plan.instances):
                    time.sleep(0.5)
            time.sleep(self.study_gap_seconds)


# -- the run -------------------------------------------------------------------------------------
@dataclass
class RunReport:
    seed: int
    kills: dict[str, int]
    kill_moments: list[str]
    studies: int
    instances_sent: int
    acknowledged: int
    stored: int
    sr_at_pacs: int
    sc_at_pacs: int
    expected_sc: int
    duplicates: int
    stuck: int
    superseded_revisions: int
    violations: list[str]
    seconds: float

    def _aimed(self, role: str) -> int:
        return sum(1 for moment in self.kill_moments if moment.startswith(role) and "(idle)" not in moment)

    def table(self) -> str:
        rows = [
            ("seed", self.seed),
            *((f"kills: {role}", f"{count} ({self._aimed(role)} at the aimed moment)")
              for role, count in sorted(self.kills.items())),
            ("kills: total", sum(self.kills.values())),
            ("studies", self.studies),
            ("instances sent / acknowledged / stored", f"{self.instances_sent} / {self.acknowledged} / {self.stored}"),
            ("SR at PACS", self.sr_at_pacs),
            ("SC at PACS / expected", f"{self.sc_at_pacs} / {self.expected_sc}"),
            ("studies re-analysed (late instance after a kill)", self.superseded_revisions),
            ("duplicates at PACS", self.duplicates),
            ("stuck jobs / deliveries", self.stuck),
            ("violations", len(self.violations)),
            ("run time (s)", f"{self.seconds:.0f}"),
        ]
        width = max(len(str(name)) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"  ! {violation}" for violation in self.violations[:50]]
        return "\n".join(lines)


class CrashRun:
    """Orthanc + a node of four role processes + senders + a seeded killer."""

    def __init__(self, directory: Path, model: Path, *, seed: int, studies: int, images: int, kills: int,
                 senders: int = 2, roles: Sequence[str] = ROLES, log: Callable[[str], None] = lambda _m: None,
                 sender_kills: int | None = None, study_gap_seconds: float = 1.0,
                 first_kills: Sequence[str] = (), faults: str = "") -> None:
        self.directory = directory
        self.seed = seed
        self.random = random.Random(seed)
        self.kills_wanted = kills
        self.kill_roles = list(roles)
        self.sender_kills = sender_kills
        self.first_kills = list(first_kills)  # roles to kill first, in this order (then seeded round-robin)
        self.log = log
        self.plans = plan_studies(studies, images, seed)
        node_port = free_port()
        self.orthanc = Orthanc(directory / "orthanc", {"msknode": ("MSKNODE", "127.0.0.1", node_port)})
        self.config = CrashConfig(
            directory=directory / "node", port=node_port, roles=ROLES,
            peers=(Peer("modality", SENDER_AE), Peer("pacs", ORTHANC_AE, receives_results=True)),
        )
        self.config.model = model
        self.roles: dict[str, RoleProcess] = {}
        # node/runtime/faults.py pauses (e.g. "worker.before_finish=sleep:1") widen a role's busy moment for the killer
        self.role_env = {"MSKNODE_FAULTS": faults} if faults else {}
        # Studies keep flowing while the killer works (a gap between studies, a short one between instances),
        # so that a receiver kill lands in the middle of an association.
        self.senders = [StudySender(node_port, self.plans[i::senders], study_gap_seconds=study_gap_seconds,
                                    instance_gap_seconds=0.05) for i in range(senders)]
        self.kills: collections.Counter[str] = collections.Counter()
        self.kill_moments: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.orthanc.start()
        self.config.peers = (Peer("modality", SENDER_AE),
                             Peer("pacs", ORTHANC_AE, port=self.orthanc.dicom_port, receives_results=True))
        self.config.write()
        subprocess.run([*MSKNODE, "db", "upgrade", "-c", str(self.config.path)], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        for role in ROLES:
            self.roles[role] = RoleProcess(role, self.config, self.role_env)
            self.roles[role].start()
        self.roles["receiver"].wait_listening()

    def stop(self) -> None:
        for process in self.roles.values():
            process.stop()
        self.orthanc.stop()

    # -- the database, as an admin would look at it ------------------------------------------------
    def _query(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(session)`` on a fresh connection (the harness holds none between looks)."""
        from storage.db import Database

        database = Database(self.config.url)
        try:
            with database.session() as session:
                return fn(session)
        finally:
            database.dispose()

    def _busy(self, role: str) -> bool:
        """Whether ``role`` is at its interesting moment: a job processing, a delivery being sent."""
        if role == "receiver":
            return any(sender.in_study.is_set() for sender in self.senders)
        process = self.roles[role].process
        owner = f"%:{process.pid}" if process is not None else ""  # leases are "role@host:pid"
        if role == "worker":  # a job claimed by this worker process, not one a killed worker left behind
            return bool(self._query(lambda s: s.scalar(select(func.count(Job.id)).where(
                Job.state == "processing", Job.lease_owner.like(owner)))))
        if role == "sender":
            return bool(self._query(lambda s: s.scalar(select(func.count(OutboxItem.id)).where(
                OutboxItem.state == "sending", OutboxItem.lease_owner.like(owner)))))
        return True

    def _kill(self, role: str) -> None:
        busy = self._busy(role)
        process = self.roles[role]
        process.kill()
        self.kills[role] += 1
        moment = {"receiver": "mid-association", "worker": "mid-batch", "sender": "mid-send"}.get(role, "running")
        self.kill_moments.append(f"{role} {'(' + moment + ')' if busy else '(idle)'}")
        self.log(f"killed {role} {'(' + moment + ')' if busy else '(idle)'}; restarting")
        process.start()
        if role == "receiver":
            process.wait_listening()

    def _choose_role(self) -> str:
        done = sum(self.kills.values())
        if done < len(self.first_kills):
            return self.first_kills[done]
        sender_budget = self.sender_kills
        sending = any(sender.is_alive() for sender in self.senders)
        roles = [r for r in self.kill_roles if not (r == "sender" and sender_budget is not None
                                                  and self.kills["sender"] >= sender_budget)
                 and not (r == "receiver" and not sending)]
        # Round-robin with a seeded shuffle: every role gets its share of the kills.
        least = min(self.kills[r] for r in roles)
        return self.random.choice([r for r in roles if self.kills[r] == least])

    def _kill_loop(self, deadline: float) -> None:
        """Kill ``kills_wanted`` times: pick a role, wait a seeded random moment when it is busy, kill it."""
        while sum(self.kills.values()) < self.kills_wanted and time.monotonic() < deadline:
            role = self._choose_role()
            time.sleep(self.random.uniform(0.2, 1.5))
            wait_until = time.monotonic() + 20
            while time.monotonic() < wait_until and not self._busy(role):
                time.sleep(0.02)
            if role != "receiver":  # an association is short: kill the receiver the moment one is half-way
                time.sleep(self.random.uniform(0.0, 0.3))
            self._kill(role)
            # Give the restarted role time to load (the worker imports torch) before the next kill.
            time.sleep(self.random.uniform(1.0, 3.0))

    def _quiet(self) -> tuple[bool, str]:
        def state(session: Any) -> tuple[bool, str]:
            unfinished_studies = session.scalar(select(func.count(Study.id)).where(
                Study.revision > Study.queued_revision)) or 0
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            outbox = dict(session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
            busy = (unfinished_studies or jobs.get("queued") or jobs.get("processing")
                    or outbox.get("pending") or outbox.get("sending"))
            return not busy, f"studies waiting {unfinished_studies}, jobs {jobs}, outbox {outbox}"
        return self._query(state)

    def run(self, timeout: float = 600.0, quiesce_timeout: float = 180.0) -> RunReport:
        started = time.monotonic()
        self.start()
        try:
            for sender in self.senders:
                sender.start()
            killer = threading.Thread(target=self._kill_loop, args=(started + timeout,), daemon=True)
            killer.start()
            for sender in self.senders:
                sender.join(max(1.0, started + timeout - time.monotonic()))
            killer.join(max(1.0, started + timeout - time.monotonic()))
            deadline = time.monotonic() + quiesce_timeout
            quiet_since = None
            detail = ""
            while time.monotonic() < deadline:
                quiet, detail = self._quiet()
                if quiet:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 3:  # quiet for a moment: nothing left in flight
                        break
                else:
                    quiet_since = None
                time.sleep(0.5)
            self.log(f"quiescence: {detail}")
            return self.check(time.monotonic() - started)
        finally:
            self.stop()

    # -- the invariants ------------------------------------------------------------------------------
    def check(self, seconds: float) -> RunReport:
        violations: list[str] = []
        for sender in self.senders:
            violations += [e for e in sender.errors if "gave up" in e]
        acknowledged = {sop: plan for plan in self.plans for sop in plan.acknowledged}

        def index_rows(session: Any) -> dict[str, tuple[str, int]]:
            return {sop: (path, size) for sop, path, size in session.execute(
                select(Instance.sop_instance_uid, Instance.spool_path, Instance.size_bytes))}

        indexed = self._query(index_rows)
        stored = 0
        for sop in acknowledged:
            if sop not in indexed:
                violations.append(f"acknowledged instance {sop} is not in the index")
                continue
            path, size = indexed[sop]
            file = self.config.spool_dir / path
            if not file.exists() or file.stat().st_size != size:
                violations.append(f"acknowledged instance {sop} is missing or short in the spool ({path})")
                continue
            stored += 1

        def pipeline_rows(session: Any) -> tuple[list[Any], list[Any], dict[int, int]]:
            jobs = session.execute(select(Job.id, Job.state, Job.study_revision, Job.last_error,
                                          Study.study_instance_uid)
                                   .join(Study, Study.id == Job.study_id)).all()
            outbox = session.execute(select(OutboxItem.job_id, OutboxItem.study_instance_uid,
                                            OutboxItem.sop_instance_uid, OutboxItem.kind, OutboxItem.state)).all()
            analysed = dict(session.execute(select(ImageResultRow.job_id, func.count()).where(
                ImageResultRow.state == "analysed").group_by(ImageResultRow.job_id)).all())
            return jobs, outbox, analysed

        jobs, outbox, analysed = self._query(pipeline_rows)
        stuck = [job for job in jobs if job.state in ("queued", "processing")]
        stuck_outbox = [row for row in outbox if row.state in ("pending", "sending")]
        for job in stuck:
            violations.append(f"job {job.id} left {job.state}")
        for row in stuck_outbox:
            violations.append(f"delivery of {row.kind} {row.sop_instance_uid} left {row.state}")
        for job in jobs:
            if job.state == "failed":
                violations.append(f"job {job.id} failed: {job.last_error}")
        dead = [row for row in outbox if row.state == "dead"]
        violations += [f"delivery of {row.kind} {row.sop_instance_uid} dead-lettered" for row in dead]

        sr_total = sc_total = expected_sc = duplicates = superseded = 0
        outbox_by_study: dict[str, set[str]] = collections.defaultdict(set)
        for row in outbox:
            outbox_by_study[row.study_instance_uid].add(row.sop_instance_uid)
        for plan in self.plans:
            study_jobs = [job for job in jobs if job.study_instance_uid == plan.study_uid and job.state == "done"]
            if not study_jobs:
                violations.append(f"study {plan.study_uid} was never analysed")
                continue
            current = max(study_jobs, key=lambda job: (job.study_revision, job.id))
            superseded += len({job.study_revision for job in study_jobs}) - 1
            current_rows = [row for row in outbox if row.job_id == current.id]
            current_sr = {row.sop_instance_uid for row in current_rows if row.kind == "SR"}
            current_sc = {row.sop_instance_uid for row in current_rows if row.kind == "SC"}
            expected_sc += analysed.get(current.id, 0)
            if analysed.get(current.id, 0) != len(plan.acknowledged):
                violations.append(f"study {plan.study_uid}: {analysed.get(current.id, 0)} images analysed, "
                                  f"{len(plan.acknowledged)} acknowledged")
            at_pacs = self._pacs_instances(plan.study_uid)
            sr_at = {sop for sop, modality in at_pacs.items() if modality == "SR"}
            sc_at = {sop for sop, modality in at_pacs.items() if modality == "OT"}
            sr_total += len(sr_at)
            sc_total += len(sc_at & current_sc)
            if len(current_sr) != 1 or not current_sr <= sr_at:
                violations.append(f"study {plan.study_uid}: current SR not at the PACS exactly once")
            if current_sc != (sc_at & current_sc) or len(current_sc) != analysed.get(current.id, 0):
                violations.append(f"study {plan.study_uid}: {len(sc_at & current_sc)} of the current SCs at the "
                                  f"PACS, {analysed.get(current.id, 0)} images analysed")
            unknown = set(at_pacs) - outbox_by_study[plan.study_uid]
            if unknown:
                duplicates += len(unknown)
                violations.append(f"study {plan.study_uid}: {len(unknown)} object(s) at the PACS the node never "
                                  "recorded (a retry built new UIDs)")
            series = self._pacs_series(plan.study_uid)
            if any(len(s["Instances"]) != 1 for s in series if s["MainDicomTags"].get("Modality") == "SR"):
                duplicates += 1
                violations.append(f"study {plan.study_uid}: an SR series holds more than one SR")

        return RunReport(
            seed=self.seed, kills=dict(self.kills), kill_moments=self.kill_moments, studies=len(self.plans),
            instances_sent=sum(len(p.instances) for p in self.plans), acknowledged=len(acknowledged),
            stored=stored, sr_at_pacs=sr_total, sc_at_pacs=sc_total, expected_sc=expected_sc,
            duplicates=duplicates, stuck=len(stuck) + len(stuck_outbox), superseded_revisions=superseded,
            violations=violations, seconds=seconds,
        )

    def _pacs_study(self, study_uid: str) -> str | None:
        found = self.orthanc._request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
        return next((item["ID"] for item in found if item["Type"] == "Study"), None)

    def _pacs_series(self, study_uid: str) -> list[dict[str, Any]]:
        study = self._pacs_study(study_uid)
        return self.orthanc.study_series(study) if study else []

    def _pacs_instances(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> modality of everything Orthanc holds for the study."""
        study = self._pacs_study(study_uid)
        if study is None:
            return {}
        instances = self.orthanc.get(f"/studies/{study}/instances?expand")
        modality_of_series = {s["ID"]: s["MainDicomTags"].get("Modality", "") for s in self.orthanc.study_series(study)}
        return {i["MainDicomTags"]["SOPInstanceUID"]: modality_of_series.get(i["ParentSeries"], "") for i in instances}


# -- load: many senders while the worker runs inference ---------------------------------------------
def _send_load(port: int, sender: int, instances: int, per_study: int, size: int) -> tuple[list[float], list[str], int]:
    """One sending process: ``instances`` C-STOREs in studies of ``per_study`` (one association per study).

    Returns (response times in seconds of the acknowledged C-STOREs, their SOP Instance UIDs, failures).
    Runs in its own process so that the senders' own GIL does not inflate the node's measured latency.
    """
    times: list[float] = []
    acknowledged: list[str] = []
    failures = 0
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    sent = 0
    study = 0
    while sent < instances:
        count = min(per_study, instances - sent)
        study_uid, series_uid = generate_uid(), generate_uid()
        batch = [small_instance(study_uid=study_uid, series_uid=series_uid, rows=size, columns=size,
                                seed=sender * 100_000 + sent + i, instance_number=i + 1) for i in range(count)]
        for dataset in batch:
            dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ae.requested_contexts = []
        ae.add_requested_context(batch[0].SOPClassUID, ImplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
        if not assoc.is_established:
            failures += count
            sent += count
            continue
        from node.dicom.scu import set_tcp_nodelay

        set_tcp_nodelay(assoc)
        try:
            for dataset in batch:
                started = time.perf_counter()
                status = assoc.send_c_store(dataset)
                elapsed = time.perf_counter() - started
                if status is not None and status.get("Status") == 0x0000:
                    times.append(elapsed)
                    acknowledged.append(dataset.SOPInstanceUID)
                else:
                    failures += 1
        finally:
            if assoc.is_established:
                assoc.release()
        sent += count
        study += 1
    return times, acknowledged, failures


_STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%q} %m%n
"""


def _send_load_storescu(port: int, sender: int, instances: int, per_study: int,
                        size: int, required_contexts_only: bool = False) -> tuple[list[float], list[str], int]:
    """As :func:`_send_load`, but DCMTK ``storescu`` sends (one run per study, TCP_NODELAY): a C sender that,
    like a PACS on another machine, takes almost no CPU from the node. Each C-STORE's time is read from
    storescu's own log (millisecond timestamps): "Sending Store Request" to "Received Store Response".

    By default storescu proposes 128 presentation contexts (every storage SOP class it knows) on each
    association; ``required_contexts_only`` (``--required``) proposes only those of the files it sends."""
    import re
    import subprocess
    import tempfile

    times: list[float] = []
    acknowledged: list[str] = []
    failures = 0
    line_pattern = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) (Sending Store Request \(MsgID (\d+)"
                              r"|Received Store Response \((\w+))")
    with tempfile.TemporaryDirectory(prefix=f"load-storescu-{sender}-") as work:
        config = Path(work) / "log.cfg"
        config.write_text(_STORESCU_LOG_CONFIG)
        sent = 0
        while sent < instances:
            count = min(per_study, instances - sent)
            study_uid, series_uid = generate_uid(), generate_uid()
            files: list[tuple[Path, str]] = []
            for i in range(count):
                dataset = small_instance(study_uid=study_uid, series_uid=series_uid, rows=size, columns=size,
                                         seed=sender * 100_000 + sent + i, instance_number=i + 1)
                path = Path(work) / f"{sent + i}.dcm"
                dataset.save_as(path, enforce_file_format=True)
                files.append((path, dataset.SOPInstanceUID))
            proposal = ["--required"] if required_contexts_only else []
            run = subprocess.run(
                ["storescu", *proposal, "-lc", str(config), "-aet", SENDER_AE, "-aec", "MSKNODE", "127.0.0.1",
                 str(port), *[str(path) for path, _ in files]],
                capture_output=True, text=True, timeout=600, env={**os.environ, "TCP_NODELAY": "1"})
            started: dict[int, float] = {}
            last_sent = 0
            answered = 0
            for line in run.stdout.splitlines() + run.stderr.splitlines():
                match = line_pattern.match(line)
                if not match:
                    continue
                hours, minutes, seconds, millis = (int(match.group(i)) for i in range(1, 5))
                at = hours * 3600 + minutes * 60 + seconds + millis / 1000
                if match.group(6):
                    last_sent = int(match.group(6))
                    started[last_sent] = at
                elif last_sent in started:
                    elapsed = (at - started.pop(last_sent)) % 86400
                    if match.group(7) == "Success":
                        times.append(elapsed)
                        acknowledged.append(files[last_sent - 1][1])
                        answered += 1
            failures += count - answered
            for path, _ in files:
                path.unlink()
            sent += count
    return times, acknowledged, failures


SENDER_TOOLS: dict[str, Callable[[int, int, int, int, int], tuple[list[float], list[str], int]]] = {
    "pynetdicom": _send_load, "storescu": _send_load_storescu,
    "storescu-required": functools.partial(_send_load_storescu, required_contexts_only=True),
}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 1600 is the 1584th value)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]


@dataclass
class LoadReport:
    senders: int
    per_sender: int
    acknowledged: int
    failures: int
    indexed: int
    spool_files: int
    duplicate_sops: int
    missing: int
    jobs_done_during: int
    worker_busy_fraction: float
    times: list[float]
    wall_seconds: float

    def table(self) -> str:
        ms = [t * 1000 for t in self.times]
        rows = [
            ("senders x instances", f"{self.senders} x {self.per_sender}"),
            ("acknowledged / failed", f"{self.acknowledged} / {self.failures}"),
            ("in the index / files in the spool", f"{self.indexed} / {self.spool_files}"),
            ("acknowledged but missing / duplicated", f"{self.missing} / {self.duplicate_sops}"),
            ("C-STORE response p50 / p95 / p99 / max (ms)",
             " / ".join(f"{value:.1f}" for value in (percentile(ms, .5), percentile(ms, .95), percentile(ms, .99),
                                                      max(ms or [0])))),
            ("throughput (instances/s)", f"{self.acknowledged / self.wall_seconds:.0f}"),
            ("jobs finished by the worker meanwhile", self.jobs_done_during),
            ("samples with a job processing", f"{self.worker_busy_fraction:.0%}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_load(directory: Path, model: Path, *, senders: int, per_sender: int, per_study: int = 20, size: int = 256,
             warm_studies: int = 4, database_url: str | None = None, worker: bool = True,
             worker_nice: int | None = None, sender_tool: str = "pynetdicom",
             log: Callable[[str], None] = lambda _m: None) -> LoadReport:
    """A node (receiver, scheduler, worker under the supervisor) takes ``senders`` x ``per_sender`` C-STOREs
    from concurrent sending processes while its worker analyses the studies already received."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tests.helpers.node import NodeProcess

    roles = ("receiver", "scheduler", "worker") if worker else ("receiver", "scheduler")
    config = CrashConfig(directory=directory / "node", roles=roles,
                         peers=(Peer("modality", SENDER_AE),), max_associations=senders + 4,
                         database_url=database_url)
    config.model = model
    config.worker_nice = worker_nice  # None: the node's default, inference under SCHED_IDLE
    config.settle_seconds = 1.0
    config.poll_seconds = 1.0  # the default: the load run measures the node as deployed
    node = NodeProcess(config).start(timeout=180)
    try:
        # Work for the worker first: studies that are analysed while the load runs.
        warm = plan_studies(warm_studies, 4, seed=99, size=size)
        StudySender(config.port, warm).run()

        def jobs(*states: str) -> int:
            from storage.db import Database

            database = Database(config.url)
            try:
                with database.session() as session:
                    return int(session.scalar(select(func.count(Job.id)).where(Job.state.in_(states))) or 0)
            finally:
                database.dispose()

        def processing() -> int:
            return jobs("processing")

        def done_jobs() -> int:
            return jobs("done")

        deadline = time.monotonic() + 120
        while worker and not jobs("processing", "done") and time.monotonic() < deadline:
            time.sleep(0.1)
        log("worker busy; starting the senders" if worker else "no worker (baseline); starting the senders")

        done_before = done_jobs()
        busy_samples: list[bool] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                busy_samples.append(processing() > 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        with ProcessPoolExecutor(senders, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(SENDER_TOOLS[sender_tool], config.port, i, per_sender, per_study, size)
                       for i in range(senders)]
            results = [future.result() for future in futures]
        wall = time.monotonic() - started
        sampling.set()
        sampler.join()
        jobs_during = done_jobs() - done_before

        times = [t for result in results for t in result[0]]
        acknowledged = [sop for result in results for sop in result[1]]
        failures = sum(result[2] for result in results)
        warm_sops = {i.SOPInstanceUID for plan in warm for i in plan.instances}
        rows = [row for row in node.instances() if row.sop_instance_uid not in warm_sops]
        indexed = collections.Counter(row.sop_instance_uid for row in rows)
        # Spool files are named <SOP Instance UID>.<sha256 prefix>.dcm: count the load's files per SOP.
        files_per_sop = collections.Counter(
            path.name.split(".dcm")[0].rsplit(".", 1)[0] for path in node.spool_files())
        sent = set(acknowledged)
        files = sum(count for sop, count in files_per_sop.items() if sop in sent)
        missing = [sop for sop in acknowledged if sop not in indexed]
        missing += [row.sop_instance_uid for row in rows
                    if not (node.spool / row.spool_path).exists()
                    or (node.spool / row.spool_path).stat().st_size != row.size_bytes]
        duplicates = (sum(count - 1 for count in indexed.values())
                      + sum(count - 1 for sop, count in files_per_sop.items() if sop in sent)
                      + len(acknowledged) - len(sent))
        return LoadReport(
            senders=senders, per_sender=per_sender, acknowledged=len(acknowledged), failures=failures,
            indexed=len(indexed), spool_files=files, duplicate_sops=duplicates, missing=len(missing),
            jobs_done_during=jobs_during,
            worker_busy_fraction=sum(busy_samples) / max(1, len(busy_samples)), times=times, wall_seconds=wall,
        )
    finally:
        node.stop(timeout=60)
