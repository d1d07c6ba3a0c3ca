"""Read what intake needs from a received file — header attributes only — and check the file is whole.

Pixel data is never decoded on receive. A truncated transfer is caught by walking the Pixel Data element's
declared length (native) or its fragment items (encapsulated) against the file size, which costs a few
seeks, not a decode.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from node.dicom.provenance import IMAGE, ResultRecognition, classify

PIXEL_DATA_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_IMAGE_PIXEL_KEYWORDS = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class HeaderError(Exception):
    """The received file cannot be accepted; ``reason`` is safe to log (no PHI)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HeaderInfo:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    accession_number: str | None
    study_date: str | None
    modality: str | None
    body_part_examined: str | None
    series_number: int | None
    instance_number: int | None
    # node/dicom/provenance.py: image / non_image / own_result / ai_result, and why (None for an image)
    intake_kind: str = IMAGE
    intake_reason: str | None = None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _as_read(ds: pydicom.Dataset) -> Iterator[DataElement | RawDataElement]:
    """The top-level elements in the order read, as read: ``keep_deferred`` stops ``get_item`` converting a raw
    element whose value is None (an empty value of some VRs; nothing is deferred here)."""
    return (ds.get_item(tag, keep_deferred=True) for tag in ds.keys())


def _check_no_short_values(ds: pydicom.Dataset) -> None:
    """Refuse an element whose declared length runs past the end of the data.

    pydicom reads such a value short without complaint, so a corrupt length can swallow the rest of the
    dataset (UIDs, image attributes, pixel data) and still parse. Must run before elements are converted.
    """
    for raw in _as_read(ds):
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and isinstance(raw.value, bytes):
            if len(raw.value) != raw.length:
                raise HeaderError(
                    f"truncated dataset: element {raw.tag} declares {raw.length} bytes, {len(raw.value)} present"
                )


def _check_ends_on_an_element(ds: pydicom.Dataset, offset: int) -> None:
    """Refuse data that stops inside an element header.

    pydicom silently ignores 1-7 trailing bytes that do not make a whole element header, so a transfer cut
    just there (before the image attributes) would otherwise parse as a complete non-image instance.
    ``offset`` is where pydicom stopped: the end of the data, or the start of Pixel Data.
    """
    raw_elements = [raw for raw in _as_read(ds) if isinstance(raw, RawDataElement)]
    if not raw_elements:
        return
    last = max(raw_elements, key=lambda raw: raw.value_tell or 0)
    if last.length == 0xFFFFFFFF or last.value_tell is None:
        return  # an undefined-length sequence: its delimiters were checked by the parser
    if last.value_tell + last.length < offset:
        raise HeaderError(f"truncated dataset: data ends inside the element after {last.tag}")


