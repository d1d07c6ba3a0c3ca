"""DICOM dataset -> model input, one 3 x 224 x 224 tensor per frame, reproducing SKELEX's image path.

Order (policy and reasons in ``docs/preprocessing.md``):

1. decode stored values (``engines.imaging.decode``; JPEG 2000 / HTJ2K at a reduced resolution when allowed);
2. colour (RGB / YBR) -> grey with ITU-R BT.601 luma, the weights PIL's ``convert("L")`` uses;
3. modality LUT: Modality LUT Sequence if present, else Rescale Slope / Intercept;
4. VOI per policy ``voi``: ``"auto"`` (default) = VOI LUT Sequence if present, else the first Window
   Centre / Width, else nothing; ``"lut"``, ``"window"`` = only that one; ``"none"`` = skip;
5. MONOCHROME1 inverted so that bone is bright, as in the 8-bit images SKELEX was trained on;
6. SKELEX's path exactly: per-image global min-max to uint8 (float32, truncating cast), grey -> 3
   channels, PIL bilinear resize to 224 x 224 without crop (PIL antialiases on downscale, like HF's
   ViTImageProcessor with resample=2), /255, ImageNet mean / std.

Size, filter, rescale factor and mean / std of step 6 come from the model's ``preprocessor_config.json``
(``preprocessing=``, a :class:`~engines.imaging.preprocessor_config.PreprocessorConfig`); the default is
SKELEX's (224, bilinear, ImageNet).
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

from engines.imaging.decode import (
    DecodedFrame,
    PreprocessError,
    decode_frame,
    number_of_frames,
    require_attributes,
)
from engines.imaging.geometry import MODEL_SIZE, SourceGeometry
from engines.imaging.preprocessor_config import IMAGENET_224, IMAGENET_MEAN, IMAGENET_STD, PreprocessorConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_224",
    "Preprocessed",
    "PreprocessorConfig",
    "PreprocessError",
    "VOIPolicy",
    "preprocess",
    "prepare_array",
    "to_uint8_minmax",
]

logger = logging.getLogger(__name__)

VOIPolicy = Literal["auto", "window", "lut", "none"]
#: Long side of the overlay image (the error-map Secondary Capture's radiograph), at most; the node's is
#: ``[results] overlay_max_size`` (this default). 600 px lets a 5 MP JPEG 2000 radiograph (2500 x 2048) with a
#: clipping VOI window decode at resolution level 2 (625 x 512) for the overlay and the model alike, instead of
#: at full size: with 2048 the decode alone took ~0.5-0.9 s per image and the 3 x 5 MP study missed the 3 s
#: latency target (benchmarks/latency.py, docs/benchmarks.md). Without such a window the image is decoded at
#: full size whatever this is (see ``preprocess``). The map itself is computed at 224 px, so the overlay shows
#: no detail a larger copy would add; the source stays in the PACS.
DEFAULT_DISPLAY_SIZE = 600
#: Smallest decoded side a reduced-resolution decode may leave for the model path: 2 x 224, so that the
#: final PIL resize still antialiases as it does from the full image. Measured on a 2500 x 2048 radiograph,
#: decoding down to 313 x 256 instead moved the model input by 2.6 grey levels on average (8 max), and
#: on a 512 x 448 phantom decoded at 256 x 224 by up to 15 levels at bone edges (docs/preprocessing.md).
DEFAULT_MIN_DECODED_SIDE = 2 * MODEL_SIZE
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L" conversion
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}


class Preprocessed(NamedTuple):
    """Model input plus what is needed to map results back onto the source image."""

    tensor: torch.Tensor  # [F, 3, H, W] float32 (224 x 224 ImageNet-normalised by default)
    geometry: SourceGeometry
    display: list[np.ndarray]  # per frame, uint8 grey after LUTs, long side <= display_size


def to_uint8_minmax(array: np.ndarray) -> np.ndarray:
    """SKELEX's per-image global min-max to 8 bits: float32, scale to 0..255, clip, truncating cast.

    A constant (or non-finite) image becomes all zeros, as in SKELEX's ``_to_uint8_minmax``.
    """
    values = np.array(array, dtype=np.float32)  # a copy, so the in-place steps below are safe
    lo, hi = np.nanmin(values), np.nanmax(values)
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    # Same float32 operations, in the same order, as ((values - lo) / (hi - lo) * 255.0), but in place.
    np.subtract(values, lo, out=values)
    np.divide(values, hi - lo, out=values)
    np.multiply(values, np.float32(255.0), out=values)
    return np.clip(values, 0, 255, out=values).astype(np.uint8)


def _normalise(rgb8: np.ndarray, preprocessing: PreprocessorConfig = IMAGENET_224) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 [3, H, W]: x rescale factor (1/255) then mean / std (HF's rescale + normalize)."""
    scaled = rgb8.astype(np.float32) * np.float32(preprocessing.rescale_factor)
    mean = np.asarray(preprocessing.image_mean, dtype=np.float32)
    std = np.asarray(preprocessing.image_std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1)))


