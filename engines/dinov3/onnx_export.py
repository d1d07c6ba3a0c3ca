"""ONNX export of the DINOv3 family's one graph (what a TensorRT build or onnxruntime runs), dynamic batch.

- ``encoder_full``: ``pixels`` [B, 3, H, W] -> ``cls`` [B, D] (normed CLS token) and ``patch_mean`` [B, D] (mean of
  the normed patch tokens), the two features heads read.

The RoPE tables for the model's input size are constants of the graph (RoPE off: none). Exported with torch's
TorchScript-based exporter at opset 17 (``dynamo=False``: the dynamo exporter needs ``onnxscript``), fp32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engines.backends.tensorrt_backend import BatchProfile, file_sha256
from engines.dinov3.network import DINOv3ViT

log = logging.getLogger(__name__)

OPSET = 17
GRAPH_NAMES = ("encoder_full",)
OUTPUTS = ("cls", "patch_mean")


@dataclass
class ExportedGraphs:
    """Paths of the exported graphs and the sha256 of each file (the TensorRT plan cache key uses it)."""

    paths: dict[str, Path]
    sha256: dict[str, str]


class EncoderFullGraph(nn.Module):
    def __init__(self, model: DINOv3ViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.features(pixels)
        return features["cls"], features["patch_mean"]


def graph_shapes(
    profile: BatchProfile, height: int, width: int, graph: str = "encoder_full"
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """input name -> (min, opt, max) shapes for the worker's batches (a TensorRT optimisation profile)."""
    if graph != "encoder_full":
        raise ValueError(f"unknown graph {graph!r}; the DINOv3 family has {GRAPH_NAMES}")
    images = (profile.min_images, profile.opt_images, profile.max_images)
    return {"pixels": tuple((n, 3, height, width) for n in images)}


def export_onnx(
    model: DINOv3ViT, out_dir: str | Path, height: int | None = None, width: int | None = None,
    graphs: tuple[str, ...] = GRAPH_NAMES,
) -> ExportedGraphs:
    """Write ``out_dir/encoder_full.onnx`` (fp32, dynamic batch) for inputs of ``height`` x ``width``."""
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; the DINOv3 family has {GRAPH_NAMES} (no error-map graphs)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    c = model.config
    pixels = torch.randn(2, c.num_channels, height or c.image_size, width or c.image_size)
    path = out_dir / "encoder_full.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            EncoderFullGraph(model),
            (pixels,),
            str(path),
            input_names=["pixels"],
            output_names=list(OUTPUTS),
            dynamic_axes={"pixels": {0: "batch"}, "cls": {0: "batch"}, "patch_mean": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    log.info("exported encoder_full to %s", path)
    return ExportedGraphs({"encoder_full": path}, {"encoder_full": file_sha256(path)})
