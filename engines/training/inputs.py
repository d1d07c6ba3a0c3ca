"""Model inputs for training and the site tools: SKELEX's array path, batch normalisation, DICOM files.

All of them end in the same place as the node's own path (:func:`engines.imaging.preprocess.preprocess`), so
what is trained and calibrated is what the node later runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from PIL import Image
from torch import Tensor

from engines.imaging.geometry import MODEL_SIZE
from engines.imaging.preprocess import prepare_array  # noqa: F401  (re-exported: the one SKELEX array path)
from engines.imaging.preprocess import preprocess, to_uint8_minmax
from engines.imaging.preprocessor_config import IMAGENET_224, PreprocessorConfig


def to_uint8_224(pixels: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """SKELEX's first steps on a 2-D grey array, exactly as ``engines.imaging.preprocess`` does them: per-image
    min-max to uint8 (truncating), then PIL bilinear resize to 224 x 224 without crop."""
    array = np.asarray(pixels)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {array.shape}")
    image = Image.fromarray(to_uint8_minmax(array))
    return np.array(image.resize((size, size), resample=Image.Resampling.BILINEAR))


def normalise_uint8(batch: Tensor, preprocessing: PreprocessorConfig = IMAGENET_224) -> Tensor:
    """uint8 grey [B, H, W] -> normalised RGB float [B, 3, H, W] (grey copied to 3 channels; ImageNet by default)."""
    x = batch.float().mul_(np.float32(1 / 255)).unsqueeze(1)
    mean = torch.tensor(preprocessing.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalise(x: Tensor, preprocessing: PreprocessorConfig = IMAGENET_224) -> Tensor:
    """Model input -> [0, 1] RGB (clamped), as the SKELEX error map compares pixels."""
    mean = torch.tensor(preprocessing.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.image_std, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def dicom_inputs(
    path: Path | str, preprocessing: PreprocessorConfig = IMAGENET_224
) -> tuple[Tensor, Any, list[np.ndarray]]:
    """(tensor [F, 3, 224, 224], geometry, display images) for one DICOM file, via ``engines.imaging.preprocess``.

    ``preprocessing``: the model's (``model.preprocessing``), so the site tools see what the worker sees."""
    result = preprocess(pydicom.dcmread(str(path)), preprocessing=preprocessing)
    return result.tensor, result.geometry, list(result.display)
