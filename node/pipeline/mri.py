"""The worker's MRI path: an MR study with a 3-D model configured becomes SR + overlay SCs + SEG, or "not analysed"
with its reasons.

Why a path of its own: a 3-D model (``engines.family.VolumeModelFamily``, e.g. OrthoDiffusion) takes one assembled
volume per plane of a study, not a batch of 2-D frames, so nothing of the radiograph path's per-image batching
applies. The steps, for one claimed job:

1. every header of the study is read with ``stop_before_pixels``; results (ours, another AI's) are skipped;
2. :func:`node.pipeline.series_selection.select_series` chooses one series per plane (``[mri]``), recording
   every rejected series with its reasons;
3. the chosen series of the planes the model needs are read with their pixels, one at a time, and assembled
   (``engines.imaging.volume.assemble_volume``: geometry checked, slices sorted along the normal);
4. the model gives the fused embedding, its heads and (when it has one) a label volume on one plane's grid;
5. the builders of ``node/results`` make the findings SR, the overlay SCs and the SEG (deterministic UIDs), which
   go to the spool and the outbox in the transaction that records the results and the selection report.

A missing plane, a series that is not one clean volume, or a model that refuses its input ends the study as
``not_analysed`` with the reason (never a crash, never a retry loop); the selection report is stored either way
(``jobs.series_selection``), so ``msknode studies`` and the dashboard show why.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from engines.imaging.volume import Volume, VolumeError, assemble_volume
from node.delivery.notifier import build_payload, entries_for
from node.dicom.provenance import RESULT_KINDS, ResultRecognition, classify
from node.pipeline.eligibility import job_bound_reason
from node.pipeline.models import ConfiguredModel, applicability_reason
from node.pipeline.series_selection import SelectionReport, select_series
from node.pipeline.triage import PriorityDecision, Triage, header_text, model_study_values, study_attributes, summarise
from node.results.knee_codes import FINDINGS_BY_LABEL, STRUCTURES, Structure, structures_for
from node.results.model import DocumentReference, ModelInfo, StudyResult
from node.results.mri_model import FindingResult, MRIStudyResult, PlaneSeries, SegmentationResult, frame_view
from node.results.mri_sc import build_overlay_scs
from node.results.mri_sr import build_mri_sr
from node.results.seg import build_seg
from node.results.sr import build_not_analysed_sr
from node.runtime.faults import fault_point
from node.settings import PRIORITIES, PeerSettings, Settings
from storage.job_inputs import JobInput, JobInputs
from storage.notifications import NotificationEntry
from storage.queue import ClaimedJob, ImageOutcome, JobQueue, OutboxEntry
from storage.spool import Spool

log = logging.getLogger("msknode.worker.mri")

#: Series numbers of the MRI results, after ``[results] series_number_base`` (the SR's): SCs +1 as for radiographs,
#: the SEG +2.
SC_OFFSET, SEG_OFFSET = 1, 2
#: In a study that also holds radiographs, their SR and SCs take ``base`` and ``base + 1``: the MR findings SR and
#: overlay SCs move to +3 and +4 (the SEG keeps +2), so no two series of the study share a number.
MIXED_SR_OFFSET = 3


@dataclass(frozen=True)
class SeriesNumbers:
    """The series numbers of one MR result set."""

    sr: int
    sc: int
    seg: int

    @classmethod
    def for_study(cls, base: int, mixed: bool) -> SeriesNumbers:
        sr = base + MIXED_SR_OFFSET if mixed else base
        return cls(sr, sr + SC_OFFSET, base + SEG_OFFSET)


class NotAnalysed(Exception):
    """The study cannot be analysed as it is (a missing plane, a broken series, input the model refuses)."""


@dataclass
class MriOutcome:
    """What one MR job came to: its state and reason, per-instance outcomes, objects to queue, the selection."""

    state: str = "done"
    reason: str | None = None
    outcomes: list[ImageOutcome] = field(default_factory=list)
    objects: list[tuple[str, Dataset]] = field(default_factory=list)
    selection: SelectionReport | None = None
    decision: PriorityDecision | None = None
    notifications: list[NotificationEntry] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, logged at DEBUG (profiling)
    outbox: list[OutboxEntry] = field(default_factory=list)  # the written objects (mixed study: recorded by the worker)
    instance_ids: set[int] = field(default_factory=set)  # the MR inputs this outcome covers
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        """Record the seconds since the previous lap under ``stage``."""
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now


def _dataset_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _series_label(headers: Sequence[Dataset]) -> str:
    number = headers[0].get("SeriesNumber") if headers else None
    return f"series {number}" if number not in (None, "") else "a series"


def segment_structures(class_names: Sequence[str] | None) -> tuple[Structure, ...]:
    """The SEG's segments for a model's label layout: its ``class_names`` (class 0 is background) looked up in
    node/results/knee_codes.py, or the default 11-structure layout when the model names none."""
    if not class_names:
        return STRUCTURES
    names = list(class_names)
    if names[0].strip().lower() in ("background", "bg", "0", ""):
        names = names[1:]
    return structures_for([name.strip().lower() for name in names])


class MriPipeline:
    """The MRI path of one worker process (it holds the worker's configured 3-D models)."""

    def __init__(self, settings: Settings, queue: JobQueue, job_inputs: JobInputs, spool: Spool,
                 models: Sequence[ConfiguredModel], *, owner: str, peers: Callable[[], Sequence[PeerSettings]],
                 recognition: ResultRecognition, triage: Callable[[], Triage],
                 model_info: Callable[[Any], ModelInfo], record_seconds: Callable[[float], None]) -> None:
        self.settings = settings
        self.queue = queue
        self.job_inputs = job_inputs
        self.spool = spool
        self.models = list(models)  # every configured model, in configuration order (triage names them all)
        self.volume_models = [cm for cm in self.models if cm.volumetric]
        self.owner = owner
        self.peers = peers
        self.recognition = recognition
        self.triage = triage
        self.model_info = model_info
        self.record_seconds = record_seconds
        self.modalities = {m.upper() for m in settings.mri.modalities}

    # -- entry point -------------------------------------------------------------------------------------------
    def _mr_inputs(self, job: ClaimedJob) -> list[JobInput] | None:
        """The study's inputs when it holds an MR instance (modality as indexed at intake), else None."""
        try:
            inputs = self.job_inputs.inputs(job.study_instance_uid)
        except Exception:  # the radiograph path lists the inputs again and hands the job back on failure
            return None
        if not any((item.modality or "").strip().upper() in self.modalities for item in inputs):
            return None
        return inputs

    def wants(self, job: ClaimedJob) -> bool:
        """Whether the MRI path analyses (part of) ``job`` (its study holds MR instances): a 3-D pass of its own."""
        return self._mr_inputs(job) is not None

    def _radiograph_inputs(self, inputs: Sequence[JobInput]) -> list[JobInput]:
        """The study's instances the radiograph path may analyse: a modality of ``[eligibility] modalities`` as
        indexed at intake, when a 2-D model is configured."""
        if not any(not cm.volumetric for cm in self.models):
            return []
        eligible = {m.upper() for m in self.settings.eligibility.modalities} - self.modalities
        return [item for item in inputs if (item.modality or "").strip().upper() in eligible]

    def process(self, job: ClaimedJob) -> bool:
        """Handle ``job`` if its study holds only MR instances (True: done here, recorded or handed back); False
        leaves the job to the radiograph path (which calls :meth:`analyse_mr_part` when the study mixes both)."""
        inputs = self._mr_inputs(job)
        if inputs is None or self._radiograph_inputs(inputs):
            return False
        started = time.perf_counter()
        result = self._analyse_and_write(job, inputs, SeriesNumbers.for_study(
            self.settings.results.series_number_base, mixed=False))
        outbox = result.outbox
        decision = result.decision or self._starting(job, inputs, result.state)
        fault_point("worker.before_finish")
        if not self.queue.record_results(
                job.id, self.owner, result.state, result.outcomes, outbox, reason=result.reason,
                priority=decision.rank, priority_reason=decision.reason, notifications=result.notifications,
                series_selection=None if result.selection is None else result.selection.to_dict()):
            log.warning("job %d: results dropped (its lease was lost, or a newer revision of study %s is "
                        "processing or finished)", job.id, job.study_instance_uid)
            return True
        log.info("job %d (study %s, MRI): %s%s, %d object(s) queued in %.1f s", job.id, job.study_instance_uid,
                 result.state, f" ({result.reason})" if result.reason else "", len(outbox),
                 time.perf_counter() - started)
        log.debug("stage timings job %d: %s", job.id, ", ".join(f"{stage} {seconds:.3f} s"
                                                                 for stage, seconds in result.timings.items()))
        return True

    def analyse_mr_part(self, job: ClaimedJob, inputs: Sequence[JobInput]) -> MriOutcome | None:
        """For a study mixing MR series with radiographs: its MR instances analysed and the results written to the
        spool (series numbers after the radiographs', :data:`MIXED_SR_OFFSET`), not recorded: the radiograph path
        records both parts in one transaction, as one study revision. None when the study is not mixed."""
        mr = [item for item in inputs if (item.modality or "").strip().upper() in self.modalities]
        if not mr or not self._radiograph_inputs(inputs):
            return None
        result = self._analyse_and_write(job, mr, SeriesNumbers.for_study(
            self.settings.results.series_number_base, mixed=True))
        result.decision = result.decision or self._starting(job, mr, result.state)
        log.info("job %d (study %s): MR part %s%s, %d object(s) written; the radiographs follow", job.id,
                 job.study_instance_uid, result.state, f" ({result.reason})" if result.reason else "",
                 len(result.objects))
        return result

    def _analyse_and_write(self, job: ClaimedJob, inputs: Sequence[JobInput], numbers: SeriesNumbers) -> MriOutcome:
        try:
            result = self._analyse(job, inputs, numbers)
        except Exception as exc:
            log.exception("job %d: MRI analysis failed", job.id)
            result = MriOutcome("failed", f"MRI analysis failed: {type(exc).__name__}: {exc}"[:500],
                                outcomes=[ImageOutcome(item.instance_id, "failed", "MRI analysis failed")
                                          for item in inputs])
        result.instance_ids = {item.instance_id for item in inputs}
        result.lap("other")
        result.outbox = self._write(job, result.objects)
        result.lap("write")
        return result

    # -- the steps ---------------------------------------------------------------------------------------------
    def _analyse(self, job: ClaimedJob, inputs: Sequence[JobInput], numbers: SeriesNumbers | None = None
                 ) -> MriOutcome:
        numbers = numbers or SeriesNumbers.for_study(self.settings.results.series_number_base, mixed=False)
        result = MriOutcome()
        too_many = job_bound_reason(len(inputs), 0, self.settings.pipeline)
        if too_many:  # not even the headers are read
            result.outcomes = [ImageOutcome(item.instance_id, "ineligible", too_many) for item in inputs]
            result.state, result.reason = "not_analysed", too_many
            return result
        by_series: dict[str, list[tuple[JobInput, Dataset]]] = {}
        for item in inputs:
            try:
                header = pydicom.dcmread(self.spool.absolute(item.spool_path), stop_before_pixels=True)
            except Exception as exc:
                result.outcomes.append(ImageOutcome(item.instance_id, "failed", f"unreadable: {type(exc).__name__}"))
                continue
            if classify(header, True, self.recognition)[0] in RESULT_KINDS:
                continue  # a result indexed before intake recorded kinds: never an input
            modality = str(header.get("Modality", "")).strip().upper()
            if modality not in self.modalities:
                result.outcomes.append(ImageOutcome(item.instance_id, "ineligible",
                                                    f"modality {modality or 'missing'} in an MR study: not analysed"))
                continue
            by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((item, header))
        if not by_series:
            return self._not_analysed(job, result, {}, "no readable MR instance", numbers=numbers)

        first = next(iter(by_series.values()))[0]
        calling_ae = (first[0].calling_ae_title or "").strip()
        peer = next((p for p in self.peers() if calling_ae and p.ae_title == calling_ae), None)
        rules = self.settings.eligibility
        if rules.peers and (peer.name if peer else None) not in rules.peers:
            return self._not_analysed(job, result, by_series,
                                      f"sender {peer.name if peer else 'unknown'} is not configured for analysis",
                                      numbers=numbers)
        configured, why_not = None, []
        for candidate in self.volume_models:
            excluded = applicability_reason(first[1], candidate.entry)
            if excluded is None:
                configured = candidate
                break
            why_not.append(f"{candidate.name}: {excluded}")
        if configured is None:
            return self._not_analysed(job, result, by_series,
                                      "no configured 3-D model applies (" + "; ".join(why_not) + ")", numbers=numbers)

        result.lap("headers")
        report = select_series({uid: [h for _, h in pairs] for uid, pairs in by_series.items()}, self.settings.mri)
        result.lap("selection")
        result.selection = report
        rejected = {d.facts.series_instance_uid: "; ".join(r.message for r in d.reasons) for d in report.rejected}
        model = configured.model
        needed = tuple(model.plane_names)
        try:
            missing = [plane for plane in needed if report.series_for(plane) is None]
            if missing:
                raise NotAnalysed("; ".join(
                    f"no {plane} series: {report.missing_planes.get(plane, f'{plane} is not in mri.planes')}"
                    for plane in missing))
            planes, volumes = self._volumes(report, by_series, needed)
            result.lap("read and assemble")
            outputs, segmentation = self._run(configured, volumes)
            result.lap("inference")
        except NotAnalysed as exc:
            return self._not_analysed(job, result, by_series, str(exc), rejected, numbers=numbers)

        info = self.model_info(model)
        findings = self._findings(configured, outputs)
        if not findings and segmentation is None:
            return self._not_analysed(job, result, by_series, f"model {configured.name} reports no finding head and "
                                      "no segmentation: nothing to build", numbers=numbers)
        created = self.job_inputs.job_created_at(job.id) or datetime.now(timezone.utc)
        values = model_study_values(
            [(cm.name, [(None, None, outputs)] if cm is configured else [], cm.head_labels()) for cm in self.models],
            study_attributes(first[1], calling_ae or None, peer.name if peer else None))
        result.decision = self.triage().final(job.priority, calling_ae or None, peer.name if peer else None,
                                              peer.priority if peer else None, values)
        study = MRIStudyResult(
            study_instance_uid=job.study_instance_uid, planes=planes, findings=findings,
            segmentation=segmentation, model=info, created_at=created,
            priority=PRIORITIES[max(0, min(result.decision.rank, len(PRIORITIES) - 1))].upper(),
            node_name=self.settings.node.ae_title, revision=max(1, job.study_revision),
        )
        result.notifications = self._notifications(job, first[1], result.decision, values, created,
                                                   f"{info.name} {info.version}", configured)
        result.lap("triage")
        seg = build_seg(study, numbers.seg) if segmentation is not None else None
        result.lap("seg")
        if findings:
            result.objects.append(("SR", build_mri_sr(study, numbers.sr, seg=seg, previous=self._previous(job))))
        result.lap("sr")
        if seg is not None:
            if self.settings.results.send_secondary_capture:
                result.objects += [("SC", sc) for sc in build_overlay_scs(study, numbers.sc)]
            result.objects.append(("SEG", seg))
        result.lap("sc")

        chosen = {uid: plane.plane for plane in planes for uid in [plane.series_instance_uid]}
        model_outputs = {"heads": outputs, "model": configured.name}
        for uid, pairs in by_series.items():
            for item, _header in pairs:
                if uid in chosen:
                    result.outcomes.append(ImageOutcome(item.instance_id, "analysed", outputs={
                        "plane": chosen[uid], **model_outputs, "models": {configured.name: model_outputs}}))
                else:
                    reason = rejected.get(uid) or "series not used by the model"
                    result.outcomes.append(ImageOutcome(item.instance_id, "ineligible",
                                                        f"series not chosen: {reason}"[:500]))
        return result

    def _volumes(self, report: SelectionReport, by_series: Mapping[str, list[tuple[JobInput, Dataset]]],
                 needed: Sequence[str]) -> tuple[list[PlaneSeries], dict[str, Volume]]:
        """The chosen series of each needed plane, read with pixels one series at a time and assembled."""
        planes, volumes = [], {}
        for plane in needed:
            uid = report.series_for(plane)
            assert uid is not None
            pairs = by_series[uid]
            label = _series_label([h for _, h in pairs])
            datasets = []
            for item, _header in pairs:
                try:
                    datasets.append(pydicom.dcmread(self.spool.absolute(item.spool_path)))
                except Exception as exc:
                    raise NotAnalysed(f"{plane} {label}: an instance is unreadable ({type(exc).__name__})") from exc
            try:
                volume = assemble_volume(datasets)
            except VolumeError as exc:
                raise NotAnalysed(f"{plane} {label} is not one clean volume: {exc}") from exc
            del datasets  # the voxels live in the volume now; the builders need the headers only
            by_uid = {str(header.SOPInstanceUID): (item, header) for item, header in pairs}
            ordered = [by_uid[source.sop_instance_uid] for source in volume.sources]  # along the slice normal
            decision = report.chosen[plane]
            why = ", ".join(name for name, _ in decision.matched_rules) or "no rule"
            frames = [source.frame_number for source in volume.sources]
            multiframe, frame_numbers, headers = None, [], [header for _, header in ordered]
            if any(frame is not None for frame in frames):  # Enhanced MR: results reference (instance, frame)
                if len({source.sop_instance_uid for source in volume.sources}) != 1 or None in frames:
                    raise NotAnalysed(f"{plane} {label} spreads its slices over several multi-frame instances: the "
                                      "MRI result builders take one Enhanced MR instance per series")
                multiframe, frame_numbers = ordered[0][1], [int(frame) for frame in frames if frame is not None]
                headers = [frame_view(multiframe, frame) for frame in frame_numbers]
            planes.append(PlaneSeries(plane, headers, [item.sha256 for item, _ in ordered], volume.array,
                                      reason=f"score {decision.score:g} ({why})", frame_numbers=frame_numbers,
                                      multiframe=multiframe))
            volumes[plane] = volume
        return planes, volumes

    def _run(self, configured: ConfiguredModel, volumes: Mapping[str, Volume]
             ) -> tuple[dict[str, list[float]], SegmentationResult | None]:
        """The model on the study: its reported heads' probabilities and the label volume, if it segments."""
        model = configured.model
        started = time.perf_counter()
        try:
            embedding = model.embed({plane: volumes[plane].array for plane in model.plane_names})
            heads = model.predict(embedding=embedding)
            segmentation = None
            if model.supports_segmentation:
                plane = model.describe()["segmentation"]["plane"]
                segmented = model.segment(volumes[plane].array)
                segmentation = SegmentationResult(plane, np.asarray(segmented.labels),
                                                  segment_structures(segmented.class_names))
        except ValueError as exc:  # the model refuses its input (e.g. fewer slices than it reads): say so
            raise NotAnalysed(f"model {configured.name} refused the input: {exc}") from exc
        seconds = time.perf_counter() - started
        log.info("inference (%s, MRI): %s in %.2f s", configured.name, ", ".join(
            f"{plane} {tuple(volumes[plane].array.shape)}" for plane in model.plane_names), seconds)
        self.record_seconds(seconds)
        outputs = {name: [float(p) for p in probs[0].tolist()] for name, probs in heads.items()
                   if name in configured.heads}
        return outputs, segmentation

    def _findings(self, configured: ConfiguredModel, outputs: Mapping[str, list[float]]) -> list[FindingResult]:
        """One finding per head label the knee code table knows (its first head wins when two name it)."""
        findings, seen = [], set()
        for name, probs in outputs.items():
            for label, probability in zip(configured.heads[name].labels, probs):
                known = FINDINGS_BY_LABEL.get(str(label))
                if known is None or known.label in seen:
                    continue
                seen.add(known.label)
                findings.append(FindingResult(str(label), min(1.0, max(0.0, probability))))
        return findings

    # -- helpers -----------------------------------------------------------------------------------------------
    def _not_analysed(self, job: ClaimedJob, result: MriOutcome,
                      by_series: Mapping[str, list[tuple[JobInput, Dataset]]], reason: str,
                      rejected: Mapping[str, str] | None = None, *,
                      numbers: SeriesNumbers | None = None) -> MriOutcome:
        """Every MR instance ineligible (its series' own rejection reason, else the study's), the study
        ``not_analysed`` with ``reason``; an SR saying so when ``[results] report_not_analysed``."""
        rejected = rejected or {}
        skipped: list[tuple[Dataset, str]] = []
        for uid, pairs in by_series.items():
            why = f"series not chosen: {rejected[uid]}" if uid in rejected else reason
            for item, header in pairs:
                result.outcomes.append(ImageOutcome(item.instance_id, "ineligible", why[:500]))
                skipped.append((header, why))
        result.state, result.reason, result.objects = "not_analysed", reason[:500], []
        log.info("job %d: MR study not analysed: %s", job.id, reason)
        if self.settings.results.report_not_analysed and skipped and self.volume_models:
            created = self.job_inputs.job_created_at(job.id) or datetime.now(timezone.utc)
            study = StudyResult(study_instance_uid=job.study_instance_uid, images=[], not_analysed=skipped,
                                priority=PRIORITIES[max(0, min(job.priority, len(PRIORITIES) - 1))].upper(),
                                model=self.model_info(self.volume_models[0].model), created_at=created,
                                node_name=self.settings.node.ae_title, revision=max(1, job.study_revision))
            number = numbers.sr if numbers else self.settings.results.series_number_base
            result.objects.append(("SR", build_not_analysed_sr(study, number, self._previous(job))))
        return result

    def _starting(self, job: ClaimedJob, inputs: Sequence[JobInput], state: str) -> PriorityDecision:
        """The priority of a study that was not analysed: its starting priority, as the radiograph path gives it
        (the rank it was queued with when the results could not be built)."""
        if state != "not_analysed" or not inputs:
            return Triage.as_queued(job.priority)
        calling_ae = (inputs[0].calling_ae_title or "").strip()
        peer = next((p for p in self.peers() if calling_ae and p.ae_title == calling_ae), None)
        return self.triage().final(job.priority, calling_ae or None, peer.name if peer else None,
                                   peer.priority if peer else None, None)

    def _previous(self, job: ClaimedJob) -> list[DocumentReference]:
        """Every earlier SR of the study: the new one supersedes them all."""
        previous = []
        for path in self.job_inputs.previous_sr_paths(job.study_instance_uid, job.id):
            try:
                previous.append(DocumentReference.from_dataset(
                    pydicom.dcmread(self.spool.absolute(path), stop_before_pixels=True)))
            except Exception:
                log.warning("job %d: previous SR unreadable; new SR will not reference it", job.id)
        return previous

    def _notifications(self, job: ClaimedJob, header: Dataset, decision: PriorityDecision, values: dict[str, Any],
                       created: datetime, model_name: str, configured: ConfiguredModel) -> list[NotificationEntry]:
        settings = self.settings.notifications
        labels = [f"{configured.name}.{head}" for head in configured.heads]
        payload = build_payload(
            settings, study_id=job.study_id, study_instance_uid=job.study_instance_uid,
            accession_number=header_text(header, "AccessionNumber"), priority=decision.priority,
            findings=summarise(values, decision, labels), created_at=created, model=model_name,
            patient={"name": header_text(header, "PatientName"), "id": header_text(header, "PatientID")},
        )
        return entries_for(settings, decision.rank, payload)

    def _write(self, job: ClaimedJob, objects: Sequence[tuple[str, Dataset]]) -> list[OutboxEntry]:
        """Each object into the spool (same UIDs, same bytes on a retry) and one outbox entry per destination."""
        destinations = [peer.name for peer in self.peers() if peer.receives_results]
        outbox = []
        for kind, dataset in objects:
            dataset = getattr(dataset, "__wrapped__", dataset)
            path = self.spool.write_result(job.study_instance_uid, str(dataset.SeriesInstanceUID),
                                           str(dataset.SOPInstanceUID), _dataset_bytes(dataset))
            outbox += [OutboxEntry(str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), kind, path, destination)
                       for destination in destinations]
        return outbox


def merge_with_radiographs(part: MriOutcome, state: str, reason: str | None, decision: PriorityDecision,
                           notifications: list[NotificationEntry]
                           ) -> tuple[str, str | None, tuple[PriorityDecision, list[NotificationEntry]]]:
    """A mixed study's outcome from its radiograph part's and its MR part's: done when either part is, the
    reasons of the parts that are not, and the more urgent part's priority (and its notifications)."""
    states = {state, part.state}
    merged = "done" if "done" in states else "failed" if "failed" in states else "not_analysed"
    reasons = [f"{what}: {why}" for what, own, why in (("radiographs", state, reason), ("MR", part.state, part.reason))
               if own != "done" and why]
    mr_decision = part.decision or Triage.as_queued(decision.rank)
    chosen = (mr_decision, part.notifications) if mr_decision.rank > decision.rank else (decision, notifications)
    return merged, "; ".join(reasons)[:500] or None, chosen
