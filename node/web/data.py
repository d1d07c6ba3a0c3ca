"""The database reads behind the dashboard pages (studies, images, deliveries, associations, queues).

Pages address studies by their database id only: no UID, accession or patient identifier ever goes into a
URL, so none ends up in proxy logs or browser history.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from node.results.knee_codes import FINDINGS
from node.settings import PRIORITIES
from storage.db import Database, as_utc
from storage.models import Association, ImageResultRow, Instance, Job, OutboxItem, Series, Study
from storage.status import attention_items, queue_depths
from storage.studies import latest_job, studies_with_instance_counts


KNEE_FINDING_LABELS = tuple(finding.label for finding in FINDINGS)


def priority_name(value: int | None) -> str:
    return PRIORITIES[max(0, min(value or 0, len(PRIORITIES) - 1))]


VOLUME_MODEL_CONFIG = "orthodiffusion.json"  # a 3-D (OrthoDiffusion) model folder lists its heads here


def head_labels(model_dir: Path) -> dict[str, list[str]]:
    """Label names of the model's heads (``heads/<name>.json``, or a 3-D model's ``orthodiffusion.json`` whose heads
    default to the knee findings), to name the probabilities stored per image."""
    labels: dict[str, list[str]] = {}
    try:
        for head in json.loads((Path(model_dir) / VOLUME_MODEL_CONFIG).read_text()).get("heads", []):
            labels[str(head["name"])] = [str(label) for label in head.get("labels") or KNEE_FINDING_LABELS]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # not a 3-D model folder (or a broken one, which the worker reports)
    for path in sorted((Path(model_dir) / "heads").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            labels[str(data["name"])] = [str(label) for label in data["labels"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return labels


def findings(heads: dict[str, list[float]] | None, labels: dict[str, list[str]]) -> list[tuple[str, str, float]]:
    """(head, label, probability) per head: the most probable class, or the one sigmoid output."""
    result = []
    for name, probabilities in (heads or {}).items():
        if not probabilities:
            continue
        names = labels.get(name) or [f"{name}[{i}]" for i in range(len(probabilities))]
        best = max(range(len(probabilities)), key=lambda i: probabilities[i])
        label = names[best] if best < len(names) else str(best)
        result.append((name, label, float(probabilities[best])))
    return result


def model_findings(outputs: dict[str, Any] | None, labels: dict[str, dict[str, list[str]]],
                   first: str | None) -> list[tuple[str, str, float]]:
    """Findings of an image row: every model's heads (``outputs["models"]``), named ``<model>.<head>`` except the
    first configured model's; rows written before several models (only ``outputs["heads"]``) as before."""
    outputs = outputs or {}
    per_model = outputs.get("models")
    if not per_model:
        return findings(outputs.get("heads"), labels.get(first or "", {}))
    result = []
    for model, values in per_model.items():
        for head, label, probability in findings((values or {}).get("heads"), labels.get(model, {})):
            result.append((head if model == first else f"{model}.{head}", label, probability))
    return result


def every_label(outputs: dict[str, Any] | None, labels: dict[str, dict[str, list[str]]],
                first: str | None) -> list[tuple[str, str, float]]:
    """(head, label, probability) for every output of every head of an image row, not only the most probable: a
    3-D model's finding head is one sigmoid per label (ACL, PCL, ... EFFU), several of which can be present."""
    outputs = outputs or {}
    per_model = outputs.get("models") or {first or "": {"heads": outputs.get("heads")}}
    result = []
    for model, values in per_model.items():
        for head, probabilities in ((values or {}).get("heads") or {}).items():
            names = labels.get(model, {}).get(head) or []
            name = head if model == first else f"{model}.{head}"
            result.extend((name, names[i] if i < len(names) else f"{head}[{i}]", float(p))
                          for i, p in enumerate(probabilities or []))
    return result


@dataclass
class StudyRow:
    id: int
    study_instance_uid: str  # for the spool only; pages never put it in a URL
    accession_number: str | None
    study_date: str | None
    status: str
    status_reason: str | None
    priority: str
    priority_reason: str | None
    last_received: str
    instances: int
    modalities: list[str]
    body_parts: list[str]
    max_score: float | None = None
    max_percentile: float | None = None
    findings: list[tuple[str, str, float]] = field(default_factory=list)
    job_state: str | None = None


