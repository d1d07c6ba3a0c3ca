"""ONNX export of the three graphs a TensorRT build (or onnxruntime) needs, all with a dynamic batch.

- ``encoder_full``:   ``pixels`` [B, 3, 224, 224] -> ``cls`` [B, D] (CLS after the final norm, 197 tokens);
- ``encoder_masked``: ``pixels`` [B, 3, 224, 224], ``ids_keep`` [B, P, keep] int64 -> ``latent`` [B*P, 1+keep, D]
  (the patch projection runs once per image; each of the P masks gathers its visible tokens from it);
- ``decoder``:        ``latent`` [N, 1+keep, D], ``ids_restore`` [N, L] int64 -> ``pred`` [N, L, p*p*C].

Masks are drawn on the host (seeded noise -> argsort), so the graphs hold no randomness and a TensorRT run
reproduces a CPU run's masks exactly. Exported with torch's TorchScript-based exporter (opset 17), which needs
no extra packages; the dynamo exporter would need ``onnxscript``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from engines.backends.tensorrt_backend import BatchProfile, file_sha256
from engines.mae.network import MAEConfig, MaskedAutoencoderViT

log = logging.getLogger(__name__)

OPSET = 17
GRAPH_NAMES = ("encoder_full", "encoder_masked", "decoder")
#: the graphs a Triton model repository serves (``msknode model export-triton``): every tensor batch-first, so
#: Triton's dynamic batcher can merge requests; ``reconstruct`` is the masked encoder and the decoder in one graph
TRITON_GRAPH_NAMES = ("encoder_full", "reconstruct")


class EncoderFullGraph(nn.Module):
    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.embed(pixels)


class EncoderMaskedGraph(nn.Module):
    """Per-image patch embedding once, then P gathers: no ``repeat_interleave`` with a data-dependent count."""

    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor, ids_keep: Tensor) -> Tensor:
        tokens = self.model.patch_tokens(pixels)  # [B, L, D]
        batch, passes, keep = ids_keep.shape
        dim = tokens.shape[-1]
        expanded = tokens.unsqueeze(1).expand(-1, passes, -1, -1)  # [B, P, L, D]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, -1, dim)
        visible = torch.gather(expanded, 2, index).reshape(batch * passes, keep, dim)
        return self.model._encode(visible)


class DecoderGraph(nn.Module):
    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        return self.model.forward_decoder(latent, ids_restore)


class ReconstructGraph(nn.Module):
    """Masked encoder then decoder, batch-first for Triton: ``pixels`` [B, C, H, W], ``ids_keep`` [B, P, keep],
    ``ids_restore`` [B, P, L] -> ``pred`` [B, P, L, p*p*C] (image-major, as the backends' ``reconstruct``)."""

    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.encoder = EncoderMaskedGraph(model)
        self.model = model

    def forward(self, pixels: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        batch, passes, length = ids_restore.shape
        latent = self.encoder(pixels, ids_keep)
        pred = self.model.forward_decoder(latent, ids_restore.reshape(batch * passes, length))
        return pred.reshape(batch, passes, length, pred.shape[-1])


@dataclass
class ExportedGraphs:
    """Paths of the exported graphs and the sha256 of each file (the TensorRT plan cache key uses it)."""

    paths: dict[str, Path]
    sha256: dict[str, str]


def graph_shapes(profile: BatchProfile, config: MAEConfig, graph: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """input name -> (min, opt, max) shapes of one graph for the worker's batches (a TensorRT profile)."""
    imgs = (profile.min_images, profile.opt_images, profile.max_images)
    rows = tuple(n * profile.passes for n in imgs)
    image, keep = config.image_size, config.len_keep
    if graph == "encoder_full":
        return {"pixels": tuple((n, 3, image, image) for n in imgs)}
    if graph == "encoder_masked":
        return {
            "pixels": tuple((n, 3, image, image) for n in imgs),
            "ids_keep": tuple((n, profile.passes, keep) for n in imgs),
        }
    if graph == "decoder":
        tokens, dim, patches = keep + 1, config.hidden_size, config.num_patches
        return {"latent": tuple((r, tokens, dim) for r in rows), "ids_restore": tuple((r, patches) for r in rows)}
    raise ValueError(f"unknown graph {graph!r}")


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_onnx(
    model: MaskedAutoencoderViT,
    out_dir: str | Path,
    graphs: tuple[str, ...] = GRAPH_NAMES,
    passes: int = 10,
) -> ExportedGraphs:
    """Export ``graphs`` (fp32) to ``out_dir/<name>.onnx``; the decoder graphs need a checkpoint with a decoder.

    ``graphs`` may also name ``reconstruct`` (:data:`TRITON_GRAPH_NAMES`), the batch-first graph Triton serves.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    c = model.config
    pixels = torch.randn(2, c.num_channels, c.image_size, c.image_size)
    noise = torch.rand(2, passes, c.num_patches, generator=torch.Generator().manual_seed(0))
    ids_shuffle = torch.argsort(noise, dim=-1)
    ids_keep = ids_shuffle[..., : c.len_keep]
    ids_restore = torch.argsort(ids_shuffle, dim=-1).reshape(-1, c.num_patches)
    paths: dict[str, Path] = {}
    with torch.no_grad():
        for name in graphs:
            path = out_dir / f"{name}.onnx"
            if name == "encoder_full":
                _export(EncoderFullGraph(model), (pixels,), path, ["pixels"], ["cls"],
                        {"pixels": {0: "batch"}, "cls": {0: "batch"}})
            elif name == "encoder_masked":
                _export(EncoderMaskedGraph(model), (pixels, ids_keep), path, ["pixels", "ids_keep"], ["latent"],
                        {"pixels": {0: "batch"}, "ids_keep": {0: "batch", 1: "passes"}, "latent": {0: "rows"}})
            elif name == "decoder":
                if not model.has_decoder:
                    raise RuntimeError("this checkpoint has no decoder: only encoder_full can be exported")
                latent = EncoderMaskedGraph(model)(pixels, ids_keep)
                _export(DecoderGraph(model), (latent, ids_restore), path, ["latent", "ids_restore"], ["pred"],
                        {"latent": {0: "rows"}, "ids_restore": {0: "rows"}, "pred": {0: "rows"}})
            elif name == "reconstruct":
                if not model.has_decoder:
                    raise RuntimeError("this checkpoint has no decoder: only encoder_full can be exported")
                restore = ids_restore.reshape(2, passes, c.num_patches)
                _export(ReconstructGraph(model), (pixels, ids_keep, restore), path,
                        ["pixels", "ids_keep", "ids_restore"], ["pred"],
                        {"pixels": {0: "batch"}, "ids_keep": {0: "batch", 1: "passes"},
                         "ids_restore": {0: "batch", 1: "passes"}, "pred": {0: "batch", 1: "passes"}})
            else:
                raise ValueError(f"unknown graph {name!r}; choose from {GRAPH_NAMES + TRITON_GRAPH_NAMES[1:]}")
            paths[name] = path
            log.info("exported %s to %s", name, path)
    return ExportedGraphs(paths, {name: file_sha256(p) for name, p in paths.items()})
