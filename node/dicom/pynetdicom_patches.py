"""Every use of pynetdicom internals in msknode, in this one module (pynetdicom 3.0.x).

Outside this module, msknode uses pynetdicom's public API only. Each patch here exists for speed or for
durability, and each relies on pynetdicom internals that a release may change without notice. The
contract test, ``tests/dicom/test_pynetdicom_contract.py``, checks everything listed under *Relies on*
(names, signatures, attributes, and the SHA-256 of the source of each upstream function a patch overrides,
copies or depends on, recorded in :data:`UPSTREAM_SOURCES` for pynetdicom 3.0.4): after a pynetdicom
upgrade it fails, naming what changed. Then re-read the changed upstream code, adapt the patch (or drop
it, if upstream now does the same), and record the new hashes; ``pyproject.toml`` pins ``pynetdicom<3.1``.

Patches
-------

1. :func:`enable_chunked_storage` — C-STORE datasets written in chunks to a file, never held in memory
   (``_config.STORE_RECV_CHUNKED_DATASET``; ``_config.UNRESTRICTED_STORAGE_SERVICE`` so that private
   storage SOP classes are accepted too), and that file created in the spool's ``.incoming`` directory,
   so its final move is a rename rather than a copy: the module global ``NamedTemporaryFile`` that
   ``pynetdicom.dimse_messages.DIMSEMessage.decode_msg`` calls is replaced by one bound to that directory,
   whose file is SHA-256-hashed as it is written (:class:`storage.spool.HashingWriter`), so the handler gets
   the digest with :func:`received_digest` instead of reading the file back.
   *Relies on*: ``pynetdicom._config`` having both flags; ``dimse_messages.NamedTemporaryFile`` being the
   name ``decode_msg`` calls (with ``delete=False, mode="wb", suffix=".dcm"``), and ``decode_msg`` writing
   the file only with ``write`` (pydicom's ``write_file_meta_info`` too) and ``.file.flush()``, flushed after
   every data fragment; ``StorageServiceClass.SCP`` closing it (``req._dataset_file.close()``) after the
   handler returns. (A file written any other way is hashed by the spool instead: never a wrong digest.)
2. :func:`discard_partial_transfer` — removes the chunked file of a C-STORE cut short (pynetdicom leaves
   it). *Relies on*: ``assoc.dimse.message._data_set_file`` being the open ``NamedTemporaryFile``
   while a dataset is being received.
3. :func:`copy_contexts_cheaply` — the SCP's presentation contexts deep-copied per association in ~1 ms
   rather than ~45. *Relies on*: ``RequestHandler._create_association`` giving each association
   ``deepcopy(server.contexts)``, and a ``PresentationContext`` holding only immutable values and lists.
4. :func:`make_quiet` — event-driven reactors (below) for every accepted association, switched in from
   ``EVT_CONN_OPEN``. *Relies on*: ``RequestHandler.handle`` triggering ``EVT_CONN_OPEN`` after building the
   association and before ``assoc.start()``; ``DULServiceProvider`` being a ``Thread`` whose ``run`` is
   ``Thread.run`` (target ``run_reactor``), with ``_kill_thread``, ``_idle_timer``, ``artim_timer``,
   ``event_queue``, ``to_provider_queue``, ``to_user_queue``, ``state_machine``, ``socket``,
   ``_process_recv_primitive()``, ``_is_transport_event()``, ``kill_dul()``, ``stop_dul()``,
   ``idle_timer_expired()``, ``receive_pdu(wait=False)``; ``Association`` with ``_run_reactor()``,
   ``kill()``, ``_kill``, ``_is_paused``, ``_reactor_checkpoint``, ``_dul_ready``, ``_serve_request()``,
   ``dimse.get_msg(block=False)`` and ``dimse.msg_queue``; ``AssociationSocket.recv(nr_bytes)`` being the
   one read ``DULServiceProvider._read_pdu_data`` uses, on ``AssociationSocket.socket``. A connection that
   ends before its A-ASSOCIATE-RQ (a health probe's bare connect, a port scan) ends its threads at once:
   *relies on* ``Association.run_reactor`` waiting for the request in ``dul.receive_pdu(wait=True,
   timeout=acse_timeout)`` and treating ``None`` as the time-out; ``state_machine.current_state`` back at
   ``"Sta1"`` once the transport closed; ``assoc.is_acceptor`` and ``assoc.requestor.primitive`` (``None``
   until the request is read).

5. :func:`drop_standard_log_handlers` — pynetdicom's standard logging handlers are not bound to new
   associations (``_config.LOG_HANDLER_LEVEL = "none"``). *Relies on*: ``Association._bind_defaults`` and
   ``AssociationServer._bind_defaults`` binding them only when that switch is ``"standard"``.

Event-driven reactors
---------------------

pynetdicom runs two threads per association, and both poll: the DUL thread sleeps 1 ms whenever its socket
and queues are empty (``DULServiceProvider._run_loop_delay``; its source says "TODO: try and make this event
based"), and the association thread sleeps 1 ms between looks at its DIMSE queue
(``Association._run_reactor``). With eight busy associations that is 16,000 wake-ups a second fighting for
the GIL: in a py-spy profile of the receiver under ``benchmarks/load.py`` they were about half of its samples,
more than indexing, hashing and fsync together.

Here the same loops wait for their work instead:

- the DUL thread blocks in ``select`` on its socket and on a wake-up socket pair that is written whenever the
  association thread queues a primitive for it (``to_provider_queue``) or another thread queues an event;
- the association thread blocks on an :class:`threading.Event` set whenever the DUL queues a decoded DIMSE
  message or an ACSE primitive (release, abort) for it.

Both still wake at least every ``IDLE_WAIT_SECONDS`` to check pynetdicom's timers (ARTIM, network idle
timeout) and kill flags, which only ever needed second resolution. Everything else — the state machine,
PDU decoding, DIMSE services, event handlers — is pynetdicom's own code, unchanged; the loops below follow
pynetdicom 3.0's ``DULServiceProvider.run_reactor`` and ``Association._run_reactor`` step for step apart from
how they wait. A PDU is read in large chunks (:class:`BulkReadSocket`) rather than 4096 bytes per ``recv``.
"""

