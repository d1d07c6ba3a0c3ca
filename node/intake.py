"""Durable intake of one received instance, whatever protocol brought it: DIMSE C-STORE (node/dicom/receiver.py)
or DICOMweb STOW-RS (node/dicomweb/stow.py).

Both edges write the incoming bytes to a file in ``<spool>/.incoming`` (never the whole instance in memory)
and hand it here; :meth:`Intake.store` then applies the guarantees of docs/architecture.md ("Guarantees of
intake") in one place: the disk watermark is checked, the header read and the file checked whole
(node/dicom/header_checks.py), what the object is decided from its header (node/dicom/provenance.py: our own
results and other AI results are stored but never start a revision), the file fsynced, renamed to its
content-hashed path and its directory fsynced (storage/spool.py), and the index row committed
(storage/intake.py, group commit). Only a :class:`Stored` answer may be acknowledged to the sender; a
:class:`Refused` one carries the PS3.4 status (0xA700, 0xC000, 0x0110 — the same codes STOW-RS reports as a
Failure Reason) and a reason safe to log (no PHI), and nothing of the instance is left behind.

This module speaks no protocol (no pynetdicom, no HTTP) and issues no SQL itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from node.dicom.header_checks import HeaderError, HeaderInfo, identify, read_header
from node.dicom.provenance import ResultRecognition
from storage.intake import IndexOutcome, InstanceRecord, IntakeRepository
from storage.spool import ContentDigest, Spool

log = logging.getLogger("msknode.intake")

# PS3.4 B.2.3 (C-STORE) status codes; PS3.18 10.5.3 uses the same values as STOW-RS Failure Reasons.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Stored:
    """Durable and indexed: the sender may be told Success."""

    header: HeaderInfo
    outcome: IndexOutcome
    size: int


@dataclass(frozen=True)
class Refused:
    """Not stored (nothing left in the spool or the index); ``header`` when it could be read."""

    status: int
    reason: str
    header: HeaderInfo | None = None
    # when the header could not be read: the UIDs found anyway (best effort), to name the instance in a response
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if self.header is not None:
            object.__setattr__(self, "sop_class_uid", self.header.sop_class_uid)
            object.__setattr__(self, "sop_instance_uid", self.header.sop_instance_uid)


class Intake:
    """One received file at a time, from any thread (the spool and the index repository are thread-safe)."""

    def __init__(self, index: IntakeRepository, spool: Spool, min_free_disk_mb: int,
                 recognition: ResultRecognition | None = None) -> None:
        self.index = index
        self.spool = spool
        self.min_free_disk_mb = min_free_disk_mb
        # Which received objects are results (ours echoed back, another AI's): stored, never analysed.
        self.recognition = recognition or ResultRecognition.default()

    def has_room(self) -> bool:
        """The spool's filesystem is above ``storage.min_free_disk_mb``."""
        return self.spool.has_room(self.min_free_disk_mb)

    def store(self, temp_path: Path, *, calling_ae_title: str, association_id: str,
              expected_sop_instance_uid: str | None = None,
              expected_study_instance_uid: str | None = None,
              content_digest: ContentDigest | None = None) -> Stored | Refused:
        """Make ``temp_path`` (consumed) durable and indexed, or refuse it.

        ``expected_sop_instance_uid``: the C-STORE request's Affected SOP Instance UID, which the dataset must
        match (else the peer would record Success for a UID never stored). ``expected_study_instance_uid``: the
        study of a STOW-RS ``/studies/{study}`` request, which the dataset must belong to. ``content_digest``:
        the file's (SHA-256, size) when the edge hashed it while writing it (storage.spool.HashingWriter), so the
        spool need not read it back.
        """
        temp_path = Path(temp_path)
        if not self.has_room():
            temp_path.unlink(missing_ok=True)
            log.warning("refused instance on association %s: disk below watermark", association_id)
            return Refused(STATUS_OUT_OF_RESOURCES, "Out of resources: spool disk below watermark")

        try:
            header = read_header(temp_path, self.recognition)
        except HeaderError as exc:
            sop_class, sop_instance = identify(temp_path)
            temp_path.unlink(missing_ok=True)
            log.warning("refused instance on association %s: %s", association_id, exc.reason)
            return Refused(STATUS_CANNOT_UNDERSTAND, exc.reason, None, sop_class, sop_instance)

        if expected_sop_instance_uid is not None and expected_sop_instance_uid != header.sop_instance_uid:
            temp_path.unlink(missing_ok=True)
            log.warning("refused instance on association %s: dataset SOP Instance UID differs from the request",
                        association_id)
            return Refused(STATUS_CANNOT_UNDERSTAND, "SOP Instance UID differs from the C-STORE request", header)
        if expected_study_instance_uid is not None and expected_study_instance_uid != header.study_instance_uid:
            temp_path.unlink(missing_ok=True)
            log.warning("refused instance on association %s: not of the study named in the request", association_id)
            return Refused(STATUS_CANNOT_UNDERSTAND, "Study Instance UID differs from the study in the request URL",
                           header)

        try:
            stored = self.spool.commit_file(
                temp_path, header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid,
                content_digest,
            )
        except ValueError as exc:  # UIDs that cannot be path components
            temp_path.unlink(missing_ok=True)
            log.warning("refused instance on association %s: %s", association_id, exc)
            return Refused(STATUS_CANNOT_UNDERSTAND, "invalid UID in dataset", header)
        except OSError:
            temp_path.unlink(missing_ok=True)
            log.exception("cannot write instance %s to the spool", header.sop_instance_uid)
            return Refused(STATUS_OUT_OF_RESOURCES, "Out of resources: cannot write to spool", header)

        record = InstanceRecord(
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            accession_number=header.accession_number,
            study_date=header.study_date,
            modality=header.modality,
            body_part_examined=header.body_part_examined,
            series_number=header.series_number,
            instance_number=header.instance_number,
            spool_path=stored.relative_path,
            size_bytes=stored.size,
            sha256=stored.sha256,
            calling_ae_title=calling_ae_title,
            association_id=association_id,
            intake_kind=header.intake_kind,
            intake_reason=header.intake_reason,
        )
        try:
            result = self.index.index_instance(record)
        except SQLAlchemyError:
            if not stored.already_present:
                self.spool.remove(stored.relative_path)  # never leave a file the index does not know
            log.exception("index unavailable: refused instance %s", header.sop_instance_uid)
            return Refused(STATUS_PROCESSING_FAILURE, "index database unavailable", header)

        if stored.already_present and not self.spool.absolute(stored.relative_path).exists():
            # Identical bytes were already in place, and retention purged the study between that check and this
            # index commit (it removes files before it commits: storage/retention.py). Nothing is stored: refuse,
            # so the peer sends again and the file is written afresh.
            log.warning("instance %s: the stored copy was purged by retention meanwhile; refused (to be re-sent)",
                        header.sop_instance_uid)
            return Refused(STATUS_PROCESSING_FAILURE, "stored copy purged meanwhile; send again", header)

        if result.outcome is IndexOutcome.REPLACED and result.previous_spool_path:
            if result.previous_spool_path != stored.relative_path:
                self.spool.remove(result.previous_spool_path)
            log.info("instance %s replaced (study %s) on association %s",
                     header.sop_instance_uid, header.study_instance_uid, association_id)
        log.debug("stored %s (%s, %d bytes)", header.sop_instance_uid, result.outcome.value, stored.size)
        return Stored(header, result.outcome, stored.size)