@dataclass
class ImageRow:
    instance_id: int
    instance_number: int | None
    modality: str | None
    body_part: str | None
    sop_instance_uid: str
    state: str | None
    reason: str | None
    score: float | None
    percentile: float | None
    findings: list[tuple[str, str, float]]
    region: list | None
    labels: list[tuple[str, str, float]] = field(default_factory=list)  # every label (MR rows: the 3-D model's)


@dataclass
class SelectionRow:
    """One series of an MR study's series selection, as the study page shows it (no UIDs)."""

    plane: str
    chosen: bool
    series_number: int | None
    description: str
    slices: int | None
    score: float | None
    detail: str  # chosen: the rules that matched; rejected: the reasons


def selection_rows(selection: dict[str, Any] | None) -> list[SelectionRow]:
    """A stored selection report (``SelectionReport.to_dict()``) as table rows; planes left without a series get a
    row saying why."""
    if not selection:
        return []
    rows = [SelectionRow(plane, True, item.get("series_number"), item.get("description") or "", item.get("slices"),
                         item.get("score"),
                         ", ".join(f"{r['name']} {r['score']:+g}" for r in item.get("matched_rules", [])))
            for plane, item in selection.get("chosen", {}).items()]
    rows += [SelectionRow(plane, False, None, "(none)", None, None, why)
             for plane, why in selection.get("missing_planes", {}).items()]
    rows += [SelectionRow(item.get("plane") or item.get("nearest_plane") or "", False, item.get("series_number"),
                          item.get("description") or "", item.get("slices"), item.get("score"),
                          "; ".join(r["message"] for r in item.get("reasons", [])))
             for item in selection.get("rejected", [])]
    return rows


@dataclass
class DeliveryRow:
    id: int
    kind: str
    destination: str
    state: str
    attempts: int
    last_status: str | None
    last_error: str | None
    delivered_at: str | None


def _merge_findings(rows: list[list[tuple[str, str, float]]]) -> list[tuple[str, str, float]]:
    """A study's key findings: per head, the most confident non-"none" call over its images."""
    best: dict[str, tuple[str, str, float]] = {}
    for items in rows:
        for head, label, probability in items:
            if label.lower() in ("none", "normal", "0", "grade0", "kl0"):
                continue
            if head not in best or probability > best[head][2]:
                best[head] = (head, label, probability)
    return sorted(best.values(), key=lambda item: -item[2])


