"""How the MAE family hands its network to a backend: torch runs the module, TensorRT runs its exported graphs.

The generic choice (auto chain, fallbacks, default precisions) is :func:`engines.backends.select_backend`; this
module only supplies what is MAE-specific: the ONNX export (cached by the weights' hash) and the graphs' shapes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from engines.backends import Backend, select_backend
from engines.backends.tensorrt_backend import DEFAULT_CACHE_DIR, BatchProfile, TensorRTBackend, import_tensorrt
from engines.mae.network import MaskedAutoencoderViT, encoder_sha256
from engines.mae.onnx_export import GRAPH_NAMES, export_onnx, graph_shapes


def tensorrt_backend(
    network: MaskedAutoencoderViT,
    precision: str = "fp16",
    cache_dir: Path | None = None,
    profile: BatchProfile | None = None,
    trt: ModuleType | None = None,
    progress: Callable[[str], None] | None = None,
) -> TensorRTBackend:
    """Export ONNX (cached by encoder hash), then load or build one plan per graph."""
    trt = trt or import_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA device")
    directory = Path(cache_dir or DEFAULT_CACHE_DIR)
    profile = profile or BatchProfile()
    graphs = GRAPH_NAMES if network.has_decoder else ("encoder_full",)
    full_hash = hashlib.sha256(json.dumps([encoder_sha256(network), network.has_decoder]).encode()).hexdigest()
    onnx_dir = directory / "onnx" / full_hash[:24]
    if not all((onnx_dir / f"{g}.onnx").is_file() for g in graphs):
        if progress:
            progress("exporting ONNX")
        export_onnx(network.cpu(), onnx_dir, graphs=graphs, passes=profile.passes)
    inputs = {g: (onnx_dir / f"{g}.onnx", graph_shapes(profile, network.config, g)) for g in graphs}
    return TensorRTBackend.from_onnx(
        inputs, precision=precision, cache_dir=directory, profile=profile, trt=trt, progress=progress
    )


def build_backend(
    network: MaskedAutoencoderViT,
    backend: str | None = None,
    device: str = "cpu",
    precision: str | None = None,
    plan_cache_dir: Path | None = None,
) -> Backend:
    """The backend for ``network``: see :func:`engines.backends.select_backend` for the choice and fallbacks."""
    return select_backend(
        network,
        backend=backend,
        device=device,
        precision=precision,
        tensorrt=lambda chosen: tensorrt_backend(network, precision=chosen, cache_dir=plan_cache_dir),
    )
