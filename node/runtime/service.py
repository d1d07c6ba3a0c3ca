"""Running the node: ``msknode serve`` runs one role in-process, or supervises every configured role.

Roles: receiver (Storage SCP), scheduler (completion, housekeeping), worker (the model), sender (results
to the PACS). They share only the database and the spool.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import config as pydicom_config

from node.peers import PeerDirectory
from node.dicom.provenance import ResultRecognition
from node.dicom.receiver import Receiver
from node.settings import Settings
from storage.db import Database
from storage.intake import IntakeRepository
from storage.migrate import upgrade
from storage.spool import Spool

log = logging.getLogger("msknode.serve")

ROLES = ("all", "receiver", "scheduler", "worker", "sender", "web", "dicomweb")
STOW_PART_PREFIX = "stow-"  # node.dicomweb.stow.PART_PREFIX: the receiver's sweep leaves these to the dicomweb role


@dataclass
class Runtime:
    """What a running role holds; built by :func:`open_runtime`."""

    settings: Settings
    database: Database
    intake: IntakeRepository
    spool: Spool
    peers: PeerDirectory  # the file's [[peers]] plus the database overlay (msknode peers ...)
    detail: dict = field(default_factory=dict)  # reported in this role's heartbeat (msknode status)


def open_runtime(settings: Settings) -> Runtime:
    """Migrate the database and open the spool (every role does this at start)."""
    revision = upgrade(settings.storage.database_url)
    log.info("database at revision %s", revision)
    database = Database(settings.storage.database_url)
    spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync)
    return Runtime(settings, database, IntakeRepository(database), spool, PeerDirectory(settings, database))


def build_receiver(runtime: Runtime) -> Receiver:
    settings = runtime.settings
    return Receiver(
        node=settings.node,
        peers=runtime.peers.effective_peers,
        index=runtime.intake,
        spool=runtime.spool,
        min_free_disk_mb=settings.storage.min_free_disk_mb,
        recognition=ResultRecognition.from_settings(settings.intake, settings.results.manufacturer),
    )


def _install_signal_handlers(stop: threading.Event) -> None:
    def _request_stop(signum: int, _frame: object) -> None:
        log.info("signal %s received: stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)


def _steady_state_gc() -> None:
    """Freeze the receiver's start-up heap out of the garbage collector's reach and collect young objects less often.

    What exists once the receiver listens (pynetdicom's presentation contexts, SQLAlchemy's mappers, pydicom's
    dictionaries) lives as long as the process, yet every full collection walked it: under benchmarks/load.py
    a gc callback measured full collections pausing every association thread for up to 133 ms, in a
    C-STORE's response time. Frozen, they walk only what was allocated since.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(5000, 50, 100)


