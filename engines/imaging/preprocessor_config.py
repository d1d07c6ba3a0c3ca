"""The input settings that travel with a model's weights: ``preprocessor_config.json`` (Hugging Face's file).

A model folder names the size its images are resized to, the resampling filter and the per-channel mean / std
used to normalise them. :func:`read_preprocessor_config` reads them back, :func:`engines.imaging.preprocess.preprocess`
applies them, and :meth:`PreprocessorConfig.to_hf_dict` writes them (``save_hf_vitmae``). The ImageNet values are
written down here, once: they are the default for a checkpoint that carries no ``preprocessor_config.json``
(MAE ``.pth``, timm files) and what SKELEX was trained with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
#: Hugging Face's ``resample`` values are PIL's ``Image.Resampling`` numbers; 2 is bilinear (SKELEX's choice).
RESAMPLE_BILINEAR = 2


class PreprocessorConfigError(ValueError):
    """A ``preprocessor_config.json`` this node cannot honour; the message names the key."""


@dataclass(frozen=True)
class PreprocessorConfig:
    """Resize to ``height`` x ``width`` with PIL filter ``resample``, scale by ``rescale_factor``, normalise."""

    height: int = 224
    width: int = 224
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    resample: int = RESAMPLE_BILINEAR
    rescale_factor: float = 1 / 255

    @classmethod
    def square(cls, side: int) -> PreprocessorConfig:
        """ImageNet normalisation at ``side`` x ``side`` (a checkpoint without a preprocessor file)."""
        return cls(height=side, width=side)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> PreprocessorConfig:
        """Read HF's keys: ``size`` ({height, width}, {shortest_edge} or an int), ``image_mean``, ``image_std``,
        ``resample``, ``rescale_factor``; a missing key keeps the ImageNet / 224 / bilinear default."""
        size = data.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            height = width = size
        elif isinstance(size, dict) and "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        elif isinstance(size, dict) and "shortest_edge" in size:
            height = width = int(size["shortest_edge"])
        else:
            raise PreprocessorConfigError(f"size {size!r}: expected an int or {{height, width}}")
        if data.get("do_resize") is False or data.get("do_normalize") is False or data.get("do_rescale") is False:
            raise PreprocessorConfigError("do_resize, do_rescale and do_normalize must stay true for this node")
        mean = tuple(float(v) for v in data.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in data.get("image_std", IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise PreprocessorConfigError(f"image_mean {mean} / image_std {std}: need three values, std > 0")
        resample = int(data.get("resample", RESAMPLE_BILINEAR))
        if resample not in range(6):
            raise PreprocessorConfigError(f"resample {resample}: not a PIL filter (0..5)")
        return cls(height, width, mean, std, resample, float(data.get("rescale_factor", 1 / 255)))

    def to_hf_dict(self) -> dict[str, Any]:
        """HF ``ViTImageProcessor`` keys, in the order ``save_hf_vitmae`` has always written them."""
        return {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "image_processor_type": "ViTImageProcessor",
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.height, "width": self.width},
        }


#: SKELEX's input: 224 x 224 bilinear, ImageNet mean / std.
IMAGENET_224 = PreprocessorConfig()


def read_preprocessor_config(folder: str | Path, default: PreprocessorConfig = IMAGENET_224) -> PreprocessorConfig:
    """``folder/preprocessor_config.json`` if present, else ``default``."""
    path = Path(folder) / PREPROCESSOR_CONFIG_FILE
    if not path.is_file():
        return default
    try:
        return PreprocessorConfig.from_hf_dict(json.loads(path.read_text()))
    except PreprocessorConfigError as exc:
        raise PreprocessorConfigError(f"{path}: {exc}") from None


def write_preprocessor_config(folder: str | Path, config: PreprocessorConfig) -> Path:
    path = Path(folder) / PREPROCESSOR_CONFIG_FILE
    path.write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return path