from __future__ import annotations

import copy
import functools
import logging
import queue
import select
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from pynetdicom import _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationServer, AssociationSocket

from storage.spool import ContentDigest, HashingWriter

log = logging.getLogger(__name__)

# Longest a reactor sleeps without a wake-up: the resolution of pynetdicom's ARTIM and idle timers here.
IDLE_WAIT_SECONDS = 0.05
# Most bytes one recv() call asks the kernel for when reading a PDU (pynetdicom asks for 4096 at a time).
READ_CHUNK_BYTES = 1 << 20

# The pynetdicom release series these patches were written for (tests/dicom/test_pynetdicom_contract.py).
PYNETDICOM_SERIES = "3.0"

# SHA-256 of ``inspect.getsource`` of each upstream function a patch overrides, copies or depends on, as in
# pynetdicom 3.0.4. A different hash means upstream changed that code: re-read it and adapt the patch before
# recording the new value.
UPSTREAM_SOURCES: dict[str, str] = {
    # 4: the DUL reactor copied by QuietDUL (run_reactor), the methods it calls or overrides, and the attributes
    # it relies on (__init__); _read_pdu_data is the caller of BulkReadSocket.recv
    "pynetdicom.dul.DULServiceProvider.__init__": "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    "pynetdicom.dul.DULServiceProvider.run_reactor": "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul.DULServiceProvider.kill_dul": "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    "pynetdicom.dul.DULServiceProvider.stop_dul": "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive":
        "4c0ebbb3e646e35e8e5bbc27ee2f1e6b2c82bbf619232f47639a6cbae092ed39",
    "pynetdicom.dul.DULServiceProvider._is_transport_event":
        "8725ed03bb8fbdefef249d5d9888c120e6277d7b6aa2c4f537e23027186e1253",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data":
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    # 4: the acceptor's wait for its A-ASSOCIATE-RQ, ended early when the connection closes first
    "pynetdicom.dul.DULServiceProvider.receive_pdu":
        "fa67339834ca998cb31eb1806a854864200464b0a9991333d387aa419478c4e6",
    # 4: the association reactor copied by QuietAssociation, its caller, and kill (overridden)
    "pynetdicom.association.Association.__init__": "eb07516b8009ad8fa338201dea39578380fbf9f2c59fa5e368e20250eb97c4ea",
    "pynetdicom.association.Association.run_reactor":
        "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d",
    "pynetdicom.association.Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "pynetdicom.association.Association.kill": "8f9713666a7f4cffd840899f023090e9786668945a7c844f99d7a834077c3972",
    # 4: the DIMSE queue the association reactor waits on
    "pynetdicom.dimse.DIMSEServiceProvider.get_msg": "890e3e04283f5aeb756236f1a4dd35d3a10bbdd52f3efa3f3950c01f47bd2b34",
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive":
        "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    # 1, 2: the chunked file (NamedTemporaryFile, _data_set_file)
    "pynetdicom.dimse_messages.DIMSEMessage.decode_msg":
        "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    # 1: the handler runs before the chunked file is closed (the digest is taken then)
    "pynetdicom.service_class.StorageServiceClass.SCP":
        "63afca7fc6c6e7ee6e6eb303dd6aa72c1e69dbfcb94dd91c9e90ea6d900a4c40",
    # 4: BulkReadSocket.recv replaces this
    "pynetdicom.transport.AssociationSocket.recv": "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    # 3, 4: EVT_CONN_OPEN before assoc.start(); deepcopy(server.contexts)
    "pynetdicom.transport.RequestHandler.handle": "034823fb4df3a87467bd0d45193f0d457fcf59c87fda8e97b2edfb89426f76dd",
    "pynetdicom.transport.RequestHandler._create_association":
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e",
    # 5: the standard logging handlers are bound only under LOG_HANDLER_LEVEL == "standard"
    "pynetdicom.association.Association._bind_defaults":
        "4cada43c3a1937240a09fdb33edfe2eeb1924a627b13a4e4471cd26f41fd2bf8",
    "pynetdicom.transport.AssociationServer._bind_defaults":
        "4cada43c3a1937240a09fdb33edfe2eeb1924a627b13a4e4471cd26f41fd2bf8",
    # 3: what a presentation context holds
    "pynetdicom.presentation.PresentationContext.__init__":
        "37a8842ac07cd8f364dba03f5f7a59c23a0068341873edd81d367ad0c75596d9",
}


