"""Pixel decoding for every transfer syntax the receiver accepts, with reduced-resolution JPEG 2000.

Decoding, not the model, bounds a CPU pipeline: a lossless JPEG 2000 radiograph costs ~0.5-0.8 s of one
core at full size, yet the model needs only 224 x 224. JPEG 2000 and HTJ2K codestreams are wavelet
pyramids, so they can be decoded at 1/2**r of the size while skipping the finest resolution levels'
entropy decoding entirely. pylibjpeg-openjpeg 2.6 (the newest release) exposes no ``reduce`` argument;
Pillow's JPEG 2000 plugin (same OpenJPEG library, 2.5.x, which also decodes HTJ2K) does, so the reduced
path goes through Pillow and the full-size path through pydicom's pixel decoders with the plugin that
measured fastest (see ``docs/preprocessing.md`` and ``benchmarks/decode.py``).

Every failure (unsupported syntax, corrupt or truncated stream) is raised as :class:`PreprocessError`, so
the worker can mark the image failed and go on.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import UID

logger = logging.getLogger(__name__)


class PreprocessError(Exception):
    """An image that cannot be turned into model input; ``reason`` says why (no PHI)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Transfer syntaxes we decode, with a short name for logs and tables.
SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}

#: Syntaxes whose codestream is a wavelet pyramid that can be decoded at a reduced resolution.
WAVELET_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)

#: pydicom decoding plugin per syntax, fastest first (measured by benchmarks/decode.py on the dev VM, one
#: 2500 x 2048 frame): JPEG baseline Pillow 40 ms vs pylibjpeg 143; JPEG-LS pyjpegls 174 vs pylibjpeg 833;
#: JPEG 2000 pylibjpeg 1242 vs Pillow 2186; RLE pylibjpeg-rle 37 vs pydicom's numpy decoder 542.
#: When the first choice fails (Pillow has no 12-bit JPEG), pydicom's own plugin order is tried.
PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("pillow", "pylibjpeg"),
    "1.2.840.10008.1.2.4.51": ("pillow", "pylibjpeg"),
    "1.2.840.10008.1.2.4.57": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.70": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "pylibjpeg"),
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "pylibjpeg"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow"),
    "1.2.840.10008.1.2.4.201": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.202": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.203": ("pylibjpeg",),
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),
}


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame: stored pixel values (signedness applied), grey (R, C) or colour (R, C, 3)."""

    pixels: np.ndarray
    reduce_level: int = 0  # 0 = full size; r = decoded at ceil(size / 2**r)


@dataclass(frozen=True)
class J2KHeader:
    """What the main header of a JPEG 2000 / HTJ2K codestream says that matters for reduced decoding."""

    columns: int
    rows: int
    components: int
    precision: int
    signed: bool
    decomposition_levels: int


def use_decoder_threads(count: int) -> None:
    """Let OpenJPEG (Pillow's and pylibjpeg-openjpeg's) decode code-blocks on ``count`` threads in this process.

    OpenJPEG reads ``OPJ_NUM_THREADS`` whenever it creates a decoder; neither Python binding exposes the
    setting. On a 2-core machine it roughly halves a reduced J2K decode (2500 x 2048 at level 2: 90 -> 58 ms).
    The decoded values do not depend on the thread count. An explicit ``OPJ_NUM_THREADS`` is left alone.
    """
    os.environ.setdefault("OPJ_NUM_THREADS", str(max(1, count)))


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax, or a clear error when it is missing."""
    meta = getattr(ds, "file_meta", None)
    tsuid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if tsuid is None:
        raise PreprocessError("dataset has no transfer syntax (file meta TransferSyntaxUID missing)")
    return UID(str(tsuid))


#: Image Pixel attributes without which no decoder can run.
REQUIRED_ATTRIBUTES = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation")


