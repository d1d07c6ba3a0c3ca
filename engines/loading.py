"""``engines.load``: detect a checkpoint's model family on disk and load it as a :class:`~engines.family.ModelFamily`.

Families: ``orthodiffusion`` (a folder with ``orthodiffusion.json``: 3-D knee MRI, loaded as a
:class:`~engines.family.VolumeModelFamily`, which the worker routes to its MRI path), ``vit-classifier`` (a HF
ViT classifier folder with ``head_layout.json``: SKELEX's region-guided multi-head model), ``dinov3`` (HF
``dinov3_vit`` folders, the authors' / OrthoFoundation ``.pth``, timm ``*_dinov3``) and ``mae`` (HF ViT-MAE / ViT
folders, MAE ``.pth``, timm ViT). A new family adds its loader to :data:`LOADERS` and its recognition to
:func:`detect_family`; everything not claimed by another family goes to the MAE loaders, whose errors name what
they could not read (unsupported ``model_type``, unknown tensors...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engines.dinov3.family import FAMILY as DINOV3, is_dinov3, load_dinov3
from engines.family import ModelFamily
from engines.mae.family import FAMILY as MAE, load_mae
from engines.orthodiffusion.family import CONFIG_FILE as ORTHODIFFUSION_CONFIG, FAMILY as ORTHODIFFUSION
from engines.orthodiffusion.family import load_orthodiffusion
from engines.vit_classifier.family import FAMILY as VIT_CLASSIFIER, load_vit_classifier
from engines.vit_classifier.loaders import is_vit_classifier

#: family name -> loader(path, device=, backend=, precision=, load_heads=)
LOADERS: dict[str, Callable[..., ModelFamily]] = {
    MAE: load_mae, DINOV3: load_dinov3, VIT_CLASSIFIER: load_vit_classifier,
}


def _load_orthodiffusion(path: str | Path, device: str = "cpu", backend: str | None = None,
                         precision: str | None = None, load_heads: bool = True) -> Any:
    """OrthoDiffusion (a :class:`~engines.family.VolumeModelFamily`) runs in plain torch, fp32, whatever
    ``[engine] precision`` says for the 2-D models (``describe()`` reports it): on CUDA when a GPU backend is asked
    for and a GPU is there, else on the CPU. It has no ONNX / TensorRT graphs."""
    del precision  # fp32 only
    if backend in ("cuda", "tensorrt", "auto") and torch.cuda.is_available():
        device = "cuda"
    return load_orthodiffusion(path, device=device, load_heads=load_heads)


LOADERS[ORTHODIFFUSION] = _load_orthodiffusion


def detect_family(path: str | Path) -> str:
    """The model family of the checkpoint at ``path``: ``vit-classifier`` for a folder with ``head_layout.json``
    (a multi-head HF ViT classifier), ``orthodiffusion`` for a folder with ``orthodiffusion.json`` (a 3-D knee MRI
    model: a ``VolumeModelFamily``), ``dinov3`` when its loaders recognise it, else ``mae``."""
    if (Path(path) / ORTHODIFFUSION_CONFIG).is_file():
        return ORTHODIFFUSION
    if is_vit_classifier(path):
        return VIT_CLASSIFIER
    if is_dinov3(path):
        return DINOV3
    return MAE


def load(
    path: str | Path,
    device: str = "cpu",
    backend: str | None = None,
    precision: str | None = None,
    load_heads: bool = True,
) -> ModelFamily:
    """Load any supported checkpoint (family and format detected from what is on disk); the public entry point.

    ``backend=None`` follows ``device`` (default CPU); ``backend="auto"`` picks tensorrt -> cuda -> cpu;
    ``"cpu"``/``"cuda"``/``"tensorrt"`` force one. ``precision`` defaults per backend (cpu fp32, GPU fp16).
    """
    loader = LOADERS[detect_family(path)]
    return loader(path, device=device, backend=backend, precision=precision, load_heads=load_heads)
