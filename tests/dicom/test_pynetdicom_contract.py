"""The contract of node/dicom/pynetdicom_patches.py with pynetdicom's internals.

Every pynetdicom internal the patches use is checked here: the release series, the source of each upstream
function a patch overrides, copies or depends on (SHA-256, recorded for pynetdicom 3.0.4), and the names,
signatures and attributes used. After a pynetdicom upgrade a failure here names what changed: re-read that
upstream code, adapt the patch (or drop it), then record the new values. Do not just update the hashes.

That no other module uses private names of third-party packages is checked in tests/test_import_rules.py.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import queue
import re
import threading
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE, _config, build_context, dimse_messages, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.dicom import pynetdicom_patches as patches

def _resolve(qualified: str) -> Any:
    parts = qualified.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(qualified)


def _parameters(function: Any) -> list[tuple[str, Any]]:
    """Parameter names and defaults (annotations aside: they are strings in some releases)."""
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_pynetdicom_is_the_series_the_patches_were_written_for() -> None:
    assert pynetdicom.__version__.startswith(patches.PYNETDICOM_SERIES + "."), (
        f"pynetdicom {pynetdicom.__version__}: node/dicom/pynetdicom_patches.py follows {patches.PYNETDICOM_SERIES}.x"
    )


def test_upstream_sources_are_unchanged() -> None:
    changed = []
    for qualified, recorded in patches.UPSTREAM_SOURCES.items():
        try:
            source = inspect.getsource(_resolve(qualified))
        except (ImportError, AttributeError):
            changed.append(f"{qualified}: gone")
            continue
        digest = hashlib.sha256(source.encode()).hexdigest()
        if digest != recorded:
            changed.append(f"{qualified}: {digest}")
    assert not changed, "pynetdicom changed code the patches rely on:\n" + "\n".join(changed)


# Parameters of every upstream method the patches call or override.
SIGNATURES = {
    DULServiceProvider._process_recv_primitive: [("self", inspect.Parameter.empty)],
    DULServiceProvider._is_transport_event: [("self", inspect.Parameter.empty)],
    DULServiceProvider.kill_dul: [("self", inspect.Parameter.empty)],
    DULServiceProvider.stop_dul: [("self", inspect.Parameter.empty)],
    DULServiceProvider.idle_timer_expired: [("self", inspect.Parameter.empty)],
    DULServiceProvider.receive_pdu: [("self", inspect.Parameter.empty), ("wait", False), ("timeout", None)],
    Association._run_reactor: [("self", inspect.Parameter.empty)],
    Association.kill: [("self", inspect.Parameter.empty)],
    Association._serve_request: [("self", inspect.Parameter.empty), ("msg", inspect.Parameter.empty),
                                 ("context_id", inspect.Parameter.empty)],
    Association.release: [("self", inspect.Parameter.empty)],
    Association.abort: [("self", inspect.Parameter.empty), ("block", True)],
    ACSE.send_release: [("self", inspect.Parameter.empty), ("is_response", False)],
    ACSE.is_release_requested: [("self", inspect.Parameter.empty)],
    ACSE.is_aborted: [("self", inspect.Parameter.empty), ("abort_type", "both")],
    DIMSEServiceProvider.get_msg: [("self", inspect.Parameter.empty), ("block", False)],
    AssociationSocket.recv: [("self", inspect.Parameter.empty), ("nr_bytes", inspect.Parameter.empty)],
}


@pytest.mark.parametrize("method", list(SIGNATURES), ids=lambda method: method.__qualname__)
def test_called_and_overridden_methods_keep_their_parameters(method: Any) -> None:
    assert _parameters(method) == SIGNATURES[method]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (patches.QuietDUL.kill_dul, DULServiceProvider.kill_dul),
        (patches.QuietDUL.stop_dul, DULServiceProvider.stop_dul),
        (patches.QuietAssociation.kill, Association.kill),
        (patches.QuietAssociation._run_reactor, Association._run_reactor),
        (patches.BulkReadSocket.recv, AssociationSocket.recv),
    ],
    ids=lambda method: method.__qualname__,
)
def test_overrides_match_upstream_parameters(ours: Any, theirs: Any) -> None:
    assert _parameters(ours) == _parameters(theirs)


def test_dul_thread_runs_thread_run_so_quiet_dul_run_replaces_the_reactor() -> None:
    assert issubclass(DULServiceProvider, threading.Thread)
    assert DULServiceProvider.run is threading.Thread.run
    assert callable(DULServiceProvider.run_reactor)
    assert "_run_loop_delay" in inspect.getsource(DULServiceProvider.run_reactor)


def test_association_and_dul_have_the_attributes_the_reactors_use() -> None:
    assoc = Association(AE(), "acceptor")
    for name, kind in (("_kill", bool), ("_is_paused", bool), ("_reactor_checkpoint", threading.Event),
                       ("_dul_ready", threading.Event), ("is_established", bool), ("is_aborted", bool),
                       ("is_released", bool)):
        assert isinstance(getattr(assoc, name), kind), name
    assert isinstance(assoc.network_timeout_response, str)
    dul = assoc.dul
    assert isinstance(dul, DULServiceProvider)
    assert dul._kill_thread is False
    assert callable(dul._idle_timer.start) and callable(dul._idle_timer.restart)
    assert isinstance(dul.artim_timer.expired, bool)
    for name in ("event_queue", "to_provider_queue", "to_user_queue"):
        assert type(getattr(dul, name)) is queue.Queue, name
    assert dul.state_machine.current_state == "Sta1"
    assert assoc.is_acceptor is True and assoc.requestor.primitive is None  # until the A-ASSOCIATE-RQ is read
    # the acceptor waits for its request with receive_pdu(wait=True, timeout=...) and takes None as the time-out
    assert "self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)" in inspect.getsource(Association.run_reactor)
    assert "if primitive is None:" in inspect.getsource(Association.run_reactor)
    assert dul.socket is None
    assert type(assoc.dimse.msg_queue) is queue.Queue
    assert hasattr(assoc.dimse, "message")
    assert hasattr(DIMSEMessage(), "_data_set_file")


def test_queues_are_only_filled_through_put() -> None:
    """The reactors wake on ``put``; an upstream write straight into ``.queue`` would not wake them."""
    package = Path(pynetdicom.__file__).parent
    pattern = re.compile(r"(event_queue|to_provider_queue|to_user_queue|msg_queue)\.queue\.(append|appendleft|extend"
                         r"|extendleft|insert)\b")
    offenders = [f"{path.name}: {match.group(0)}" for path in sorted(package.glob("*.py"))
                 for match in pattern.finditer(path.read_text())]
    assert not offenders


def test_abort_pdu_fields() -> None:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = 0x00
    assert pdu.encode() == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"


def test_chunked_storage_switches_exist() -> None:
    assert isinstance(_config.STORE_RECV_CHUNKED_DATASET, bool)
    assert isinstance(_config.UNRESTRICTED_STORAGE_SERVICE, bool)
    assert "NamedTemporaryFile" in vars(dimse_messages)
    names = DIMSEMessage.decode_msg.__code__.co_names
    assert "NamedTemporaryFile" in names and "_data_set_file" in names and "STORE_RECV_CHUNKED_DATASET" in names


def test_enable_chunked_storage_routes_the_file_into_the_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", _config.UNRESTRICTED_STORAGE_SERVICE)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    patches.enable_chunked_storage(tmp_path)
    assert _config.STORE_RECV_CHUNKED_DATASET and _config.UNRESTRICTED_STORAGE_SERVICE
    handle = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # as decode_msg calls it
    handle.close()
    assert Path(handle.name).parent == tmp_path and Path(handle.name).name.startswith("rx-")


def test_decode_msg_writes_the_chunked_file_only_by_write_and_flush() -> None:
    """The hashing file (patch 1) hashes what goes through ``write``; a seek would make it give no digest."""
    source = inspect.getsource(DIMSEMessage.decode_msg)
    uses = set(re.findall(r"_data_set_file\.([a-z_.]+)\(", source))
    assert uses == {"write", "file.flush"}, uses
    scp = inspect.getsource(_resolve("pynetdicom.service_class.StorageServiceClass.SCP"))
    assert scp.index("evt.EVT_C_STORE") < scp.index("req._dataset_file.close()")  # the handler sees it open


def test_the_chunked_file_is_hashed_as_decode_msg_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", _config.UNRESTRICTED_STORAGE_SERVICE)
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    patches.enable_chunked_storage(tmp_path)
    handle = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    for fragment in (b"\x00" * 128, b"DICM", bytes(range(256)) * 5000, b"last"):
        handle.write(fragment)
        handle.file.flush()
    path = Path(handle.name)
    content = path.read_bytes()
    assert patches.received_digest(path) == (hashlib.sha256(content).hexdigest(), len(content))
    assert patches.received_digest(path) is None  # handed out once
    handle.close()


def test_the_standard_log_handlers_follow_the_log_handler_level_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    logging_events = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")  # pynetdicom's default
    assert all(Association(AE(), "requestor").get_handlers(event) for event in logging_events)
    patches.drop_standard_log_handlers()
    assert not any(Association(AE(), "requestor").get_handlers(event) for event in logging_events)


def test_server_gives_each_association_a_deepcopy_of_its_contexts() -> None:
    assert "deepcopy(self.server.contexts)" in inspect.getsource(RequestHandler._create_association)
    handle = inspect.getsource(RequestHandler.handle)
    assert handle.index("EVT_CONN_OPEN") < handle.index("assoc.start()")


def test_cheap_context_copies_equal_deep_copies() -> None:
    contexts = []
    for number, uid in enumerate(("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")):
        context = build_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        context.context_id = 2 * number + 1
        contexts.append(context)
    for value in vars(contexts[0]).values():  # only immutable values and lists of them
        assert isinstance(value, (str, int, bool, type(None), list)), value
        if isinstance(value, list):
            assert all(isinstance(item, (str, int, bool)) for item in value)
    cheap = copy.deepcopy(patches.CheaplyCopiedContexts(contexts))
    deep = copy.deepcopy(contexts)
    assert [vars(c) for c in cheap] == [vars(c) for c in deep]
    cheap[0].transfer_syntax.append("1.2.840.10008.1.2.2")
    assert "1.2.840.10008.1.2.2" not in contexts[0].transfer_syntax
