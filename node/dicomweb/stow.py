"""STOW-RS (PS3.18 10.5): ``POST {base}/studies`` and ``POST {base}/studies/{study}``, ``multipart/related;
type="application/dicom"``, with the guarantees C-STORE has (docs/architecture.md, "Guarantees of intake").

- **Who**: a bearer token per peer (node/dicomweb/auth.py; only its SHA-256 is configured), the peer's
  ``may_send`` and host; mutual TLS in the handshake when configured. 401 / 403 otherwise.
- **Audit**: every request is an ``associations`` row (called AE ``STOW-RS``): rejected ones with the reason,
  accepted ones ``open`` while the body streams, then ``released`` (the body read to its end) or ``aborted``
  (the client went away, the body was malformed or too large), with the number of instances stored. Study
  completion treats them exactly like DIMSE associations.
- **Refuse before acknowledging**: below the disk watermark the request is answered 503 (``Retry-After``)
  before a byte of the body is read; a body over ``max_request_mb`` is 413.
- **Streaming**: each part is written as it arrives to a file in ``<spool>/.incoming`` (node/dicomweb/multipart.py);
  no instance is ever held in memory whole.
- **Durable before the answer**: each part goes through :meth:`node.intake.Intake.store` (header checks, own /
  AI results recognised, fsync + rename + directory fsync, index group commit, duplicates by content hash) —
  the very path C-STORE uses. The response lists every instance: stored ones in Referenced SOP Sequence,
  refused ones in Failed SOP Sequence with their Failure Reason (0xA700, 0xC000, 0x0110): 200 all stored,
  202 some failed, 409 none stored, 400 a malformed request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from node.dicomweb.auth import authenticate
from node.dicomweb.multipart import BodyTooLarge, MultipartError, Part, PartSink, media_type, read_parts
from node.intake import STATUS_CANNOT_UNDERSTAND, Intake, Refused, Stored
from node.settings import DicomwebSettings, PeerSettings
from storage.intake import IntakeRepository
from storage.spool import ContentDigest, HashingWriter, is_valid_uid

log = logging.getLogger("msknode.dicomweb")

CALLED = "STOW-RS"  # the audit row's called AE title: this request came over DICOMweb
PART_PREFIX = "stow-"  # partial files in <spool>/.incoming (swept by the dicomweb role at start)
DICOM_JSON = "application/dicom+json"

# PS3.18 Table 10.5.3-1 / PS3.4 B.2.3 attributes of the Store Instances Response Module
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_SOP_CLASS = "00081150"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class InstanceOutcome:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: int | None = None  # None = stored
    reason: str = ""


def store_response_body(outcomes: Sequence[InstanceOutcome]) -> dict[str, object]:
    """The Store Instances Response Module as DICOM JSON (PS3.18 F.2)."""

    def uid(value: str | None) -> dict[str, object]:
        return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}

    body: dict[str, object] = {}
    failed = [{_SOP_CLASS: uid(o.sop_class_uid), _SOP_INSTANCE: uid(o.sop_instance_uid),
               _FAILURE_REASON: {"vr": "US", "Value": [o.failure]}} for o in outcomes if o.failure is not None]
    stored = [{_SOP_CLASS: uid(o.sop_class_uid), _SOP_INSTANCE: uid(o.sop_instance_uid)}
              for o in outcomes if o.failure is None]
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if stored:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    return body


def response_status(outcomes: Sequence[InstanceOutcome]) -> int:
    stored = sum(1 for o in outcomes if o.failure is None)
    if stored == len(outcomes):
        return 200
    return 202 if stored else 409


@dataclass(frozen=True)
class _SpooledPart:
    """A part written whole to ``path``, with the (SHA-256, size) hashed as it was written (None: hash it)."""

    path: Path
    content_digest: ContentDigest | None


class _SpoolSink(PartSink):
    """One part's bytes, written as they arrive to a 0600 file in ``<spool>/.incoming``, hashed meanwhile in a
    thread of storage.spool's pool (so intake need not read the file back)."""

    def __init__(self, incoming: Path) -> None:
        self.path = incoming / f"{PART_PREFIX}{uuid.uuid4().hex}.part"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._writer: HashingWriter | None = HashingWriter(os.fdopen(fd, "wb"))

    def write(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    def close(self) -> _SpooledPart:
        digest = None
        if self._writer is not None:
            digest = self._writer.content_digest()
            self._writer.close()
            self._writer = None
        return _SpooledPart(self.path, digest)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.path.unlink(missing_ok=True)


class _Aborted(Exception):
    """The request cannot be completed; ``status`` is answered (if the client is still there)."""

    def __init__(self, status: int, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.outcome, self.detail = status, outcome, detail


async def _chunks(request: Request, timeout: float) -> AsyncIterator[bytes]:
    """The body as it arrives; a client silent for ``timeout`` seconds mid-body is dropped (408)."""
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise _Aborted(408, "aborted", f"client silent for {timeout:.0f} s mid-request") from None
        except ClientDisconnect:
            raise _Aborted(400, "aborted", "client disconnected mid-request") from None
        if chunk:
            yield chunk


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


class StowService:
    """Handles STOW-RS requests; ``peers`` is a callable so run-time peer changes apply to the next request."""

    def __init__(self, settings: DicomwebSettings, peers: Callable[[], Sequence[PeerSettings]], intake: Intake,
                 index: IntakeRepository) -> None:
        self.settings = settings
        self.peers = peers
        self.intake = intake
        self.index = index

    async def _audit(self, calling: str, address: str, port: int | None, peer: str | None,
                     reject_reason: str | None) -> str:
        return await run_in_threadpool(self.index.association_requested, calling, CALLED, address, port, peer,
                                       reject_reason)

    async def store(self, request: Request) -> Response:
        study = request.path_params.get("study")
        client = request.client
        address, port = (client.host, client.port) if client else ("", None)

        # -- who: before anything else, and audited ----------------------------------------------
        decision = authenticate(self.peers(), request.headers.get("authorization"), address,
                                self.settings.check_peer_host)
        calling = decision.peer.ae_title if decision.peer else ""
        peer_name = decision.peer.name if decision.peer else None
        if not decision.accepted:
            try:
                await self._audit(calling, address, port, peer_name, decision.reason)
            except SQLAlchemyError:
                log.exception("cannot record the refused STOW-RS request from %s", address)
            log.warning("refused STOW-RS request from %s: %s", address, decision.reason)
            headers = {"WWW-Authenticate": 'Bearer realm="msknode STOW-RS"'} if decision.status == 401 else None
            return _problem(decision.status, decision.reason or "not allowed", headers)

        async def reject(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> Response:
            try:
                await self._audit(calling, address, port, peer_name, reason)
            except SQLAlchemyError:
                log.exception("cannot record the refused STOW-RS request from %s", peer_name)
            log.warning("refused STOW-RS request from %s (%s): %s", peer_name, address, reason)
            return _problem(status, detail, headers)

        # -- what: a well-formed request for the right media type ---------------------------------
        if study is not None and not is_valid_uid(study):
            return await reject(400, "bad-study-uid", "the study in the URL is not a UID")
        kind, params = media_type(request.headers.get("content-type", ""))
        if kind != "multipart/related":
            return await reject(415, "unsupported-media-type", 'expected multipart/related; type="application/dicom"')
        if params.get("type", "application/dicom").lower() != "application/dicom":
            return await reject(415, "unsupported-media-type",
                                f"type={params.get('type')!r} not supported; only application/dicom (PS3.10 files)")
        boundary = params.get("boundary")
        if not boundary:
            return await reject(400, "no-boundary", "multipart/related without a boundary")
        limit = self.settings.max_request_mb * 1024 * 1024
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await reject(413, "request-too-large", f"request body over {self.settings.max_request_mb} MB")

        # -- room: refuse before reading (nothing acknowledged, nothing half-written) --------------
        if not self.intake.has_room():
            return await reject(503, "disk-below-watermark", "out of resources: spool disk below watermark",
                                {"Retry-After": "60"})

        try:
            association_id = await self._audit(calling, address, port, peer_name, None)
        except SQLAlchemyError:
            log.exception("cannot record a STOW-RS request from %s: refusing it", peer_name)
            return _problem(503, "index database unavailable", {"Retry-After": "30"})
        log.info("STOW-RS request %s from %s (%s)%s", association_id, peer_name, address,
                 f" for study {study}" if study else "")
        started = time.monotonic()
        outcomes: list[InstanceOutcome] = []
        end = "released"
        try:
            parts = read_parts(_chunks(request, self.settings.timeout_seconds), boundary,
                               lambda part: _SpoolSink(self.intake.spool.incoming), max_bytes=limit)
            async for part in parts:
                outcomes.append(await self._store_part(part, calling, association_id, study))
            if not outcomes:
                raise _Aborted(400, "aborted", "no body parts in the request")
        except _Aborted as exc:
            end = exc.outcome
            log.warning("STOW-RS request %s from %s: %s", association_id, peer_name, exc.detail)
            return _problem(exc.status, exc.detail)
        except BodyTooLarge as exc:
            end = "aborted"
            return _problem(413, str(exc))
        except MultipartError as exc:
            end = "aborted"
            log.warning("STOW-RS request %s from %s: malformed body: %s", association_id, peer_name, exc)
            return _problem(400, f"malformed multipart body: {exc}")
        except BaseException:
            end = "aborted"
            raise
        finally:
            stored = sum(1 for o in outcomes if o.failure is None)
            try:
                await run_in_threadpool(self.index.association_ended, association_id, end, stored)
            except SQLAlchemyError:
                log.exception("cannot record the end of STOW-RS request %s", association_id)
            log.info("STOW-RS request %s %s: %d stored, %d failed in %.2f s", association_id, end, stored,
                     len(outcomes) - stored, time.monotonic() - started)
        return JSONResponse(store_response_body(outcomes), status_code=response_status(outcomes),
                            media_type=DICOM_JSON)

    async def _store_part(self, part: Part, calling: str, association_id: str, study: str | None) -> InstanceOutcome:
        spooled = part.result
        assert isinstance(spooled, _SpooledPart)
        path = spooled.path
        part_type, _ = media_type(part.content_type)
        if part_type not in ("", "application/dicom"):
            path.unlink(missing_ok=True)
            return InstanceOutcome(None, None, STATUS_CANNOT_UNDERSTAND, f"part of type {part_type} not supported")
        try:
            result = await run_in_threadpool(self.intake.store, path, calling_ae_title=calling,
                                             association_id=association_id, expected_study_instance_uid=study,
                                             content_digest=spooled.content_digest)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if isinstance(result, Stored):
            return InstanceOutcome(result.header.sop_class_uid, result.header.sop_instance_uid)
        assert isinstance(result, Refused)
        return InstanceOutcome(result.sop_class_uid, result.sop_instance_uid, result.status, result.reason)