# -- 1. chunked storage into the spool ---------------------------------------------------------------------
_incoming_dir_lock = threading.Lock()


def enable_chunked_storage(incoming: Path) -> None:
    """Make pynetdicom write each received dataset in chunks to a file in ``incoming`` (process-wide).

    ``STORE_RECV_CHUNKED_DATASET``: the handler gets ``event.dataset_path`` and the dataset never sits in
    memory. ``UNRESTRICTED_STORAGE_SERVICE``: unknown and private storage SOP classes are accepted too.
    pynetdicom creates the file with ``NamedTemporaryFile`` in the system temporary directory; creating it
    under the spool instead turns the final move into an atomic rename rather than a second copy of every
    byte. (If anything else ends up elsewhere, the spool falls back to copying.)
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    with _incoming_dir_lock:
        dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
            _received_file, dir=str(incoming), prefix="rx-"
        )


class _ReceivedFile(HashingWriter):
    """The chunked file of one C-STORE, hashed as pynetdicom writes it; ``decode_msg`` flushes ``.file``."""

    @property
    def file(self) -> "_ReceivedFile":
        return self


# The files being received, by path, until the handler asks for their digest (weak: an abandoned transfer's
# file goes with its message).
_being_received: "weakref.WeakValueDictionary[str, _ReceivedFile]" = weakref.WeakValueDictionary()


def _received_file(**kwargs: Any) -> _ReceivedFile:
    """``NamedTemporaryFile(**kwargs)``, wrapped so its bytes are hashed as they are written."""
    handle = cast(BinaryIO, tempfile.NamedTemporaryFile(**kwargs))
    received = _ReceivedFile(handle)
    _being_received[str(received.name)] = received
    return received


def received_digest(dataset_path: Path | str) -> ContentDigest | None:
    """(SHA-256, size) of the C-STORE dataset file at ``dataset_path`` (``event.dataset_path``), hashed while
    pynetdicom wrote it; ``None`` when it was not written through :func:`enable_chunked_storage`'s files."""
    received = _being_received.pop(str(dataset_path), None)
    return received.content_digest() if received is not None else None


