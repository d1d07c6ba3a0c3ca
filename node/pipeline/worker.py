"""The worker role: claim study jobs, run the engine on the eligible images, build the results, queue them.

The configured models (``[[models]]``, or the one ``[engine] model``) are loaded once per process, whatever their
family (``engines.family.ModelFamily``); every eligible image gets each model that applies to it
(node/pipeline/models.py). Images of several queued studies are batched together, per model, up to
``engine.batch_size`` frames. Each image ends as *analysed* (with its outputs), *ineligible* (with the rule
that excluded it) or *failed* (with the decode/preprocess error); one bad image never fails its study.
A watchdog enforces ``pipeline.job_timeout_seconds``: past it the jobs are handed back and the process exits
(the supervisor restarts it), so one pathological study cannot block the queue; its attempts are counted and
after ``pipeline.max_attempts`` it is failed, visibly.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset

from engines.backends import BackendUnavailable
from engines.calibration import percentile as score_percentile
from engines.family import ModelFamily
from engines.imaging.decode import use_decoder_threads
from engines.imaging.preprocess import PreprocessError, preprocess
from engines.imaging.regions import highest_error_region
from node.delivery.notifier import build_payload, entries_for
from node.dicom.provenance import RESULT_KINDS, ResultRecognition, classify
from node.pipeline.eligibility import frame_count, ineligibility_reason, job_bound_reason
from node.pipeline.mri import MriOutcome, MriPipeline, merge_with_radiographs
from node.pipeline.models import (
    ConfiguredModel,
    applicability_reason,
    check_region_sources,
    preprocess_options,
    preprocessing_key,
    region_guided_outputs,
)
from node.pipeline.triage import PriorityDecision, Triage, header_text, model_study_values, study_attributes, summarise
from node.results.model import DocumentReference, HeadOutput, ImageResult, ModelInfo, StudyResult
from node.results.sc import build_sc
from node.results.sr import build_not_analysed_sr, build_sr
from node.runtime.faults import fault_point
from node.settings import PRIORITIES, PeerSettings, Settings
from storage.counters import BeatFailures, Counters
from storage.job_inputs import JobInput, JobInputs
from storage.notifications import NotificationEntry
from storage.queue import ClaimedJob, ImageOutcome, JobQueue, OutboxEntry
from storage.spool import Spool

log = logging.getLogger("msknode.worker")

Triaged = tuple[PriorityDecision, list[NotificationEntry]]  # the study's priority and its notifications


@dataclass
class Frame:
    """One preprocessed frame waiting for the batched engine pass of one model (``model``: index in the worker's
    models; an image with several applicable models has one Frame per model)."""

    job_id: int
    input: JobInput
    header: Dataset
    frame_index: int
    tensor: torch.Tensor
    display: np.ndarray
    geometry: Any
    outputs: dict[str, Any] = field(default_factory=dict)
    model: int = 0


@dataclass
class JobWork:
    job: ClaimedJob
    outcomes: list[ImageOutcome] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    not_analysed: list[tuple[Dataset, str]] = field(default_factory=list)
    error: str | None = None
    bound_reason: str | None = None  # the job exceeded a [pipeline] bound: not analysed, nothing loaded
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, logged at DEBUG (profiling)
    mri: MriOutcome | None = None  # a study mixing MR series and radiographs: its MR part (node/pipeline/mri.py)


def _priority_name(rank: int) -> str:
    return PRIORITIES[max(0, min(rank, len(PRIORITIES) - 1))].upper()


def _resize(map224: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    tensor = torch.as_tensor(map224, dtype=torch.float32)[None, None]
    out = torch.nn.functional.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def _dataset_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Worker:
    def __init__(self, settings: Settings, queue: JobQueue, job_inputs: JobInputs, spool: Spool,
                 model: ModelFamily | Sequence[ConfiguredModel], calibration: Any = None, owner: str | None = None,
                 peers: Callable[[], Sequence[PeerSettings]] | None = None, counters: Counters | None = None,
                 detail: dict[str, Any] | None = None) -> None:
        self.settings = settings
        # The effective peers (file + database overlay, node/peers.py); the file's alone when not given.
        self.peers = peers or (lambda: settings.peers)
        self.counters = counters  # inference_seconds histogram for /metrics
        self.queue = queue
        self.job_inputs = job_inputs
        self.spool = spool
        # The configured models, in configuration order: a bare ModelFamily is the one model of the first entry.
        if not isinstance(model, (list, tuple)):
            model = [ConfiguredModel(settings.model_entries[0], model, calibration)]
        self.models: list[ConfiguredModel] = list(model)
        if not self.models:
            raise ValueError("the worker needs at least one model")
        self.model = self.models[0].model  # the first model (one-model callers and tests)
        self.calibration = self.models[0].calibration
        # region-guided classifiers -> the model whose error map gives their crops (checked here, at start)
        self.region_sources = check_region_sources(self.models)
        self.owner = owner or f"worker@{socket.gethostname()}:{os.getpid()}"
        use_decoder_threads(os.cpu_count() or 1)  # decoding and inference take turns, so both use every core
        if settings.engine.threads:
            torch.set_num_threads(settings.engine.threads)
        self._held: list[int] = []
        self._held_lock = threading.Lock()
        self.recognition = ResultRecognition.from_settings(settings.intake, settings.results.manufacturer)
        # MR studies for a 3-D model (engines.family.VolumeModelFamily) take their own path (node/pipeline/mri.py)
        self.mri = MriPipeline(
            settings, queue, job_inputs, spool, self.models, owner=self.owner, peers=self.peers,
            recognition=self.recognition, triage=lambda: self.triage, model_info=self._model_info,
            record_seconds=self._record_inference_seconds) if any(cm.volumetric for cm in self.models) else None
        # Lease renewals that failed: in the role's heartbeat detail (msknode status) and on /metrics.
        self.lease_failures = BeatFailures(counters, detail if detail is not None else {}, "lease_renewal",
                                           "worker", "lease")
        # A remote backend (Triton) says whether its server is ready; in-process backends have no such method.
        readies = [ready for cm in self.models
                   if (ready := getattr(getattr(cm.model, "backend", None), "ready", None)) is not None]
        self.inference_ready: Callable[[], bool] | None = (
            (lambda: all(ready() for ready in readies)) if readies else None)
        self._stop: threading.Event | None = None
        self._server_wait = 0.0  # seconds of the current batch spent waiting for the inference server
        self._waiting_since: float | None = None
        self._server_down = False

    # -- loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self.triage  # noqa: B018 -- rules naming an output this model lacks stop the worker at start, with the key path
        pipeline = self.settings.pipeline
        self._stop = stop
        heartbeat = threading.Thread(target=self._heartbeat_loop, args=(stop,), daemon=True)
        heartbeat.start()
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("worker round failed")
                worked = 0
            if not worked:
                stop.wait(pipeline.poll_seconds)

    def run_once(self) -> int:
        """Claim and process one batch of jobs; returns how many jobs were handled."""
        pipeline = self.settings.pipeline
        if not self._inference_available():
            return 0  # the inference server is down: claim nothing, the jobs wait queued (no attempt counted)
        jobs = self.queue.claim(self.owner, pipeline.lease_seconds, limit=self.settings.engine.batch_size,
                                max_attempts=pipeline.max_attempts)
        if not jobs:
            return 0
        # A job being retried may be the one that hung or crashed a worker: give it a batch of its own. So does an
        # MR study for a 3-D model (about a minute of CPU each): each gets the whole job timeout.
        alone = [job for job in jobs if job.attempts > 1 or (self.mri is not None and self.mri.wants(job))]
        fresh = [job for job in jobs if job not in alone]
        for group in ([fresh] if fresh else []) + [[job] for job in alone]:
            self._process_with_watchdog(group)
        return len(jobs)

    def _inference_available(self) -> bool:
        """A remote backend's server is ready (always True in-process); logs each outage once, and its end."""
        if self.inference_ready is None:
            return True
        ready = bool(self.inference_ready())
        if ready == self._server_down:  # the state changed
            if ready:
                log.info("inference server available again; claiming jobs")
            else:
                log.warning("inference server unavailable (%s); jobs wait queued until it is back",
                            self.model.describe().get("device", "remote backend"))
        self._server_down = not ready
        return ready

    def _engine(self, call: Callable[[], Any]) -> Any:
        """One engine call; a remote backend whose server is unavailable (``BackendUnavailable``) is waited for and
        the same call made again: the leases are renewed meanwhile, the wait does not count towards the job timeout,
        and no attempt is counted. The masks are seeded, so a retried batch gives the same results."""
        delay = self.settings.engine.triton_retry_seconds
        while True:
            try:
                return call()
            except BackendUnavailable as exc:
                if self._stop is not None and self._stop.is_set():
                    raise
                log.warning("inference server unavailable mid-batch (%s); retrying the batch in %.1f s", exc, delay)
                self._waiting_since = time.monotonic()
                try:
                    (self._stop or threading.Event()).wait(delay)
                finally:
                    self._server_wait += time.monotonic() - self._waiting_since
                    self._waiting_since = None

    def _waited(self) -> float:
        """Seconds of the current batch spent waiting for the inference server (including a wait in progress)."""
        since = self._waiting_since
        return self._server_wait + (time.monotonic() - since if since is not None else 0.0)

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        interval = max(1.0, self.settings.pipeline.lease_seconds / 3)
        while not stop.wait(interval):
            with self._held_lock:
                held = list(self._held)
            if not held:
                continue
            try:  # never let one error end the loop: the leases would then expire under a live worker
                lost = self.queue.heartbeat(self.owner, held, self.settings.pipeline.lease_seconds)
            except Exception as exc:
                self.lease_failures.failed(exc)
                log.warning("cannot renew the lease of job(s) %s (%s, %d failure(s) in a row); retrying in %.0f s",
                            held, type(exc).__name__, self.lease_failures.consecutive, interval)
                continue
            self.lease_failures.succeeded()
            for job_id in lost:
                log.warning("lease on job %d lost; its results will be discarded", job_id)

    def _process_with_watchdog(self, jobs: list[ClaimedJob]) -> None:
        with self._held_lock:
            self._held = [job.id for job in jobs]
        done = threading.Event()
        timeout = self.settings.pipeline.job_timeout_seconds
        started, self._server_wait = time.monotonic(), 0.0

        def watchdog() -> None:
            # time spent waiting for an unavailable inference server does not count towards the timeout
            while not done.wait(max(0.05, started + timeout + self._waited() - time.monotonic())):
                if time.monotonic() - started - self._waited() >= timeout:
                    break
            else:
                return
            for job in jobs:
                log.error("job %d (study %s) exceeded %.0f s; handing it back", job.id, job.study_instance_uid, timeout)
                self.queue.release(job.id, self.owner, f"timed out after {timeout:.0f} s (attempt {job.attempts})")
            logging.shutdown()
            os._exit(3)  # torch work cannot be interrupted in-thread; the supervisor restarts the role

        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        try:
            self.process(jobs)
        finally:
            done.set()
            with self._held_lock:
                self._held = []

    # -- one batch ---------------------------------------------------------------------------
    def process(self, jobs: list[ClaimedJob]) -> None:
        if self.mri is not None:  # an MR study with a 3-D model configured is analysed (and recorded) there
            jobs = [job for job in jobs if not self.mri.process(job)]
        works = [self._prepare(job) for job in jobs]
        frames = [frame for work in works if work.error is None for frame in work.frames]
        started = time.perf_counter()
        self._infer(frames)
        for work in works:  # one engine pass serves every job of the batch
            work.timings["inference (batch)"] = time.perf_counter() - started
        for work in works:
            self._finish(work)

    def _prepare(self, job: ClaimedJob) -> JobWork:
        """Decide eligibility and the job's bounds from the headers, then read and preprocess the eligible images.

        Two passes, so that pixel data is read only for instances that will be analysed: the first reads every
        header with ``stop_before_pixels`` (eligibility, frame counts, the job bounds of ``[pipeline]``); the
        second reads the pixel data of the eligible instances, one at a time. Ineligible instances are kept as
        headers only (for the not-analysed SR); no pixel data of theirs is ever loaded.
        """
        work = JobWork(job)
        started = time.perf_counter()
        try:
            inputs = self.job_inputs.inputs(job.study_instance_uid)
        except Exception as exc:  # database hiccup: the job is retried after its lease
            work.error = f"cannot list instances: {exc}"
            return work
        if self.mri is not None:  # MR series beside radiographs: the 3-D model takes them, the rest stays here
            work.mri = self.mri.analyse_mr_part(job, inputs)
            if work.mri is not None:
                inputs = [item for item in inputs if item.instance_id not in work.mri.instance_ids]
        pipeline = self.settings.pipeline
        too_many = job_bound_reason(len(inputs), 0, pipeline)
        if too_many:  # not even the headers are read
            work.outcomes.extend(ImageOutcome(item.instance_id, "ineligible", too_many) for item in inputs)
            work.bound_reason = too_many
            return work
        eligible: list[tuple[JobInput, Dataset]] = []
        for item in inputs:
            path = self.spool.absolute(item.spool_path)
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:
                work.outcomes.append(ImageOutcome(item.instance_id, "failed", f"unreadable: {type(exc).__name__}"))
                continue
            if classify(header, True, self.recognition)[0] in RESULT_KINDS:
                continue  # a result indexed before intake recorded kinds (migration 0004): never an input
            peer = next((p for p in self.peers() if p.ae_title == (item.calling_ae_title or '').strip()), None)
            reason = ineligibility_reason(header, peer.name if peer else None, self.settings.eligibility)
            applicable: list[int] = []
            if not reason:
                why_not = []
                for index, configured in enumerate(self.models):
                    excluded = ("a 3-D model: MR series only" if configured.volumetric
                                else applicability_reason(header, configured.entry))
                    if excluded is None:
                        applicable.append(index)
                    else:
                        why_not.append(f"{configured.name}: {excluded}")
                if not applicable:
                    reason = "no configured model applies (" + "; ".join(why_not) + ")"
            if reason:
                work.outcomes.append(ImageOutcome(item.instance_id, "ineligible", reason))
                work.not_analysed.append((header, reason))
                continue
            eligible.append((item, header, applicable))
        bound = job_bound_reason(len(inputs), sum(frame_count(header) for _, header, _ in eligible), pipeline)
        if bound:
            for item, header, _ in eligible:
                work.outcomes.append(ImageOutcome(item.instance_id, "ineligible", bound))
                work.not_analysed.append((header, bound))
            work.bound_reason = bound
            return work
        work.timings.update({"headers": time.perf_counter() - started, "read": 0.0, "preprocess": 0.0})
        for item, header, applicable in eligible:
            started = time.perf_counter()
            try:
                dataset = pydicom.dcmread(self.spool.absolute(item.spool_path))
            except Exception as exc:
                reason = f"unreadable: {type(exc).__name__}"
                work.outcomes.append(ImageOutcome(item.instance_id, "failed", reason))
                work.not_analysed.append((header, reason))
                continue
            work.timings["read"] += time.perf_counter() - started
            started = time.perf_counter()
            try:  # once per distinct preprocessing among the applicable models
                prepared_by: dict[str, Any] = {}
                for index in applicable:
                    configured = self.models[index]
                    if preprocessing_key(configured) not in prepared_by:
                        prepared_by[preprocessing_key(configured)] = preprocess(
                            dataset, voi=self.settings.engine.voi, preprocessing=configured.model.preprocessing,
                            **{"display_size": self.settings.results.overlay_max_size,
                               **preprocess_options(configured)})
            except PreprocessError as exc:
                reason = f"cannot decode or preprocess: {exc}"
                work.outcomes.append(ImageOutcome(item.instance_id, "failed", reason))
                work.not_analysed.append((header, reason))
                continue
            except Exception as exc:  # a decoder crashing on malformed data must not fail the study
                reason = f"cannot decode: {type(exc).__name__}"
                work.outcomes.append(ImageOutcome(item.instance_id, "failed", reason))
                work.not_analysed.append((header, reason))
                continue
            finally:
                del dataset  # the pixel data goes now, not at the end of the job
                work.timings["preprocess"] += time.perf_counter() - started
            first = next(iter(prepared_by.values()))
            for index in range(first.tensor.shape[0]):
                for model_index in applicable:
                    prepared = prepared_by[preprocessing_key(self.models[model_index])]
                    work.frames.append(  # a region-guided model's display is its larger crop source
                        Frame(job.id, item, header, index, prepared.tensor[index], prepared.display[index],
                              prepared.geometry, model=model_index)
                    )
        return work

    def _infer(self, frames: list[Frame]) -> None:
        """Embedding, heads and (where the model has one) error map for all frames, per model, in batches of
        ``engine.batch_size``."""
        engine = self.settings.engine
        # region-guided models last: their crops come from another model's error map of the same frame
        for model_index, configured in sorted(enumerate(self.models), key=lambda pair: pair[1].region_guided):
            model = configured.model
            mine = [frame for frame in frames if frame.model == model_index]
            if configured.region_guided:
                self._infer_region_guided(model_index, configured, mine, frames)
                continue
            for start in range(0, len(mine), engine.batch_size):
                chunk = mine[start : start + engine.batch_size]
                x = torch.stack([frame.tensor for frame in chunk])
                started, waited = time.perf_counter(), self._waited()
                embedding = self._engine(lambda: model.embed(x))
                heads = model.predict(x, embedding=embedding)
                result = None
                if model.supports_error_map:
                    result = self._engine(lambda: model.error_map_result(x, seed=engine.seed, passes=engine.passes))
                seconds = time.perf_counter() - started - (self._waited() - waited)
                log.info("inference (%s): %d frame(s) in %.2f s", configured.name, len(chunk), seconds)
                self._record_inference_seconds(seconds)
                for row, frame in enumerate(chunk):
                    outputs: dict[str, Any] = {
                        "score": None, "map224": None, "region": None,
                        "heads": {name: probs[row].tolist() for name, probs in heads.items()
                                  if name in configured.heads},
                    }
                    if result is not None:
                        map224 = result.maps[row].numpy()
                        region = highest_error_region(map224, frame.geometry)
                        outputs.update(score=float(result.scores[row]), map224=map224,
                                       region=None if region is None else region.polygon)
                    frame.outputs = outputs

    def _infer_region_guided(self, model_index: int, configured: ConfiguredModel, mine: list[Frame],
                             frames: list[Frame]) -> None:
        """Whole image + crops around the ``regions_from`` model's highest-error regions of the same frame (whole
        image only where that model did not run), ``engine.batch_size`` frames (each 1 + max_regions crops) a pass."""
        source = self.region_sources.get(model_index)
        maps = {(f.job_id, f.input.instance_id, f.frame_index): f.outputs.get("map224")
                for f in frames if source is not None and f.model == source}
        batch = self.settings.engine.batch_size
        for start in range(0, len(mine), batch):
            chunk = mine[start : start + batch]
            requests = [(f.tensor, f.display, f.geometry, maps.get((f.job_id, f.input.instance_id, f.frame_index)))
                        for f in chunk]
            started, waited = time.perf_counter(), self._waited()
            outputs = self._engine(lambda: region_guided_outputs(configured, requests))
            seconds = time.perf_counter() - started - (self._waited() - waited)
            log.info("inference (%s): %d frame(s), %d crop(s) in %.2f s", configured.name, len(chunk),
                     sum(out["crops"] for out in outputs), seconds)
            self._record_inference_seconds(seconds)
            for frame, out in zip(chunk, outputs):
                frame.outputs = out

    def _model_info(self, loaded: ModelFamily) -> ModelInfo:
        """What the results say about a model: identity, weights hash, error-map settings (None without a map)."""
        engine = self.settings.engine
        spec = loaded.error_map_spec if loaded.supports_error_map else None
        return ModelInfo(
            name=loaded.name, version=str(loaded.version), encoder_sha256=loaded.encoder_hash,
            passes=engine.passes if spec else None, mask_ratio=float(spec.mask_ratio) if spec else None,
            seed=engine.seed, backend=f"{loaded.backend_name}/{loaded.precision}",
            manufacturer=self.settings.results.manufacturer,
        )

    def _record_inference_seconds(self, seconds: float) -> None:
        """One engine pass (a batch) into the /metrics histogram; a database hiccup must not fail the batch."""
        if self.counters is None:
            return
        try:
            self.counters.observe("inference_seconds", seconds)
        except Exception:
            log.warning("cannot record inference time for /metrics")

    def _finish(self, work: JobWork) -> None:
        job = work.job
        if work.error is not None:
            self.queue.release(job.id, self.owner, work.error)
            return
        decision, notifications = Triage.as_queued(job.priority), []
        try:
            state, reason, outbox, outcomes, (decision, notifications) = self._build_results(work)
        except Exception as exc:
            log.exception("job %d: building results failed", job.id)
            state, reason, outbox = "failed", f"building results failed: {type(exc).__name__}: {exc}", []
            outcomes = work.outcomes
        fault_point("worker.before_finish")
        started = time.perf_counter()
        if not self.queue.record_results(job.id, self.owner, state, outcomes, outbox, reason=reason,
                                         priority=decision.rank, priority_reason=decision.reason,
                                         notifications=notifications,
                                         series_selection=work.mri.selection.to_dict()
                                         if work.mri is not None and work.mri.selection is not None else None):
            log.warning("job %d: results dropped (its lease was lost, or a newer revision of study %s is "
                        "processing or finished)", job.id, job.study_instance_uid)
            return
        work.timings["record"] = time.perf_counter() - started
        log.info("job %d (study %s): %s, %d object(s) queued", job.id, job.study_instance_uid, state, len(outbox))
        log.debug("stage timings job %d: %s", job.id, ", ".join(f"{stage} {seconds:.3f} s"
                                                                 for stage, seconds in work.timings.items()))

    @functools.cached_property
    def triage(self) -> Triage:
        """The compiled ``[triage]`` rules, checked against every configured model's reported heads (once per
        process): ``<model>.<name>`` for each model, bare names for the first."""
        return Triage(self.settings.triage, None, {cm.name: cm.head_labels() for cm in self.models})

    def _triage_study(self, work: JobWork, images: list[tuple[int, Any]], state: str, created: datetime,
                      model_name: str) -> Triaged:
        """The study's priority as triage decides it (self.triage.final) and its notifications.

        The worker only gathers the values (sender, header attributes, the images' results) and passes them in.
        """
        job, settings = work.job, self.settings
        header = work.frames[0].header if work.frames else (work.not_analysed[0][0] if work.not_analysed else None)
        calling_ae = work.frames[0].input.calling_ae_title if work.frames else None
        peer = next((p for p in self.peers() if calling_ae and p.ae_title == calling_ae.strip()), None)
        peer_name, peer_priority = (peer.name, peer.priority) if peer else (None, None)
        per_model = [
            (cm.name,
             [(image.score, image.percentile, {h.name: h.probabilities for h in image.heads})
              for index, image in images if index == model_index],
             cm.head_labels())
            for model_index, cm in enumerate(self.models)
        ]
        labels = list(self.models[0].heads)  # the values a notification shows (every model's when several)
        if len(self.models) > 1:
            labels += [f"{cm.name}.{head}" for cm in self.models for head in cm.heads]
        values = None if state != "done" else model_study_values(
            per_model, study_attributes(header, calling_ae, peer_name))
        decision = self.triage.final(job.priority, calling_ae, peer_name, peer_priority, values)
        if values is None:
            return decision, []
        payload = build_payload(
            settings.notifications, study_id=job.study_id, study_instance_uid=job.study_instance_uid,
            accession_number=header_text(header, "AccessionNumber"), priority=decision.priority,
            findings=summarise(values, decision, labels), created_at=created, model=model_name,
            patient={"name": header_text(header, "PatientName"), "id": header_text(header, "PatientID")},
        )
        return decision, entries_for(settings.notifications, decision.rank, payload)

    def _build_results(
        self, work: JobWork
    ) -> tuple[str, str | None, list[OutboxEntry], list[ImageOutcome], Triaged]:
        job, settings = work.job, self.settings
        infos = [self._model_info(cm.model) for cm in self.models]
        # The study's model (series identity, device observer): the first configured model with a result here.
        used = sorted({frame.model for frame in work.frames})
        primary = used[0] if used else 0
        model = infos[primary]
        outcomes = list(work.outcomes)
        images: list[tuple[int, ImageResult]] = []
        per_frame: dict[tuple[int, int], dict[str, Any]] = {}  # (instance, frame) -> its outcome's outputs
        for frame in work.frames:
            out = frame.outputs
            configured = self.models[frame.model]
            percentile = None
            if configured.calibration is not None and out["score"] is not None:
                percentile = float(score_percentile(out["score"], configured.calibration))
            head_outputs = []
            for name, probs in out["heads"].items():
                head = configured.heads[name]
                head_outputs.append(HeadOutput(name, list(head.labels), [float(p) for p in probs],
                                               out.get("activations", {}).get(name, head.activation),
                                               finding=out.get("findings", {}).get(name)))
            display = frame.display
            images.append((frame.model, ImageResult(
                source=frame.header, score=out["score"], percentile=percentile, heads=head_outputs,
                region=out["region"], display=display,
                error_map=None if out["map224"] is None else _resize(out["map224"], display.shape),
                frame_index=frame.frame_index, source_sha256=frame.input.sha256,
                model=None if frame.model == primary else infos[frame.model],
            )))
            region = None if out["region"] is None else np.asarray(out["region"]).round(1).tolist()
            mine = {"score": out["score"], "percentile": percentile, "heads": out["heads"], "region": region}
            if out.get("findings"):
                mine["findings"] = out["findings"]
            key = (frame.input.instance_id, frame.frame_index)
            if key not in per_frame:  # one outcome per (instance, frame): the first model's values at the top
                per_frame[key] = {"percentile": percentile, "heads": out["heads"], "region": region, "models": {}}
                outcomes.append(ImageOutcome(frame.input.instance_id, "analysed", score=out["score"],
                                             frame_index=frame.frame_index, outputs=per_frame[key]))
            per_frame[key]["models"][configured.name] = mine
        created = self.job_inputs.job_created_at(job.id) or datetime.now(timezone.utc)
        triaged = self._triage_study(work, images, "done" if images else "not_analysed", created,
                                     ", ".join(f"{infos[i].name} {infos[i].version}" for i in used)
                                     or f"{model.name} {model.version}")
        with_map = [image for _, image in images if image.error_map is not None]
        images_only = [image for _, image in images]
        study = StudyResult(
            study_instance_uid=job.study_instance_uid, images=images_only, not_analysed=work.not_analysed,
            priority=_priority_name(triaged[0].rank), model=model, created_at=created, node_name=settings.node.ae_title,
            revision=max(1, job.study_revision),  # numbers the objects: a viewer shows the newest revision's SR
        )
        previous: list[DocumentReference] = []  # every earlier SR of the study: the new one supersedes them all
        for previous_path in self.job_inputs.previous_sr_paths(job.study_instance_uid, job.id):
            try:
                previous.append(DocumentReference.from_dataset(
                    pydicom.dcmread(self.spool.absolute(previous_path), stop_before_pixels=True)
                ))
            except Exception:
                log.warning("job %d: previous SR unreadable; new SR will not reference it", job.id)

        objects: list[tuple[str, Dataset]] = []
        base = settings.results.series_number_base
        if images:
            started = time.perf_counter()
            objects.append(("SR", build_sr(study, base, previous)))
            work.timings["sr"] = time.perf_counter() - started
            started = time.perf_counter()
            if settings.results.send_secondary_capture:  # only models with an error map have one to show
                for number, image in enumerate(with_map, start=1):
                    objects.append(("SC", build_sc(image, study, base + 1, position=number)))
            work.timings["sc"] = time.perf_counter() - started
            state, reason = "done", None
        else:
            eligible_failed = [o for o in outcomes if o.state == "failed"]
            if eligible_failed:
                state, reason = "failed", "; ".join(sorted({o.reason or "" for o in eligible_failed}))[:500]
            else:
                state = "not_analysed"
                reason = work.bound_reason or "; ".join(sorted({r for _, r in work.not_analysed}))[:500] or "no instances"
            if settings.results.report_not_analysed and work.not_analysed:
                objects.append(("SR", build_not_analysed_sr(study, base, previous)))

        destinations = [peer.name for peer in self.peers() if peer.receives_results]
        outbox: list[OutboxEntry] = []
        started = time.perf_counter()
        for kind, dataset in objects:
            dataset = getattr(dataset, "__wrapped__", dataset)
            path = self.spool.write_result(
                job.study_instance_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID),
                _dataset_bytes(dataset),
            )
            for destination in destinations:
                outbox.append(OutboxEntry(str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), kind, path, destination))
        work.timings["write"] = time.perf_counter() - started
        if work.mri is not None:  # one study revision: both parts recorded together, series numbers apart
            state, reason, triaged = merge_with_radiographs(work.mri, state, reason, *triaged)
            outcomes, outbox = outcomes + work.mri.outcomes, outbox + work.mri.outbox
        return state, reason, outbox, outcomes, triaged