def _model_tensor_from_uint8(image8: np.ndarray, preprocessing: PreprocessorConfig = IMAGENET_224) -> torch.Tensor:
    """uint8 grey (H, W) or RGB (H, W, 3) -> [3, height, width] via PIL resize (bilinear, antialiased, by default).

    Resizing the grey image and then copying it to three channels equals resizing the RGB copy, because
    PIL resizes each channel with the same integer kernel.
    """
    resized = np.asarray(
        Image.fromarray(image8).resize(
            (preprocessing.width, preprocessing.height), resample=Image.Resampling(preprocessing.resample)
        )
    )
    if resized.ndim == 2:
        resized = np.repeat(resized[:, :, None], 3, axis=2)
    return _normalise(resized, preprocessing)


def tensor_from_uint8(image8: np.ndarray, preprocessing: PreprocessorConfig = IMAGENET_224) -> torch.Tensor:
    """An 8-bit grey (H, W) or RGB (H, W, 3) image (or a crop of one) -> model input [3, H, W], with no further
    min-max: SKELEX's region-guided classifier resizes crops of the already 8-bit image."""
    if image8.dtype != np.uint8 or not (image8.ndim == 2 or (image8.ndim == 3 and image8.shape[-1] == 3)):
        raise ValueError(f"expected a uint8 (H, W) or (H, W, 3) image, got {image8.dtype} {image8.shape}")
    if min(image8.shape[:2]) < 1:
        raise ValueError(f"empty image {image8.shape}")
    return _model_tensor_from_uint8(np.ascontiguousarray(image8), preprocessing)


def prepare_array(pixels: np.ndarray, preprocessing: PreprocessorConfig = IMAGENET_224) -> torch.Tensor:
    """SKELEX's path from an array: min-max to uint8, grey -> RGB, bilinear 224 x 224, /255, ImageNet.

    Accepts a 2-D grey array of any numeric dtype (or an (H, W, 3) RGB array, min-maxed over all
    channels as SKELEX does). Returns float32 [3, 224, 224] (size and normalisation from ``preprocessing``).
    """
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(f"expected a (H, W) grey or (H, W, 3) RGB array, got shape {array.shape}")
    return _model_tensor_from_uint8(to_uint8_minmax(array), preprocessing)


def _display_image(image8: np.ndarray, display_size: int | None) -> np.ndarray:
    """The uint8 image shrunk (aspect kept) so that its long side is <= display_size."""
    rows, columns = image8.shape
    if not display_size or max(rows, columns) <= display_size:
        return image8
    scale = display_size / max(rows, columns)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(image8).resize(size, resample=Image.Resampling.BILINEAR))


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The LUT attributes that apply to frame ``index``.

    Enhanced multi-frame objects keep rescale and window per frame (or shared) in functional groups,
    where pydicom's LUT helpers do not look; lift them to the top level of a shallow copy.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None and shared is None:
        return ds
    view = Dataset()
    for keyword in ("BitsStored", "PixelRepresentation", "PhotometricInterpretation", "BitsAllocated"):
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    groups = []
    if shared:
        groups.append(shared[0])
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:  # per-frame after shared, so it wins
        for sequence in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if sequence in group and len(group[sequence].value):
                for element in group[sequence].value[0]:
                    view[element.tag] = element
    return view