class DashboardData:
    """Read-only queries for the pages; one instance per app."""

    def __init__(self, database: Database, model_dir: Path | Sequence[tuple[str, Path]]) -> None:
        """``model_dir``: the one model's folder, or (configured name, folder) of every configured model."""
        self.db = database
        models = [("", Path(model_dir))] if isinstance(model_dir, (str, Path)) else list(model_dir)
        self.model_labels = {name: head_labels(Path(folder)) for name, folder in models}
        self.first = models[0][0] if models else ""
        self.labels = self.model_labels.get(self.first, {})

    def studies(self, limit: int = 200) -> list[StudyRow]:
        """Most urgent first, then the most recently received."""
        with self.db.session() as session:
            rows = studies_with_instance_counts(
                session, [Study.priority.desc(), Study.last_received_at.desc(), Study.id.desc()], limit)
            ids = [study.id for study, _ in rows]
            series: dict[int, list[tuple[str | None, str | None]]] = {}
            for study_id, modality, body_part in session.execute(
                select(Series.study_id, Series.modality, Series.body_part_examined).where(Series.study_id.in_(ids))
            ).all():
                series.setdefault(study_id, []).append((modality, body_part))
            latest = (
                select(func.max(Job.id).label("job_id")).where(Job.study_id.in_(ids)).group_by(Job.study_id).subquery()
            )
            jobs = {job.study_id: job for job in session.scalars(select(Job).where(Job.id.in_(select(latest.c.job_id))))}
            results: dict[int, list[ImageResultRow]] = {}
            for result in session.scalars(
                select(ImageResultRow).where(ImageResultRow.job_id.in_([job.id for job in jobs.values()]),
                                             ImageResultRow.state == "analysed")
            ):
                results.setdefault(result.job_id, []).append(result)
            return [
                self._study_row(study, count, series.get(study.id, []), jobs.get(study.id),
                                results.get(jobs[study.id].id, []) if study.id in jobs else [])
                for study, count in rows
            ]

    def _study_row(self, study: Study, instances: int, series: list[tuple[str | None, str | None]],
                   job: Job | None, analysed: list[ImageResultRow]) -> StudyRow:
        """A study's summary from its series, its latest job and that job's analysed images."""
        row = StudyRow(
            id=study.id, study_instance_uid=study.study_instance_uid, accession_number=study.accession_number,
            study_date=study.study_date, status=study.status, status_reason=study.status_reason,
            priority=priority_name(study.priority), priority_reason=study.priority_reason,
            last_received=as_utc(study.last_received_at).strftime("%Y-%m-%d %H:%M:%S"),
            instances=instances, modalities=sorted({m for m, _ in series if m}),
            body_parts=sorted({b for _, b in series if b}),
        )
        if job is not None:
            row.job_state = job.state
            scores = [r.score for r in analysed if r.score is not None]
            percentiles = [p for p in ((r.outputs or {}).get("percentile") for r in analysed) if p is not None]
            row.max_score = max(scores) if scores else None
            row.max_percentile = max(percentiles) if percentiles else None
            row.findings = _merge_findings([model_findings(r.outputs, self.model_labels, self.first)
                                            for r in analysed])
        return row

    def study(self, study_id: int) -> tuple[StudyRow, str, list[ImageRow], list[DeliveryRow]] | None:
        """One study: its summary, its UID (for the spool, never shown in a URL), images and deliveries."""
        with self.db.session() as session:
            study = session.get(Study, study_id)
            if study is None:
                return None
            instances = session.scalars(
                select(Instance).where(Instance.study_instance_uid == study.study_instance_uid)
                .order_by(Instance.instance_number, Instance.id)
            ).all()
            job = latest_job(session, study.id)
            results: dict[int, ImageResultRow] = {}
            if job is not None:
                for result in session.scalars(select(ImageResultRow).where(ImageResultRow.job_id == job.id)):
                    results.setdefault(result.instance_id, result)
            series = session.execute(
                select(Series.modality, Series.body_part_examined).where(Series.study_id == study.id)
            ).all()
            row = self._study_row(study, len(instances), [tuple(item) for item in series], job,
                                  [r for r in results.values() if r.state == "analysed"])
            images = []
            for instance in instances:
                result = results.get(instance.id)
                outputs = (result.outputs or {}) if result is not None else {}
                images.append(
                    ImageRow(
                        instance_id=instance.id, instance_number=instance.instance_number, modality=instance.modality,
                        body_part=instance.body_part_examined, sop_instance_uid=instance.sop_instance_uid,
                        state=result.state if result else None, reason=result.reason if result else None,
                        score=result.score if result else None, percentile=outputs.get("percentile"),
                        findings=model_findings(outputs, self.model_labels, self.first), region=outputs.get("region"),
                        labels=every_label(outputs, self.model_labels, self.first) if "plane" in outputs else [],
                    )
                )
            deliveries = [
                DeliveryRow(
                    item.id, item.kind, item.destination, item.state, item.attempts, item.last_status, item.last_error,
                    as_utc(item.delivered_at).strftime("%Y-%m-%d %H:%M:%S") if item.delivered_at else None,
                )
                for item in session.scalars(
                    select(OutboxItem).where(OutboxItem.study_instance_uid == study.study_instance_uid)
                    .order_by(OutboxItem.id)
                )
            ]
            return row, study.study_instance_uid, images, deliveries

    def series_selection(self, study_id: int) -> list[SelectionRow]:
        """An MR study's series selection (the latest job's): chosen series per plane first, then each rejected
        series with its reasons; empty for studies without one (radiographs, MR without a 3-D model)."""
        with self.db.session() as session:
            job = latest_job(session, study_id)
            selection = job.series_selection if job is not None else None
        return selection_rows(selection)

    def study_uid(self, study_id: int) -> str | None:
        with self.db.session() as session:
            return session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))

    def associations(self, limit: int = 200) -> list[Association]:
        with self.db.session() as session:
            return list(session.scalars(select(Association).order_by(Association.started_at.desc()).limit(limit)))

    def queue(self) -> dict[str, Any]:
        """Queue depths by state, and failed jobs and dead letters with the study they belong to."""
        items = attention_items(self.db, limit=200)
        uids = {item["study_instance_uid"] for item in items}
        with self.db.session() as session:
            studies = {
                uid: (study_id, accession)
                for uid, study_id, accession in session.execute(
                    select(Study.study_instance_uid, Study.id, Study.accession_number)
                    .where(Study.study_instance_uid.in_(uids))
                ).all()
            } if uids else {}
        for item in items:
            item["number"] = int(str(item["id"]).split(":", 1)[1])
            item["study_id"], item["accession"] = studies.get(item["study_instance_uid"], (None, None))
        return {"depths": queue_depths(self.db), "items": items}
