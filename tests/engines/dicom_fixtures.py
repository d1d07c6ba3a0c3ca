"""Small synthetic DICOM images in every transfer syntax the receiver accepts, built at test time.

Nothing here is committed as a binary fixture: each dataset is synthesised with numpy and encoded with
pydicom's own encoders (RLE, JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg, deflate), DCMTK's
command-line tools (big endian, the four JPEG processes) or OpenJPH's ``ojph_compress`` (HTJ2K).
A syntax whose tool is missing is reported by :func:`missing_tool` so that tests can skip with a reason.

Other test modules may import these helpers (e.g. ``from tests.engines.dicom_fixtures import ...`` or,
with ``tests/engines`` on ``sys.path``, ``from dicom_fixtures import ...``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
    generate_uid,
)


def synthetic_radiograph(rows: int, columns: int, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth, radiograph-like image: dark background, a bright 'bone' band, soft tissue and noise.

    Smooth structure with mild noise compresses like real radiographs (about 2:1 lossless), unlike
    white noise, so decode timings on it are realistic.
    """
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    y /= rows
    x /= columns
    soft_tissue = np.exp(-(((x - 0.5) / 0.32) ** 2)) * 0.45
    bone = np.exp(-(((x - 0.5 - 0.05 * np.sin(6 * y)) / 0.08) ** 2)) * 0.35
    texture = 0.03 * np.sin(40 * x + 3 * np.cos(25 * y)) * (bone > 0.05)
    image = 0.05 + soft_tissue + bone + texture
    image += rng.normal(0.0, 0.006, size=image.shape).astype(np.float32)
    return np.clip(image * top, 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def make_dataset(
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_representation: int = 0,
    **attributes: object,
) -> FileDataset:
    """An uncompressed (explicit VR little endian) DX dataset around ``pixels``.

    ``pixels`` is (rows, cols), (frames, rows, cols) for multi-frame, or (rows, cols, 3) for RGB.
    Extra keyword arguments become DICOM attributes (e.g. ``WindowCenter=...``).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "TEST"
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3 and photometric.startswith(("RGB", "YBR"))
    frames = pixels.shape[0] if (pixels.ndim == 3 and not colour) or pixels.ndim == 4 else 1
    ds.Rows, ds.Columns = (pixels.shape[-3:-1] if colour else pixels.shape[-2:])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.PixelSpacing = [0.15, 0.15]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


@dataclass(frozen=True)
class Syntax:
    """One transfer syntax fixture: how to make it and what to expect from decoding it."""

    key: str
    uid: UID
    lossless: bool
    tool: str | None = None  # command-line tool required, if any
    eight_bit_only: bool = False  # JPEG baseline can only carry 8-bit samples
    lossy_tolerance: float = 0.0  # mean abs error allowed on min-max normalised [0, 1] images


SYNTAXES: dict[str, Syntax] = {
    s.key: s
    for s in [
        Syntax("implicit_le", UID("1.2.840.10008.1.2"), True, "dcmconv"),
        Syntax("explicit_le", ExplicitVRLittleEndian, True),
        Syntax("explicit_be", UID("1.2.840.10008.1.2.2"), True, "dcmconv"),
        Syntax("deflated", UID("1.2.840.10008.1.2.1.99"), True, "dcmconv"),
        Syntax("jpeg_baseline", UID("1.2.840.10008.1.2.4.50"), False, "dcmcjpeg", True, 0.01),
        Syntax("jpeg_extended", UID("1.2.840.10008.1.2.4.51"), False, "dcmcjpeg", False, 0.01),
        Syntax("jpeg_lossless_p14", UID("1.2.840.10008.1.2.4.57"), True, "dcmcjpeg"),
        Syntax("jpeg_lossless_sv1", UID("1.2.840.10008.1.2.4.70"), True, "dcmcjpeg"),
        Syntax("jpegls_lossless", JPEGLSLossless, True),
        Syntax("jpegls_near_lossless", JPEGLSNearLossless, False, None, False, 0.001),
        Syntax("j2k_lossless", JPEG2000Lossless, True),
        Syntax("j2k_lossy", JPEG2000, False, None, False, 0.01),
        Syntax("htj2k_lossless", HTJ2KLossless, True, "ojph_compress"),
        Syntax("htj2k_rpcl", HTJ2KLosslessRPCL, True, "ojph_compress"),
        Syntax("htj2k_lossy", HTJ2K, False, "ojph_compress", False, 0.01),
        Syntax("rle", RLELossless, True),
    ]
}

_DCMCJPEG_FLAGS = {
    "jpeg_baseline": ["+eb", "+q", "95"],
    "jpeg_extended": ["+ee", "+q", "95"],
    "jpeg_lossless_p14": ["+el"],
    "jpeg_lossless_sv1": ["+e1"],
}
_DCMCONV_FLAGS = {"implicit_le": "+ti", "explicit_be": "+tb", "deflated": "+td"}


def missing_tool(key: str) -> str | None:
    """The command-line tool a syntax needs that is not installed, or None."""
    tool = SYNTAXES[key].tool
    return tool if tool and shutil.which(tool) is None else None


def _run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")


def _frames(ds: Dataset) -> np.ndarray:
    """The uncompressed pixels of ``ds`` as (frames, rows, cols)."""
    arr = ds.pixel_array
    return arr.reshape(int(getattr(ds, "NumberOfFrames", 1) or 1), ds.Rows, ds.Columns)


def _htj2k_codestream(frame: np.ndarray, ds: Dataset, key: str, work: Path) -> bytes:
    """Encode one grey frame with OpenJPH's ojph_compress (PGM in, .j2c codestream out)."""
    pgm = work / "frame.pgm"
    maxval = (1 << int(ds.BitsStored)) - 1
    header = f"P5\n{frame.shape[1]} {frame.shape[0]}\n{maxval}\n".encode()
    body = frame.astype(">u2").tobytes() if maxval > 255 else frame.astype(np.uint8).tobytes()
    pgm.write_bytes(header + body)
    out = work / "frame.j2c"
    args = ["ojph_compress", "-i", str(pgm), "-o", str(out), "-num_decomps", "5"]
    if key == "htj2k_lossy":
        args += ["-reversible", "false", "-qstep", "0.002"]
    else:
        args += ["-reversible", "true"]
    args += ["-prog_order", "RPCL" if key == "htj2k_rpcl" else "LRCP"]
    _run(args)
    return out.read_bytes()


def encode(ds: FileDataset, key: str, work_dir: Path) -> FileDataset:
    """Return a copy of the uncompressed ``ds`` re-encoded in the syntax ``key`` (read back from disk).

    Reading the written file back means the test decodes exactly what a receiver would have stored.
    """
    syntax = SYNTAXES[key]
    if (tool := missing_tool(key)) is not None:
        raise RuntimeError(f"{tool} is not installed")
    work_dir.mkdir(parents=True, exist_ok=True)
    source = work_dir / f"{key}_in.dcm"
    target = work_dir / f"{key}.dcm"
    ds.save_as(source, enforce_file_format=True)
    if key == "explicit_le":
        shutil.copy(source, target)
    elif key in _DCMCONV_FLAGS:
        _run(["dcmconv", _DCMCONV_FLAGS[key], str(source), str(target)])
    elif key in _DCMCJPEG_FLAGS:
        _run(["dcmcjpeg", *_DCMCJPEG_FLAGS[key], str(source), str(target)])
    elif key.startswith("htj2k"):
        copy = pydicom.dcmread(source)
        fragments = [_htj2k_codestream(f, copy, key, work_dir) for f in _frames(copy)]
        copy.PixelData = encapsulate(fragments)
        copy["PixelData"].VR = "OB"
        copy["PixelData"].is_undefined_length = True
        copy.file_meta.TransferSyntaxUID = syntax.uid
        copy.save_as(target, enforce_file_format=True)
    else:
        copy = pydicom.dcmread(source)
        kwargs: dict[str, object] = {}
        if key == "jpegls_near_lossless":
            kwargs["jls_error"] = 2
        elif key == "j2k_lossy":
            kwargs["j2k_cr"] = [15]
        copy.compress(syntax.uid, **kwargs)
        copy.save_as(target, enforce_file_format=True)
    return pydicom.dcmread(target)