def _apply_luts(pixels: np.ndarray, lut_source: Dataset, voi: VOIPolicy) -> np.ndarray:
    values = apply_modality_lut(pixels, lut_source)
    has_lut = "VOILUTSequence" in lut_source and len(lut_source.VOILUTSequence) > 0
    has_window = lut_source.get("WindowCenter") is not None and lut_source.get("WindowWidth") is not None
    if voi == "auto" and (has_lut or has_window):
        values = apply_voi_lut(values, lut_source, index=0, prefer_lut=True)
    elif voi == "lut" and has_lut:
        values = apply_voi_lut(values, lut_source, index=0, prefer_lut=True)
    elif voi == "window" and has_window:
        values = apply_windowing(values, lut_source, index=0)
    return values


def _grey_frame(decoded: DecodedFrame, ds: Dataset, index: int, voi: VOIPolicy) -> np.ndarray:
    """Stored values of one frame -> float grey values after colour conversion, LUTs and MONOCHROME1."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    pixels = decoded.pixels
    if photometric in _COLOUR:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise PreprocessError(f"{photometric} image decoded to shape {pixels.shape}")
        # pydicom's decoders return RGB for YBR inputs (as_rgb); VOI LUTs do not apply to colour.
        return pixels.astype(np.float32) @ _LUMA
    if photometric not in _GREY:
        raise PreprocessError(f"unsupported photometric interpretation {photometric or '(missing)'}")
    values = _apply_luts(pixels, _frame_view(ds, index), voi)
    if photometric == "MONOCHROME1":
        values = np.asarray(values, dtype=np.float64)
        values = values.max() + values.min() - values
    return values


def _voi_output_range(ds: Dataset, lut_source: Dataset, voi: VOIPolicy) -> tuple[float, float] | None:
    """The lowest and highest grey value the modality + VOI LUTs can give for any stored value, when a VOI window
    or LUT applies under ``voi`` (None otherwise, for colour, or above 16 bits stored).

    When a frame's grey values reach both ends, the window, not the frame's own min / max, sets the contrast of
    SKELEX's min-max to 8 bits; then a reduced-resolution decode changes only the resolution (docs/preprocessing.md).
    """
    if str(ds.get("PhotometricInterpretation", "")).strip() not in _GREY or voi == "none":
        return None
    has_lut = "VOILUTSequence" in lut_source and len(lut_source.VOILUTSequence) > 0
    has_window = lut_source.get("WindowCenter") is not None and lut_source.get("WindowWidth") is not None
    applies = {"auto": has_lut or has_window, "lut": has_lut, "window": has_window}[voi]
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0)
    if not applies or not 0 < bits <= 16:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lowest = -(1 << (bits - 1)) if signed else 0
    values = _apply_luts(np.arange(lowest, lowest + (1 << bits), dtype=np.int32), lut_source, voi)
    return float(np.min(values)), float(np.max(values))


def _window_sets_contrast(grey: np.ndarray, output_range: tuple[float, float] | None) -> bool:
    """Whether the frame's grey values reach both ends of the VOI output range (so min-max maps them as the
    window does, whatever the decoded resolution)."""
    if output_range is None:
        return False
    return float(np.min(grey)) == output_range[0] and float(np.max(grey)) == output_range[1]


def _checked_grey_frame(decoded: DecodedFrame, ds: Dataset, index: int, voi: VOIPolicy) -> np.ndarray:
    """:func:`_grey_frame`, with any failure of the LUT attributes as a :class:`PreprocessError`."""
    try:
        return _grey_frame(decoded, ds, index, voi)
    except PreprocessError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUT attributes surface as many types
        raise PreprocessError(f"cannot apply LUTs to frame {index}: {exc}") from exc


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """The spacing if it is usable; a malformed element (bad VR or length, found by fuzzing) counts as absent."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is not None and len(value) == 2:
                return float(value[0]), float(value[1])
        except Exception:  # noqa: BLE001 - pydicom's lazy conversion raises many types on damaged elements
            continue
    return None


