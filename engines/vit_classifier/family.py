"""The multi-head ViT classifier family: :class:`ViTClassifierModel` (SKELEX's region-guided tumour model).

One ``ViTForImageClassification`` whose logits split into groups and findings by ``head_layout.json``
(:mod:`engines.vit_classifier.layout`). It implements :class:`engines.family.ModelFamily` (``predict`` scores the
whole image: findings first, then every group) and adds :meth:`ViTClassifierModel.region_guided`, which scores the
whole image and crops of it and keeps the maxima as SKELEX's ``External_validation.py`` does. It has no error map
of its own: the node takes the crops from another model's error map (``[[models]] regions_from``).

The encoder is the MAE family's canonical ViT (the same blocks; HF's learned position table is loaded into it),
and the classifier layer runs on the host in fp32 on the CLS feature, so any backend that gives embeddings runs
this family too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engines.backends import Backend, select_backend
from engines.family import ErrorMapResult, ErrorMapSpec, RunsOnBackend
from engines.imaging.geometry import SourceGeometry
from engines.imaging.preprocess import tensor_from_uint8
from engines.imaging.preprocessor_config import PreprocessorConfig
from engines.imaging.regions import high_error_regions
from engines.mae.network import MAEConfig, MaskedAutoencoderViT, count_parameters, encoder_sha256
from engines.vit_classifier.layout import HeadLayout, reported_labels
from engines.vit_classifier.loaders import FORMAT, ClassifierCheckpoint, load_classifier_checkpoint
from engines.vit_classifier.region_guided import (
    SKELEX_EXCLUDED_LABELS,
    WHOLE_IMAGE,
    CropBox,
    RegionGuidedResult,
    activate,
    aggregate,
    boxes_around_regions,
)

log = logging.getLogger(__name__)

FAMILY = "vit-classifier"


@dataclass(frozen=True)
class OutputHead:
    """What the node reports per name: a finding (one label, its score) or a group (one label per output)."""

    name: str
    labels: list[str]
    activation: str  # "sigmoid" (each value on its own) or "softmax" (a group's whole-image distribution)
    kind: str  # "finding" or "group"
    pooling: str = "cls"


class ViTClassifierModel(RunsOnBackend):
    """A multi-head ViT classifier ready to run: fp32 encoder, classifier layer, layout and backend."""

    family = FAMILY
    supports_error_map = False
    supports_region_guided = True  # region_guided / region_guided_from_error_map (the node's worker asks this)
    error_map_spec: ErrorMapSpec | None = None

    def __init__(
        self,
        encoder: MaskedAutoencoderViT,
        classifier: nn.Linear,
        layout: HeadLayout,
        *,
        name: str,
        version: str | None = None,
        format: str = "in-memory",
        source: Path | None = None,
        backend: Backend | None = None,
        preprocessing: PreprocessorConfig | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        if encoder.has_decoder:
            raise ValueError("a classifier runs an encoder only")
        if classifier.out_features != layout.num_outputs or classifier.in_features != encoder.config.hidden_size:
            raise ValueError(f"classifier {classifier.in_features} -> {classifier.out_features} does not fit the "
                             f"layout ({layout.num_outputs} outputs) on a {encoder.config.hidden_size}-wide encoder")
        self.network = encoder.eval()
        self.classifier = classifier.float().eval()
        self.layout = layout
        self.name = name
        self.format = format
        self.source = source
        self.notes = list(notes)
        # One hash over encoder and classifier: the outputs depend on both.
        self.encoder_hash = encoder_sha256({
            **encoder.state_dict(), "classifier.weight": classifier.weight, "classifier.bias": classifier.bias,
        })
        self.version = version or self.encoder_hash[:12]
        self.preprocessing = preprocessing or PreprocessorConfig.square(encoder.config.image_size)
        self.backend = backend if backend is not None else select_backend(encoder, backend="cpu")
        activations = {g.name: g.activation for g in layout.groups}
        self.heads: dict[str, OutputHead] = {
            name: OutputHead(name, labels, activations.get(name, "sigmoid"),
                             "group" if name in activations else "finding")
            for name, labels in reported_labels(layout).items()
        }

    @classmethod
    def from_checkpoint(
        cls, checkpoint: ClassifierCheckpoint, device: str = "cpu", backend: str | None = None,
        precision: str | None = None,
    ) -> ViTClassifierModel:
        # Built on the meta device and filled by assignment (a random ViT-L initialisation costs seconds).
        with torch.device("meta"):
            encoder = MaskedAutoencoderViT(checkpoint.config, with_decoder=False)
            classifier = nn.Linear(checkpoint.config.hidden_size, checkpoint.layout.num_outputs)
        encoder.load_state_dict(checkpoint.encoder_state, strict=True, assign=True)
        classifier.load_state_dict({"weight": checkpoint.classifier_weight, "bias": checkpoint.classifier_bias},
                                   strict=True, assign=True)
        encoder.eval().requires_grad_(False)
        chosen = select_backend(encoder, backend=backend, device=device, precision=precision)
        model = cls(encoder, classifier.requires_grad_(False), checkpoint.layout, name=checkpoint.name,
                    version=checkpoint.version, format=FORMAT, source=checkpoint.source, backend=chosen,
                    preprocessing=checkpoint.preprocessing, notes=checkpoint.notes)
        for note in checkpoint.notes:
            log.info("%s: %s", model.name, note)
        log.info("classifier %s ready: %d outputs in %d groups, backend=%s precision=%s", model.name,
                 checkpoint.layout.num_outputs, len(checkpoint.layout.groups), model.backend_name, model.precision)
        return model

    # ------------------------------------------------------------------------------------------ identity
    @property
    def config(self) -> MAEConfig:
        return self.network.config

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "family": FAMILY,
            "encoder_sha256": self.encoder_hash,
            "has_decoder": False,
            "heads": sorted(self.heads),
            **self.backend.describe(),
        }

    def inspect(self) -> dict[str, Any]:
        """What ``msknode model info`` shows."""
        c = self.config
        return {
            "format": self.format,
            "family": FAMILY,
            "name": self.name,
            "version": self.version,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "hidden_size": c.hidden_size,
            "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads,
            "mlp_size": c.intermediate_size,
            "layer_norm_eps": c.layer_norm_eps,
            "has_decoder": False,
            "outputs": self.layout.num_outputs,
            "output_groups": {
                g.name: {"activation": g.activation, "indices": _ranges(g.indices), "labels": list(g.labels)}
                for g in self.layout.groups
            },
            "findings": {
                f.name: {"label": f.label, "score": f"max over crops of sum of outputs {list(f.sum_of)}",
                         "rule": f"{'>=' if f.inclusive else '>'} {f.threshold}",
                         **({"requires": f.requires} if f.requires else {}), "values": list(f.values)}
                for f in self.layout.findings
            },
            "inference": "region-guided: whole image + crops (regions_from an error-map model), max per output",
            "parameters": count_parameters(c, with_decoder=False) + self.classifier.weight.numel()
            + self.classifier.bias.numel(),
            "encoder_sha256": self.encoder_hash,
            "notes": self.notes,
            "model_heads": {name: {"labels": h.labels, "activation": h.activation, "kind": h.kind}
                            for name, h in self.heads.items()},
        }

    # ------------------------------------------------------------------------------------------ inference
    def _check_input(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"expected [B, {c.num_channels}, {c.image_size}, {c.image_size}], got {list(x.shape)}")
        return x.float()

    def embed(self, x: Tensor) -> Tensor:
        """CLS feature after the final norm: [B, D] fp32 on the CPU."""
        return self.backend.embed(self._check_input(x)).cpu().clone()

    def logits(self, x: Tensor | None = None, embedding: Tensor | None = None) -> Tensor:
        """[B, num_outputs], as ``ViTForImageClassification(...).logits``."""
        emb = self.embed(x) if embedding is None else embedding
        with torch.no_grad():
            return self.classifier(emb.float().cpu())

    def probabilities(self, x: Tensor | None = None, embedding: Tensor | None = None) -> Tensor:
        """[B, num_outputs] with every group's activation applied."""
        return activate(self.logits(x, embedding), self.layout)

    def predict(self, x: Tensor, embedding: Tensor | None = None) -> dict[str, Tensor]:
        """The whole image only: each finding's summed probability [B, 1], each group's probabilities [B, K]."""
        probs = self.probabilities(x, embedding)
        out = {f.name: probs[:, list(f.sum_of)].sum(dim=1, keepdim=True).clamp(0.0, 1.0)
               for f in self.layout.findings}
        out.update({g.name: probs[:, list(g.indices)] for g in self.layout.groups})
        return out

    def crop_tensors(self, image8: np.ndarray, boxes: Sequence[CropBox]) -> Tensor:
        """Each box of the 8-bit image resized to the model input (no further min-max), [N, 3, H, W]."""
        if not boxes:
            c = self.config
            return torch.empty(0, c.num_channels, c.image_size, c.image_size)
        rows, columns = image8.shape[:2]
        for box in boxes:
            if box.right > columns or box.bottom > rows:
                raise ValueError(f"crop {box} lies outside the {rows} x {columns} image")
        return torch.stack([tensor_from_uint8(image8[b.top:b.bottom, b.left:b.right], self.preprocessing)
                            for b in boxes])

    def region_guided(
        self, image8: np.ndarray, boxes: Sequence[CropBox], whole: Tensor | None = None,
        excluded_labels: frozenset[str] = SKELEX_EXCLUDED_LABELS,
    ) -> RegionGuidedResult:
        """Score the whole image and each crop of ``image8`` (uint8 grey or RGB), keep the maxima (SKELEX's rule).

        ``whole`` is the whole image's model input when the caller already has it (the node's preprocessed
        frame), else it is made from ``image8``.
        """
        return self.region_guided_many([(image8, boxes, whole)], excluded_labels)[0]

    def region_guided_many(
        self, images: Sequence[tuple[np.ndarray, Sequence[CropBox], Tensor | None]],
        excluded_labels: frozenset[str] = SKELEX_EXCLUDED_LABELS,
    ) -> list[RegionGuidedResult]:
        """:meth:`region_guided` for several images (image8, boxes, whole) in one batched pass over all crops."""
        inputs, crop_boxes = [], []
        for image8, boxes, whole in images:
            rows, columns = image8.shape[:2]
            whole = tensor_from_uint8(image8, self.preprocessing) if whole is None else self._check_input(whole)[0]
            inputs.append(torch.cat([whole[None], self.crop_tensors(image8, boxes)]))
            crop_boxes.append([CropBox(0, 0, columns, rows, WHOLE_IMAGE), *boxes])
        if not inputs:
            return []
        probabilities = self.probabilities(torch.cat(inputs)).numpy()
        results, start = [], 0
        for boxes in crop_boxes:
            results.append(aggregate(probabilities[start:start + len(boxes)], boxes, self.layout, excluded_labels))
            start += len(boxes)
        return results

    def boxes_from_error_map(
        self, image_shape: tuple[int, int], geometry: SourceGeometry, error_map: np.ndarray | None,
        max_regions: int = 3, context: float = 2.0, min_fraction: float = 0.25, percentile: float = 98.0,
    ) -> list[CropBox]:
        """Crops of an image of ``image_shape`` (rows, columns; any size showing the source, e.g. the node's display
        image) around ``error_map``'s highest-error regions (a model-space map of the same image, e.g. the MAE's,
        mapped through ``geometry``); none for no map or a flat one."""
        regions = [] if error_map is None else high_error_regions(error_map, geometry, percentile, max_regions)
        return boxes_around_regions(regions, geometry, image_shape, context=context, min_fraction=min_fraction)

    def region_guided_from_error_map(
        self, image8: np.ndarray, geometry: SourceGeometry, error_map: np.ndarray | None, whole: Tensor | None = None,
        max_regions: int = 3, context: float = 2.0, min_fraction: float = 0.25, percentile: float = 98.0,
    ) -> RegionGuidedResult:
        """:meth:`region_guided` with the crops of :meth:`boxes_from_error_map`: whole image only without regions."""
        boxes = self.boxes_from_error_map(image8.shape[:2], geometry, error_map, max_regions, context, min_fraction,
                                          percentile)
        return self.region_guided(image8, boxes, whole=whole)

    def error_map_result(self, x: Tensor, noise: Tensor | None = None, seed: int | None = None,
                         passes: int = 10) -> ErrorMapResult:
        raise RuntimeError(f"{self.name}: a classifier has no error map; configure regions_from an MAE model")

    def error_map(self, x: Tensor, noise: Tensor | None = None, seed: int | None = None,
                  passes: int = 10) -> tuple[Tensor, Tensor]:
        result = self.error_map_result(x, noise=noise, seed=seed, passes=passes)
        return result.maps, result.scores


def _ranges(indices: Sequence[int]) -> str:
    """[1, 2, 3, 4] -> "1-4"; [0] -> "0"; [0, 37] -> "0, 37"."""
    parts: list[str] = []
    start = previous = indices[0]
    for current in [*indices[1:], None]:
        if current is not None and current == previous + 1:
            previous = current
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if current is not None:
            start = previous = current
    return ", ".join(parts)


def load_vit_classifier(
    path: str | Path, device: str = "cpu", backend: str | None = None, precision: str | None = None,
    load_heads: bool = True,
) -> ViTClassifierModel:
    """Load a multi-head classifier folder (``head_layout.json`` + HF ViT weights); ``load_heads`` is unused (the
    heads are the layout's)."""
    return ViTClassifierModel.from_checkpoint(load_classifier_checkpoint(path), device=device, backend=backend,
                                              precision=precision)
