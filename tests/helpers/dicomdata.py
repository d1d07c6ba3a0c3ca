"""DICOM test data for intake: small distinct instances, and the byte-level view used to prove storage is exact.

Instances are synthesised with numpy (64 x 64, 12 of 16 bits) so a hundred of them cost nothing; nothing
binary is committed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

DEFLATED = str(DeflatedExplicitVRLittleEndian)


def small_instance(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
    instance_number: int = 1,
) -> FileDataset:
    """A small uncompressed CR instance whose pixels depend on ``seed`` (so instances differ byte-wise)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = "20260101"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = "CR"
    ds.BodyPartExamined = "HAND"
    ds.PatientName = "Phantom^Intake"
    ds.PatientID = "PHANTOM"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(rows), np.arange(columns)).astype(np.uint16) * 8
    pixels = (ramp + rng.integers(0, 64, size=(rows, columns), dtype=np.uint16)) & 0x0FFF
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_instance(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_instances(directory: Path, count: int, *, study_uid: str | None = None, seed: int = 0) -> list[Path]:
    """``count`` distinct instances of one study (one series) written to ``directory``."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        write_instance(
            small_instance(study_uid=study_uid, series_uid=series_uid, seed=seed + i, instance_number=i + 1),
            directory / f"inst{i:04d}.dcm",
        )
        for i in range(count)
    ]


def split_part10(path: Path) -> tuple[str, bytes]:
    """(transfer syntax UID, the raw bytes of the dataset after the file meta group) of a Part 10 file.

    The file meta group is always explicit VR little endian and starts with its group length, so its end
    is found without trusting any parser.
    """
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM Part 10 file")
    group, element, vr = struct.unpack("<HH2s", data[132:138])
    if (group, element, vr) != (0x0002, 0x0000, b"UL"):
        raise ValueError(f"{path}: file meta group does not start with its group length")
    (length,) = struct.unpack("<I", data[140:144])
    end = 144 + length
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.TransferSyntaxUID), data[end:]


def comparable_dataset_bytes(path: Path) -> bytes:
    """The dataset bytes to compare between a sent file and its stored copy.

    For Deflated Explicit VR Little Endian the deflate stream itself is not comparable: storescu inflates
    the file when it reads it and deflates again (its own level) when it sends, so the stored bytes are a
    different but equivalent deflate stream of the same dataset. There we compare the inflated bytes.
    """
    syntax, body = split_part10(path)
    if syntax == DEFLATED:
        return zlib.decompress(body, -zlib.MAX_WBITS)
    return body


def truncated_copy(source: Path, target: Path, keep_fraction: float = 0.6) -> Path:
    """A copy of ``source`` cut part-way through (a transfer that lost its tail)."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep_fraction)])
    return target