def _skip_pydicom_value_warnings() -> None:
    """Stop pydicom checking every value it reads against its VR's rules, in the receiver process only.

    pydicom's default (``reading_validation_mode`` WARN) runs a regular expression over every UID it builds
    and only ever warns. pynetdicom builds about 3 UIDs per proposed presentation context: with ``storescu``'s
    128 contexts the receiver spent 55 ms of CPU per association, 46 ms without these checks (20 ms when
    only one context is proposed), time in which every other association's C-STORE waits for the GIL.
    What the node enforces is checked explicitly and is unchanged: pynetdicom's own UID validation of DIMSE
    and ACSE fields, and node.dicom.header_checks' checks of each dataset.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def run_receiver(runtime: Runtime, stop: threading.Event) -> None:
    interrupted = runtime.intake.close_interrupted_associations()
    if interrupted:
        log.warning("%d association(s) were open when the node last stopped; marked interrupted", interrupted)
    swept = runtime.spool.sweep_incoming(skip_prefix=STOW_PART_PREFIX)
    if swept:
        log.info("removed %d unacknowledged partial file(s) from the spool", swept)
    # Peers (and their host names) refreshed in the background: the association-request path never waits
    # for DNS or the database, and a peer's changed address applies without a restart (node/peers.py).
    runtime.peers.start()
    receiver = build_receiver(runtime)
    receiver.start()
    if threading.current_thread() is threading.main_thread():  # the receiver's own process, not a test's thread
        _steady_state_gc()
        _skip_pydicom_value_warnings()
    host, port = receiver.address
    runtime.detail.update(listening=f"{host}:{port}", ae_title=runtime.settings.node.ae_title)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        receiver.stop()
        runtime.peers.stop()


def run_scheduler(runtime: Runtime, stop: threading.Event) -> None:
    from node.pipeline.scheduler import Scheduler

    Scheduler(runtime.settings, runtime.database, runtime.spool).run(stop)


def _yield_cpu_to_intake(idle_priority: bool, niceness: int) -> None:
    """Lower the worker's CPU priority so inference never delays C-STORE responses on a shared machine.

    SCHED_IDLE (the default) gives inference only CPU time that no other task wants: a receiver thread that
    wakes up runs at once instead of sharing a core with the model. Measured with benchmarks/load.py on two
    vCPUs (docs/reliability.md): C-STORE p99 229-249 ms with the worker at nice +10, 166-197 ms under
    SCHED_IDLE. The price: on a machine kept busy by other work, inference waits until it is not.
    Linux keeps the policy and nice value per thread and new threads inherit them, so this is called by the
    worker role's own thread before torch starts its thread pool (in a supervised node, the whole process).
    """
    thread = threading.get_native_id()
    if idle_priority:
        try:
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError) as exc:
            log.warning("SCHED_IDLE unavailable for the worker (%s); using nice +%d", exc, niceness)
        else:
            log.info("worker runs under SCHED_IDLE (inference only uses CPU time nothing else wants)")
            return
    if niceness <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    except (OSError, AttributeError) as exc:
        log.warning("could not lower the worker's CPU priority by %d: %s", niceness, exc)
        return
    log.info("worker runs at nice +%d (the receiver keeps the CPU it needs)", niceness)


def run_worker(runtime: Runtime, stop: threading.Event) -> None:
    import engines
    from engines.calibration import load_calibration
    from node.pipeline.worker import Worker
    from storage.queue import JobQueue
    from storage.job_inputs import JobInputs

    from storage.counters import Counters

    from node.pipeline.models import ConfiguredModel, reported_heads

    engine = runtime.settings.engine
    _yield_cpu_to_intake(engine.idle_priority, engine.nice)
    precision = None if engine.precision == "auto" else engine.precision
    entries = runtime.settings.model_entries
    runtime.detail.update(engine_loaded=False, model=str(entries[0].path), models=[str(e.path) for e in entries])
    loaded: list[ConfiguredModel] = []
    for index, entry in enumerate(entries):  # every configured model, whatever its family
        if engine.backend == "triton":  # weights loaded here (hash, heads); the graphs run on the Triton server
            from engines.backends import BackendUnavailable, triton_backend

            model = engines.load(entry.path, backend="cpu")
            if not hasattr(model, "plane_names"):  # a 3-D model (OrthoDiffusion) has no Triton graphs: in-process
                served = (engine.triton_model if len(entries) == 1 else "") or model.name
                model.backend = triton_backend(  # type: ignore[attr-defined]
                    engine.triton_url, served, model.encoder_hash,
                    protocol=engine.triton_protocol, timeout_seconds=engine.triton_timeout_seconds,
                    needs_reconstruct=model.supports_error_map,
                )
                try:
                    model.backend.check()  # a server serving other weights stops the worker here (TritonError)
                except BackendUnavailable as exc:
                    log.warning("%s; the worker waits for it", exc)
        else:
            model = engines.load(entry.path, backend=engine.backend, precision=precision)
        calibration = load_calibration(entry.path, model.encoder_hash) if Path(entry.path).is_dir() else None
        heads = reported_heads(entry, model.heads, f"models[{index}].heads")
        loaded.append(ConfiguredModel(entry, model, calibration, heads))
    described = [{**cm.model.describe(), "model": str(cm.entry.path), "configured_name": cm.name,
                  "reported_heads": sorted(cm.heads)} for cm in loaded]
    runtime.detail.update(engine_loaded=True, engine=described[0], engines=described)
    model = loaded  # type: ignore[assignment]
    calibration = None
    worker = Worker(runtime.settings, JobQueue(runtime.database), JobInputs(runtime.database), runtime.spool,
                    model, calibration, peers=runtime.peers.effective_peers, counters=Counters(runtime.database),
                    detail=runtime.detail)
    worker.run(stop)


def run_sender(runtime: Runtime, stop: threading.Event) -> None:
    from node.delivery.sender import Sender
    from storage.outbox import Outbox

    settings = runtime.settings
    sender = Sender(settings.node.ae_title, runtime.peers.effective_peers, Outbox(runtime.database), runtime.spool,
                    settings.sender)
    # Notifications (webhooks, e-mail) ride along in the sender role: outbound delivery, no new process.
    from node.delivery.notifier import Notifier
    from storage.notifications import Notifications

    notifier = Notifier(settings.notifications, Notifications(runtime.database))
    announcing = threading.Thread(target=notifier.run, args=(stop, settings.pipeline.poll_seconds),
                                  name="notifier", daemon=True)
    announcing.start()
    sender.run(stop, settings.pipeline.poll_seconds)
    announcing.join(timeout=30)


def run_web(runtime: Runtime, stop: threading.Event) -> None:
    """The dashboard, /healthz and /metrics on ``[web] host:port`` (uvicorn in a thread, until ``stop``)."""
    import uvicorn

    from node.web import create_app

    settings = runtime.settings
    app = create_app(settings, runtime.database, runtime.spool)
    config = uvicorn.Config(app, host=settings.web.host, port=settings.web.port, log_config=None,
                            access_log=False, lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="msknode-web", daemon=True)
    thread.start()
    log.info("web dashboard on http://%s:%d", settings.web.host, settings.web.port)
    try:
        while not stop.wait(0.5):
            if not thread.is_alive():
                raise RuntimeError(f"the web server stopped (is {settings.web.host}:{settings.web.port} in use?)")
    finally:
        server.should_exit = True
        thread.join(15)


def run_dicomweb(runtime: Runtime, stop: threading.Event) -> None:
    """STOW-RS on ``[dicomweb] host:port`` (uvicorn in a thread, until ``stop``), storing through node/intake.py."""
    import ssl

    import uvicorn

    from node.dicomweb.app import create_app
    from node.dicomweb.stow import PART_PREFIX
    from node.intake import Intake

    settings = runtime.settings
    web = settings.dicomweb
    swept = runtime.spool.sweep_incoming(only_prefix=PART_PREFIX)
    if swept:
        log.info("removed %d unacknowledged partial STOW-RS file(s) from the spool", swept)
    runtime.peers.start()
    intake = Intake(runtime.intake, runtime.spool, settings.storage.min_free_disk_mb,
                    ResultRecognition.from_settings(settings.intake, settings.results.manufacturer))
    runtime.intake.start_writer()
    app = create_app(web, runtime.peers.effective_peers, intake, runtime.intake)
    tls: dict[str, object] = {}
    if web.tls.enabled:
        from node.dicom.tls import server_context

        server_context(web.tls, "dicomweb.tls")  # a bad certificate or a readable key stops start-up, key named
        tls = {"ssl_certfile": str(web.tls.certificate), "ssl_keyfile": str(web.tls.private_key)}
        if web.tls.ca_certificates is not None:
            tls["ssl_ca_certs"] = str(web.tls.ca_certificates)
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED if web.tls.require_client_certificate else ssl.CERT_OPTIONAL
    config = uvicorn.Config(app, host=web.host, port=web.port, log_config=None, access_log=False, lifespan="off",
                            server_header=False, limit_concurrency=web.max_concurrent_requests,
                            timeout_keep_alive=5, **tls)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="msknode-dicomweb", daemon=True)
    thread.start()
    scheme = "https" if web.tls.enabled else "http"
    deadline = 30.0
    while not server.started and thread.is_alive() and deadline > 0 and not stop.is_set():
        stop.wait(0.05)
        deadline -= 0.05
    runtime.detail.update(listening=f"{web.host}:{web.port}", protocol="STOW-RS")
    log.info("listening as STOW-RS on %s://%s:%d%s/studies", scheme, web.host, web.port, web.base_path)
    try:
        while not stop.wait(0.5):
            if not thread.is_alive():
                raise RuntimeError(f"the STOW-RS server stopped (is {web.host}:{web.port} in use?)")
    finally:
        server.should_exit = True
        thread.join(15)
        runtime.peers.stop()


RUNNERS = {"receiver": run_receiver, "scheduler": run_scheduler, "worker": run_worker, "sender": run_sender,
           "web": run_web, "dicomweb": run_dicomweb}


def serve(settings: Settings, role: str = "all", stop_event: threading.Event | None = None,
          config_path: Path | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop_event``)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    stop = stop_event or threading.Event()
    _install_signal_handlers(stop)
    roles = list(dict.fromkeys(settings.pipeline.roles))
    if role == "all" and len(roles) > 1:
        from node.runtime.supervisor import Supervisor

        upgrade(settings.storage.database_url)  # once, before the children race to do it
        counts = [(name, settings.pipeline.workers if name == "worker" else 1) for name in roles]
        log.info("supervising roles %s on %s (pid %d)", ", ".join(roles), socket.gethostname(), os.getpid())
        Supervisor(counts, config_path).run(stop)
        log.info("stopped")
        return
    name = roles[0] if role == "all" else role
    runtime = open_runtime(settings)
    from node.runtime.status import HeartbeatThread

    if name == "web":
        from node.web.accounts import first_user_hint

        hint = first_user_hint(runtime.database, config_path)
        if hint:
            log.warning("%s", hint)
    heartbeat = HeartbeatThread(runtime.database, name, runtime.detail).start()
    try:
        RUNNERS[name](runtime, stop)
    finally:
        heartbeat.stop()
        runtime.database.dispose()
        log.info("%s stopped", name)