# -- 2. the file of a transfer cut short -------------------------------------------------------------------
def discard_partial_transfer(assoc: Any) -> None:
    """Remove the chunked file of a C-STORE cut short (abort, closed connection, disk full).

    pynetdicom leaves it in ``.incoming`` (its chunked file is ``delete=False``) until the next start's
    sweep; on a full disk that is exactly the space needed to recover.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    if handle is None:
        return
    try:
        handle.close()
    except OSError:
        pass  # flushing the rest may fail again on a full disk; the file goes anyway
    Path(handle.name).unlink(missing_ok=True)


# -- 3. cheap per-association copies of the presentation contexts ------------------------------------------
class CheaplyCopiedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, deep-copied for each association in ~1 ms, not ~45.

    pynetdicom gives every accepted association ``deepcopy(server.contexts)``; with every storage SOP class
    times every accepted transfer syntax (170 contexts here) the generic deepcopy cost about 45 ms of CPU per
    association. A context holds only UIDs (immutable strings), ints, bools and one list of UIDs, so copying
    each object and its lists gives the same independent copies.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            for name, value in vars(duplicate).items():
                if isinstance(value, list):
                    setattr(duplicate, name, list(value))
            copies.append(duplicate)
        return copies


def copy_contexts_cheaply(server: AssociationServer) -> None:
    """Switch a started server's presentation contexts to :class:`CheaplyCopiedContexts`."""
    server.contexts = CheaplyCopiedContexts(server.contexts)


# -- 5. no standard logging handlers ----------------------------------------------------------------------
def drop_standard_log_handlers() -> None:
    """Bind no pynetdicom standard logging handler to associations made from now on (process-wide).

    They write only INFO and DEBUG lines, which msknode never keeps (node/runtime/logs.py holds the pynetdicom
    logger at WARNING), yet each received PDU built an ``Event`` for them: about a fifth of the reader thread's
    time holding the GIL while receiving radiographs (py-spy ``--gil``, benchmarks/receive.py). Problems are
    still logged: pynetdicom's own warnings and errors are plain logger calls, not these handlers.
    """
    _config.LOG_HANDLER_LEVEL = "none"


# -- 4. event-driven reactors ------------------------------------------------------------------------------


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after every put, so the thread consuming it need not poll."""

    def __init__(self, notify: Callable[[], None], items: queue.Queue | None = None) -> None:  # type: ignore[type-arg]
        super().__init__()
        self._notify = notify
        if items is not None:  # anything queued before the swap
            while True:
                try:
                    self.queue.append(items.get_nowait())
                except queue.Empty:
                    break

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Waker:
    """A socket pair the DUL thread selects on next to its peer's socket; ``wake`` makes it readable."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def wake(self) -> None:
        try:
            self.writer.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed (the reactor has ended)
            pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class BulkReadSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU in large chunks straight into one buffer.

    pynetdicom 3.0 reads a PDU 4096 bytes per ``recv`` and appends each piece to a bytearray: 32 calls (each
    giving up and retaking the GIL) for a 128 KB instance, about 3,700 for a 15 MB radiograph. Here one
    buffer of the PDU's size is filled with ``recv_into``, up to ``READ_CHUNK_BYTES`` per call. Same contract:
    returns what was read, shorter if the peer closed the connection; timeouts and errors propagate.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        raw = cast(socket.socket, self.socket)
        # The buffer grows (doubling) as data arrives rather than being sized from the peer's declared length
        # up front: a PDU header may claim 4 GB.
        buffer = bytearray(min(nr_bytes, READ_CHUNK_BYTES))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):
                buffer.extend(bytes(min(nr_bytes, 2 * len(buffer)) - len(buffer)))
            with memoryview(buffer) as view:
                count = raw.recv_into(view[nr_read:], min(len(buffer) - nr_read, READ_CHUNK_BYTES))
            if not count:  # connection closed: what we have so far, as pynetdicom does
                del buffer[nr_read:]
                return buffer
            nr_read += count
        return buffer


class QuietDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in ``select`` instead of sleeping 1 ms when there is nothing to do."""

    _waker: _Waker
    _told_closed = False

    def run(self) -> None:  # replaces Thread.run, whose target is pynetdicom's polling run_reactor
        try:
            self._run_quietly()
        finally:
            self._waker.close()

    def _run_quietly(self) -> None:
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()  # lets the association thread start
            if self._kill_thread:
                return
            # The ARTIM timer's event goes on the queue ahead of anything else this round.
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # Either encode and send one primitive queued by the association, or read one PDU.
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort rather than leave the FSM confused
                log.error("exception in the DUL reactor, aborting the association: %s", exc)
                self._abort_after_exception()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait_for_work()
                continue
            self.state_machine.do_action(event)
            self._end_wait_for_request_if_closed()

    def _end_wait_for_request_if_closed(self) -> None:
        """The connection ended (closed, ARTIM, or garbage then close) before any A-ASSOCIATE-RQ arrived.

        pynetdicom's acceptor thread waits in ``receive_pdu(wait=True, timeout=acse_timeout)`` for the request
        and nothing wakes it when the transport closes in Sta2: a health probe's bare connect held a thread and
        a place in ``active_associations`` for the whole ACSE timeout. ``None`` is what that wait returns on
        timeout, so the association thread takes pynetdicom's own time-out path (kill, shut the socket) now.
        """
        if (self.state_machine.current_state == "Sta1" and not self._told_closed
                and self.assoc.is_acceptor and self.assoc.requestor.primitive is None
                and self.to_user_queue.empty()):
            self._told_closed = True
            self.to_user_queue.put(None)

    def _wait_for_work(self) -> None:
        """Block until the peer sends data, the association queues a primitive, or the idle wait ends."""
        if not self.to_provider_queue.empty():
            return
        raw = getattr(self.socket, "socket", None)
        try:
            if raw is None or raw.fileno() < 0:
                time.sleep(0.001)  # no connection (closing): pynetdicom's own pace
                return
            select.select([raw, self._waker.reader], [], [], IDLE_WAIT_SECONDS)
        except (OSError, ValueError):
            time.sleep(0.001)  # the socket closed under us; the next round notices
            return
        self._waker.drain()

    def _abort_after_exception(self) -> None:
        # pynetdicom's own handling: bypass the state machine, send an A-ABORT, stop both reactors.
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        try:
            if self.socket is not None:
                self.socket.send(abort_pdu.encode())
        finally:
            self.assoc.is_aborted = True
            self.assoc.is_established = False
            self.assoc._kill = True
            self._kill_thread = True

    def kill_dul(self) -> None:
        super().kill_dul()
        self._waker.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._waker.wake()
        while self.is_alive() and threading.current_thread() is not self:
            self.join(IDLE_WAIT_SECONDS)
        return True


class QuietAssociation(Association):
    """An accepted association whose reactor waits on its queues instead of sleeping 1 ms between looks."""

    _activity: threading.Event

    def kill(self) -> None:
        self._activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            # pynetdicom pauses the reactor (clears ``_reactor_checkpoint``) while a send_*() call in another
            # thread uses the DIMSE queue; it is "paused" whenever it is not touching the queues.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            self._activity.clear()

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]

            if self._finished_by_peer_or_timer():
                return
            if not msg:
                self._is_paused = True
                self._activity.wait(IDLE_WAIT_SECONDS)

    def _finished_by_peer_or_timer(self) -> bool:
        """pynetdicom's end-of-association checks, in its order: release, abort, DUL gone, network timeout."""
        if self.is_established and self.acse.is_release_requested():
            # Marked released before the A-RELEASE-RP goes out: the DUL thread sends it at once and the peer's
            # TCP close (EVT_CONN_CLOSE, in that thread) can then come before EVT_RELEASED below.
            self.is_released = True
            self.is_established = False
            self.acse.send_release(is_response=True)
            log.debug("association released")
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.error("network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


def make_quiet(assoc: Association) -> None:
    """Switch an accepted association, before its threads start, to the event-driven reactors.

    Call from an ``EVT_CONN_OPEN`` handler: pynetdicom triggers it after building the association and before
    ``assoc.start()``.
    """
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("make_quiet must run before the association's threads start")
    waker = _Waker()
    activity = threading.Event()
    dul = assoc.dul
    dul.__class__ = QuietDUL
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = BulkReadSocket
    dul._waker = waker  # type: ignore[attr-defined]
    dul.to_provider_queue = _NotifyingQueue(waker.wake, dul.to_provider_queue)
    # The DUL queues most of its events itself; only another thread's (a socket closed by the association
    # thread) needs to wake it.
    dul.event_queue = _NotifyingQueue(lambda: None if threading.current_thread() is dul else waker.wake(),
                                      dul.event_queue)
    dul.to_user_queue = _NotifyingQueue(activity.set, dul.to_user_queue)
    assoc.__class__ = QuietAssociation
    assoc._activity = activity  # type: ignore[attr-defined]
    assoc.dimse.msg_queue = _NotifyingQueue(activity.set, assoc.dimse.msg_queue)