def require_attributes(ds: Dataset) -> None:
    """Raise a clear error for a missing, empty or malformed Image Pixel attribute.

    pydicom converts element values lazily, so a corrupt length or VR surfaces on first access as one of
    many exception types (BytesLengthException, ValueError, struct.error...); checked here, every later
    ``int(ds.Rows)`` is safe and the worker sees one error type.
    """
    for keyword in REQUIRED_ATTRIBUTES:
        try:
            value = ds.get(keyword)
            if value in (None, ""):
                raise PreprocessError(f"missing {keyword}")
            int(value)
        except PreprocessError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            raise PreprocessError(f"malformed {keyword} ({type(exc).__name__})") from None


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, defaulting to 1 when absent or empty."""
    value = getattr(ds, "NumberOfFrames", None)
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise PreprocessError(f"invalid NumberOfFrames {value!r}") from exc


def _codestream_start(buffer: bytes) -> int:
    """Offset of the J2K codestream (SOC+SIZ markers), also when wrapped in a JP2 file (seen in the wild)."""
    position = buffer.find(b"\xff\x4f\xff\x51", 0, 4096)
    if position < 0:
        raise PreprocessError("JPEG 2000 fragment has no SOC/SIZ marker")
    return position


def parse_j2k_header(buffer: bytes) -> J2KHeader:
    """Read SIZ and COD from a codestream's main header (ITU-T T.800 A.5.1, A.6.1).

    Only the main header's COD is read; tile-part headers may override it, so a reduced decode that the
    codestream cannot honour falls back to a full decode rather than failing.
    """
    start = _codestream_start(buffer)
    data = memoryview(buffer)[start:]
    try:
        # SOC(2), then SIZ: marker(2) Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz
        # (4 bytes each) Csiz(2) and per component Ssiz(1) XRsiz(1) YRsiz(1)
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
        (csiz,) = struct.unpack(">H", data[40:42])
        ssiz = data[42]
        position = 2 + 2 + struct.unpack(">H", data[4:6])[0]
        levels = None
        while position + 4 <= len(data):
            marker, length = struct.unpack(">HH", data[position : position + 4])
            if marker == 0xFF52:  # COD: Lcod(2) Scod(1) SGcod(4) SPcod: levels(1) ...
                levels = data[position + 9]
                break
            if marker in (0xFF90, 0xFF93):  # SOT / SOD: end of the main header
                break
            position += 2 + length
    except (struct.error, IndexError) as exc:
        raise PreprocessError("truncated JPEG 2000 main header") from exc
    if levels is None:
        raise PreprocessError("JPEG 2000 main header has no COD marker")
    return J2KHeader(
        columns=xsiz - xosiz,
        rows=ysiz - yosiz,
        components=csiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        decomposition_levels=int(levels),
    )


def reduced_size(size: int, level: int) -> int:
    """Size of one axis decoded at resolution reduction ``level`` (image origin at 0)."""
    return math.ceil(size / (1 << level))


def choose_reduce_level(
    rows: int,
    columns: int,
    decomposition_levels: int,
    *,
    model_size: int = 224,
    display_size: int | None = None,
) -> int:
    """The largest reduction whose output is still big enough for every consumer.

    The model resizes each axis to ``model_size`` independently (no crop), so *both* decoded axes must stay
    >= ``model_size``. The overlay keeps the aspect ratio with its long side <= ``display_size``, so the
    decoded long side must stay >= min(display_size, source long side).
    """
    needed_long = min(display_size, max(rows, columns)) if display_size else 0
    best = 0
    for level in range(1, decomposition_levels + 1):
        r, c = reduced_size(rows, level), reduced_size(columns, level)
        if min(r, c) < model_size or max(r, c) < needed_long:
            break
        best = level
    return best


def frame_fragment(ds: Dataset, index: int) -> bytes:
    """The encapsulated codestream of frame ``index`` (handles basic and extended offset tables)."""
    extended = None
    if "ExtendedOffsetTable" in ds:
        extended = (ds.ExtendedOffsetTable, ds.get("ExtendedOffsetTableLengths"))
    try:
        return get_frame(
            ds.PixelData, index, extended_offsets=extended, number_of_frames=number_of_frames(ds)
        )
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types for broken encapsulation
        raise PreprocessError(f"cannot locate frame {index} in encapsulated pixel data: {exc}") from exc


#: Syntaxes whose codestream must end with the EOI / EOC marker (0xFFD9): the JPEG family and JPEG 2000.
_END_MARKER_SYNTAXES = frozenset(uid for uid in PREFERRED_PLUGINS if uid != "1.2.840.10008.1.2.5")


def check_end_marker(codestream: bytes, name: str) -> None:
    """Raise for a codestream without its end marker: the cheap, reliable sign of a truncated transfer.

    Some decoders (libjpeg's lossless path, OpenJPEG) return a partly grey image for a truncated stream
    instead of failing; the marker check catches that. Padding after the marker (0x00 for even length,
    0xFF fill bytes, both seen in the wild) is allowed. Neither format lets 0xFFD9 occur inside entropy
    coded data (JPEG stuffs 0xFF with 0x00; JPEG 2000 forbids 0xFF > 0x8F in packets).
    """
    if b"\xff\xd9" not in codestream[-64:]:
        raise PreprocessError(f"{name} codestream has no end marker (truncated or corrupt)")


def _decode_j2k_reduced(codestream: bytes, header: J2KHeader, level: int, ds: Dataset) -> np.ndarray:
    """Decode a grey J2K/HTJ2K codestream at 1/2**level with Pillow, back to stored values.

    Pillow scales samples to its mode's range: value << (16 - precision) for ``I;16`` (and 8 - precision
    for ``L``) after adding 2**(precision-1) to signed samples; this undoes both.
    """
    from PIL import Image

    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as image:
        image.reduce = level  # Pillow's JPEG 2000 plugin: resolution levels to discard
        image.load()
        mode = image.mode
        out = np.asarray(image)
    container_bits = {"L": 8, "I;16": 16}.get(mode)
    if container_bits is None or out.shape != (reduced_size(header.rows, level), reduced_size(header.columns, level)):
        raise ValueError(f"unexpected reduced decode: mode {mode}, shape {out.shape}")
    values = out.astype(np.int32) >> (container_bits - header.precision)
    if header.signed:
        values -= 1 << (header.precision - 1)
    signed = int(ds.PixelRepresentation) == 1
    dtype = {8: np.int8 if signed else np.uint8}.get(int(ds.BitsAllocated), np.int16 if signed else np.uint16)
    return values.astype(dtype)


def _reduced_decode_allowed(ds: Dataset, header: J2KHeader) -> bool:
    """Only the plain grey case goes through Pillow; anything unusual takes pydicom's full path.

    pydicom corrects header/codestream mismatches (signedness, precision); rather than re-implementing
    those corrections, such images are decoded at full size.
    """
    return (
        int(ds.SamplesPerPixel) == 1
        and header.components == 1
        and header.precision <= 16
        and header.precision == int(ds.BitsStored)
        and header.signed == (int(ds.PixelRepresentation) == 1)
        and (header.rows, header.columns) == (int(ds.Rows), int(ds.Columns))
    )


def _decode_full(ds: Dataset, index: int, tsuid: UID) -> np.ndarray:
    """Full-size decode with the fastest installed plugin; on its failure, with pydicom's own order."""
    decoder = get_decoder(tsuid)
    plugins = [p for p in PREFERRED_PLUGINS.get(str(tsuid), ()) if p in decoder.available_plugins]
    if plugins:
        try:
            return decoder.as_array(ds, index=index, decoding_plugin=plugins[0])[0]
        except Exception as exc:  # noqa: BLE001 - retried below with every plugin
            logger.debug("plugin %s failed (%s); trying the others", plugins[0], exc)
    return decoder.as_array(ds, index=index)[0]