def preprocess(
    dataset: Dataset,
    *,
    voi: VOIPolicy = "auto",
    display_size: int | None = DEFAULT_DISPLAY_SIZE,
    reduced_decode: bool = True,
    reduced_without_window: bool = False,
    min_decoded_side: int = DEFAULT_MIN_DECODED_SIDE,
    preprocessing: PreprocessorConfig = IMAGENET_224,
) -> Preprocessed:
    """Turn a pydicom dataset into ``Preprocessed(tensor [F,3,224,224], geometry, display)``.

    ``preprocessing`` is the model's ``preprocessor_config.json`` (``model.preprocessing``): size, filter,
    mean / std; the default is SKELEX's 224 x 224 bilinear ImageNet input.

    ``display_size`` bounds the overlay image's long side (None: no display needed, which lets JPEG 2000
    / HTJ2K decode at the smallest resolution whose both sides stay >= ``min_decoded_side``; 224 is the
    fastest, 448, the default, keeps closer to the full-resolution input). ``reduced_decode=False`` forces
    full-size decoding.

    A reduced decode is used only where a VOI window or LUT sets the grey range (the frame's grey values reach
    both ends of the VOI output); otherwise the frame is decoded at full size, because SKELEX's min-max would
    see a low-passed image's extremes and change the contrast: the model input must not depend on the transfer
    syntax. ``reduced_without_window=True`` lifts that (decoder tests and benchmarks only).
    Raises :class:`PreprocessError` when the image cannot be used.
    """
    if voi not in ("auto", "window", "lut", "none"):
        raise ValueError(f"voi must be auto, window, lut or none, not {voi!r}")
    require_attributes(dataset)
    frames = number_of_frames(dataset)
    tensors: list[torch.Tensor] = []
    display: list[np.ndarray] = []
    decoded_shape: tuple[int, int] | None = None
    for index in range(frames):
        try:
            lut_source = _frame_view(dataset, index)
            output_range = None if reduced_without_window else _voi_output_range(dataset, lut_source, voi)
        except Exception as exc:  # noqa: BLE001 - malformed LUT attributes surface as many types
            raise PreprocessError(f"cannot apply LUTs to frame {index}: {exc}") from exc
        decoded = decode_frame(
            dataset,
            index,
            model_size=max(preprocessing.height, preprocessing.width, min_decoded_side),
            display_size=display_size,
            allow_reduced=reduced_decode and (reduced_without_window or output_range is not None),
        )
        grey = _checked_grey_frame(decoded, dataset, index, voi)
        if decoded.reduce_level > 0 and not reduced_without_window and not _window_sets_contrast(grey, output_range):
            logger.debug("frame %d: the window does not clip the reduced decode; decoding at full size", index)
            decoded = decode_frame(dataset, index, allow_reduced=False)
            grey = _checked_grey_frame(decoded, dataset, index, voi)
        image8 = to_uint8_minmax(grey)
        decoded_shape = image8.shape
        tensors.append(_model_tensor_from_uint8(image8, preprocessing))
        display.append(_display_image(image8, display_size))
    assert decoded_shape is not None
    geometry = SourceGeometry(
        model_size=(preprocessing.height, preprocessing.width),
        rows=int(dataset.Rows),
        columns=int(dataset.Columns),
        frame_count=frames,
        pixel_spacing=_pixel_spacing(dataset),
        decoded_rows=decoded_shape[0],
        decoded_columns=decoded_shape[1],
    )
    logger.debug(
        "preprocessed %d frame(s), decoded at %s of %s", frames, decoded_shape, (geometry.rows, geometry.columns)
    )
    return Preprocessed(torch.stack(tensors), geometry, display)