def read_header(path: Path, recognition: ResultRecognition | None = None) -> HeaderInfo:
    """Parse the header of a DICOM Part 10 file written by the receiver; raise :class:`HeaderError`.

    ``recognition`` decides what the object is (image, non-image, our own or another AI's result) from the
    header; the defaults when not given.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
            meta = ds.file_meta
            _check_no_short_values(ds)
            pixel_offset = handle.tell()
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                _check_ends_on_an_element(ds, pixel_offset)
            transfer_syntax = str(meta.get("TransferSyntaxUID", ""))
            # Touch every element so deferred parse errors surface here, not later in a worker.
            for _ in ds.iterall():
                pass
    except HeaderError:
        raise
    except (InvalidDicomError, EOFError, struct.error, ValueError, KeyError, OSError, TypeError) as exc:
        raise HeaderError(f"unparseable dataset: {type(exc).__name__}") from None
    except Exception as exc:  # pydicom raises a variety of errors on malformed input
        raise HeaderError(f"unparseable dataset: {type(exc).__name__}") from None

    missing = [
        keyword
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        if not _text(ds, keyword)
    ]
    if missing:
        raise HeaderError("missing required attribute(s): " + ", ".join(missing))
    if not transfer_syntax:
        raise HeaderError("no transfer syntax in file meta")

    has_pixel_data = pixel_offset < size
    # Any Image Pixel attribute means pixel data must follow: a transfer cut on an element boundary inside
    # that module (found by the fuzzer: after SamplesPerPixel) otherwise parses as a complete dataset.
    has_image_attributes = any(keyword in ds for keyword in _IMAGE_PIXEL_KEYWORDS)
    if has_image_attributes and not has_pixel_data and transfer_syntax != DeflatedExplicitVRLittleEndian:
        raise HeaderError("truncated dataset: image attributes present but no pixel data")
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        _check_pixel_data_complete(path, pixel_offset, size, transfer_syntax)

    kind, kind_reason = classify(ds, has_pixel_data or has_image_attributes, recognition or ResultRecognition.default())
    return HeaderInfo(
        study_instance_uid=str(ds.StudyInstanceUID).strip(),
        series_instance_uid=str(ds.SeriesInstanceUID).strip(),
        sop_instance_uid=str(ds.SOPInstanceUID).strip(),
        sop_class_uid=str(ds.SOPClassUID).strip(),
        transfer_syntax_uid=transfer_syntax,
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        intake_kind=kind,
        intake_reason=kind_reason,
    )


def _check_pixel_data_complete(path: Path, offset: int, size: int, transfer_syntax: str) -> None:
    """Walk the top-level elements from ``offset`` (Pixel Data and anything after it, such as trailing
    padding) to the end of the file, checking that each declared length fits."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    with open(path, "rb") as handle:
        handle.seek(offset)

        def read_exact(count: int) -> bytes:
            data = handle.read(count)
            if len(data) != count:
                raise HeaderError("truncated dataset: data ends inside an element")
            return data

        while handle.tell() < size:
            group, element = struct.unpack(endian + "HH", read_exact(4))
            if implicit:
                (length,) = struct.unpack(endian + "I", read_exact(4))
            else:
                vr = read_exact(2)
                if vr in _LONG_VRS:
                    read_exact(2)
                    (length,) = struct.unpack(endian + "I", read_exact(4))
                else:
                    (length,) = struct.unpack(endian + "H", read_exact(2))
            if length != 0xFFFFFFFF:
                if handle.tell() + length > size:
                    raise HeaderError(
                        f"truncated dataset: element ({group:04X},{element:04X}) declares {length} bytes, "
                        f"{size - handle.tell()} present"
                    )
                handle.seek(length, os.SEEK_CUR)
                continue
            if (group, element) not in PIXEL_DATA_TAGS:
                return  # an undefined-length sequence after the pixel data: pydicom already parsed it
            # Encapsulated pixel data: items until the sequence delimiter (PS3.5 A.4), little endian.
            while True:
                item_group, item_element, item_length = struct.unpack("<HHI", read_exact(8))
                if (item_group, item_element) == _SEQUENCE_DELIMITER:
                    break
                if (item_group, item_element) != _ITEM:
                    raise HeaderError("malformed encapsulated pixel data: unexpected tag in fragment sequence")
                if handle.tell() + item_length > size:
                    raise HeaderError("truncated dataset: pixel data fragment ends early")
                handle.seek(item_length, os.SEEK_CUR)


def identify(path: Path) -> tuple[str | None, str | None]:
    """Best effort (SOP Class UID, SOP Instance UID) of a file :func:`read_header` refused, so the refusal can
    name the instance (STOW-RS Failed SOP Sequence): the file meta's, else the dataset's; (None, None) if unreadable."""
    try:
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True,
                                 specific_tags=["SOPClassUID", "SOPInstanceUID"])
        meta = getattr(ds, "file_meta", None)
        sop_class = _text(meta, "MediaStorageSOPClassUID") if meta is not None else None
        sop_instance = _text(meta, "MediaStorageSOPInstanceUID") if meta is not None else None
        return sop_class or _text(ds, "SOPClassUID"), sop_instance or _text(ds, "SOPInstanceUID")
    except Exception:  # noqa: BLE001 - anything unreadable simply stays unnamed
        return None, None
