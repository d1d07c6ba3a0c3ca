"""How the MAE family hands its network to a backend: torch runs the module, TensorRT runs its exported graphs.

The generic choice (auto chain, fallbacks, default precisions) is :func:`engines.backends.select_backend`, and the
ONNX + plan cache plumbing is :func:`engines.backends.tensorrt_backend.tensorrt_from_export`; this module only
supplies what is MAE-specific: the export key (the weights' hash, decoder or not), the graphs and their shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from engines.backends import Backend, select_backend
from engines.backends.tensorrt_backend import BatchProfile, TensorRTBackend, tensorrt_from_export
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
    graphs = GRAPH_NAMES if network.has_decoder else ("encoder_full",)
    return tensorrt_from_export(
        [encoder_sha256(network), network.has_decoder],
        graphs,
        export=lambda onnx_dir, chosen: export_onnx(network.cpu(), onnx_dir, graphs=graphs, passes=chosen.passes),
        shapes=lambda graph, chosen: graph_shapes(chosen, network.config, graph),
        precision=precision, cache_dir=cache_dir, profile=profile, trt=trt, progress=progress,
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