def decode_frame(
    ds: Dataset,
    index: int = 0,
    *,
    model_size: int = 224,
    display_size: int | None = None,
    allow_reduced: bool = True,
) -> DecodedFrame:
    """Decode frame ``index`` of ``ds`` to stored values, as small as the consumers allow.

    Reduced-resolution decoding applies to JPEG 2000 / HTJ2K only; other syntaxes always decode at full
    size. Raises :class:`PreprocessError` for anything that cannot be decoded.
    """
    tsuid = transfer_syntax(ds)
    name = SUPPORTED_TRANSFER_SYNTAXES.get(str(tsuid))
    if name is None:
        raise PreprocessError(f"unsupported transfer syntax {tsuid}")
    if "PixelData" not in ds:
        raise PreprocessError("dataset has no PixelData (float or double pixel data is not supported)")
    require_attributes(ds)
    frames = number_of_frames(ds)
    if not 0 <= index < frames:
        raise PreprocessError(f"frame {index} out of range (dataset has {frames})")

    codestream = frame_fragment(ds, index) if str(tsuid) in _END_MARKER_SYNTAXES else None
    if codestream is not None:
        check_end_marker(codestream, name)

    if allow_reduced and codestream is not None and str(tsuid) in WAVELET_SYNTAXES:
        try:
            header = parse_j2k_header(codestream)
        except PreprocessError:
            header = None  # let the full decoder produce the definitive error
        if header is not None and _reduced_decode_allowed(ds, header):
            level = choose_reduce_level(
                header.rows,
                header.columns,
                header.decomposition_levels,
                model_size=model_size,
                display_size=display_size,
            )
            if level > 0:
                try:
                    pixels = _decode_j2k_reduced(codestream, header, level, ds)
                    logger.debug("decoded %s frame %d at reduction %d", name, index, level)
                    return DecodedFrame(pixels, level)
                except Exception as exc:  # noqa: BLE001 - any Pillow failure: try the full decoder
                    logger.debug("reduced decode failed (%s); decoding at full size", exc)

    try:
        pixels = _decode_full(ds, index, tsuid)
    except PreprocessError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; the worker needs one
        raise PreprocessError(f"cannot decode frame {index} ({name}): {exc}") from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if pixels.shape[:2] != expected:
        raise PreprocessError(f"decoded frame is {pixels.shape[:2]}, header says {expected}")
    return DecodedFrame(pixels, 0)
