"""Event-driven reactors for accepted pynetdicom associations: wake on work instead of every millisecond.

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
how they wait. Only the receiver's accepted associations use them (:func:`make_quiet`, called from
``EVT_CONN_OPEN`` before the association's threads start).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

# Longest a reactor sleeps without a wake-up: the resolution of pynetdicom's ARTIM and idle timers here.
IDLE_WAIT_SECONDS = 0.05
# Most bytes one recv() call asks the kernel for when reading a PDU (pynetdicom asks for 4096 at a time).
READ_CHUNK_BYTES = 1 << 20


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
