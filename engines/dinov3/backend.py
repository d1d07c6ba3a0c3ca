"""How the DINOv3 family hands its network to a backend: torch runs the module, TensorRT runs its exported graph.

The generic choice (auto chain, fallbacks, default precisions) is :func:`engines.backends.select_backend`, and the
ONNX + plan cache plumbing is :func:`engines.backends.tensorrt_backend.tensorrt_from_export`; this module supplies
what is DINOv3-specific: the export key (the weights' hash, RoPE mode included, and the input size), the graph and
its shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from engines.backends import Backend, select_backend
from engines.backends.tensorrt_backend import BatchProfile, TensorRTBackend, tensorrt_from_export
from engines.dinov3.network import DINOv3ViT, encoder_sha256
from engines.dinov3.onnx_export import GRAPH_NAMES, export_onnx, graph_shapes


def tensorrt_backend(
    network: DINOv3ViT,
    height: int,
    width: int,
    precision: str = "fp16",
    cache_dir: Path | None = None,
    profile: BatchProfile | None = None,
    trt: ModuleType | None = None,
    progress: Callable[[str], None] | None = None,
) -> TensorRTBackend:
    """Export ONNX (cached by encoder hash, RoPE mode included, and input size), then load or build the plan."""
    return tensorrt_from_export(
        ["dinov3", encoder_sha256(network), height, width],
        GRAPH_NAMES,
        export=lambda onnx_dir, _profile: export_onnx(network.cpu(), onnx_dir, height=height, width=width),
        shapes=lambda graph, chosen: graph_shapes(chosen, height, width, graph),
        precision=precision, cache_dir=cache_dir, profile=profile, trt=trt, progress=progress,
    )


def build_backend(
    network: DINOv3ViT,
    height: int,
    width: int,
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
        tensorrt=lambda chosen: tensorrt_backend(network, height, width, precision=chosen, cache_dir=plan_cache_dir),
    )
