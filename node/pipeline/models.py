"""The configured models of a worker (``[[models]]``, or the one ``[engine] model``) and which images each is for.

A :class:`ConfiguredModel` pairs a ``[[models]]`` entry with the loaded model (any family, through the
``engines.family.ModelFamily`` protocol: the worker never asks which family) and its calibration.
:func:`applicability_reason` decides from a header alone whether a model applies to an image (pure); an image
admitted by ``[eligibility]`` gets every model that applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

import numpy as np

from engines.family import ModelFamily, VolumeModelFamily
from node.settings import ModelEntry


def _upper(value: object) -> str:
    return str(value or "").strip().upper()


def applicability_reason(header: Dataset, entry: ModelEntry) -> str | None:
    """None if ``entry``'s model applies to the image, else why not (no PHI). An empty filter admits anything;
    View Position and laterality filters never exclude an image that lacks the attribute."""
    modality = _upper(header.get("Modality"))
    if entry.modalities and modality not in entry.modalities:
        return f"modality {modality or 'missing'}"
    body_part = _upper(header.get("BodyPartExamined"))
    if entry.body_parts and body_part not in entry.body_parts:
        return f"body part {body_part or 'missing'}"
    view = _upper(header.get("ViewPosition"))
    if entry.view_positions and view and view not in entry.view_positions:
        return f"view position {view}"
    laterality = _upper(header.get("Laterality") or header.get("ImageLaterality"))
    if entry.lateralities and laterality and laterality not in entry.lateralities:
        return f"laterality {laterality}"
    sop_class = str(header.get("SOPClassUID", ""))
    if entry.sop_classes and sop_class not in entry.sop_classes:
        return f"SOP class {sop_class or 'missing'}"
    return None


@dataclass
class ConfiguredModel:
    """One configured model, loaded: its entry, the model (any family), its calibration and reported heads."""

    entry: ModelEntry
    model: ModelFamily
    calibration: Any = None
    heads: Mapping[str, Any] = field(default_factory=dict)  # the reported heads (entry.heads, or all)

    def __post_init__(self) -> None:
        if not self.heads:
            self.heads = reported_heads(self.entry, self.model.heads)

    @property
    def name(self) -> str:
        return self.entry.name

    def head_labels(self) -> dict[str, list[str]]:
        return {name: list(head.labels) for name, head in self.heads.items()}

    @property
    def region_guided(self) -> bool:
        """Whether this model scores the whole image and crops (SKELEX's region-guided classifier)."""
        return bool(getattr(self.model, "supports_region_guided", False))

    @property
    def volumetric(self) -> bool:
        """Whether this is a 3-D model (``engines.family.VolumeModelFamily``, e.g. OrthoDiffusion): it takes one
        assembled volume per plane of an MR study (node/pipeline/mri.py), never single images."""
        return isinstance(self.model, VolumeModelFamily)


#: Longest side of the image a region-guided model's crops are cut from (SKELEX crops the full-resolution image; the
#: node's overlay image is smaller, ``engines.imaging.preprocess.DEFAULT_DISPLAY_SIZE``).
CROP_SOURCE_SIZE = 2048


def preprocess_options(configured: ConfiguredModel) -> dict[str, Any]:
    """Extra ``engines.preprocess`` arguments for a model: a region-guided one needs an image large enough that
    its smallest crop (``region_min_fraction`` of the short side) is not upsampled to the model input."""
    if not configured.region_guided:
        return {}
    preprocessing = configured.model.preprocessing
    smallest_crop = max(preprocessing.height, preprocessing.width) / configured.entry.region_min_fraction
    return {"display_size": CROP_SOURCE_SIZE, "min_decoded_side": min(CROP_SOURCE_SIZE, math.ceil(smallest_crop))}


def preprocessing_key(configured: ConfiguredModel) -> str:
    """Models with equal keys share one preprocessing of an image."""
    return repr((configured.model.preprocessing, sorted(preprocess_options(configured).items())))


def check_region_sources(models: Sequence[ConfiguredModel]) -> dict[int, int | None]:
    """{index of a region-guided model: index of the model whose error map gives its regions (None: whole image
    only)}; ``ValueError`` naming the key when ``regions_from`` names a model that cannot give regions."""
    by_name = {cm.name: index for index, cm in enumerate(models)}
    sources: dict[int, int | None] = {}
    for index, cm in enumerate(models):
        wanted = cm.entry.regions_from
        if not cm.region_guided:
            if wanted is not None:
                raise ValueError(f"models[{index}].regions_from: {cm.entry.path} is a {cm.model.family} model, not a "
                                 "region-guided classifier (a folder with head_layout.json)")
            continue
        if wanted is None:
            sources[index] = None
            continue
        source = by_name.get(wanted)
        if source is None or source == index or not models[source].model.supports_error_map:
            raise ValueError(f"models[{index}].regions_from: {wanted!r} is not another configured model with an "
                             "error map")
        sources[index] = source
    return sources


def region_guided_outputs(configured: ConfiguredModel,
                          frames: Sequence[tuple[Any, np.ndarray, Any, np.ndarray | None]]) -> list[dict[str, Any]]:
    """Frames ``(tensor, display, geometry, error_map)`` through a region-guided model, in one batched pass: each
    whole image plus crops of its ``display`` around ``error_map``'s highest-error regions (the ``regions_from``
    model's map of the same frame; None: whole image only), maxima per output as SKELEX's External_validation.py.
    Per frame, the worker's outputs: every reported value is a probability on its own (a maximum over crops), the
    findings' decisions, and the crop that gave the first finding's score as a polygon in source pixels (None when
    it was the whole image)."""
    entry, model = configured.entry, configured.model
    requests = []
    for tensor, display, geometry, error_map in frames:
        boxes = model.boxes_from_error_map(  # type: ignore[attr-defined]
            display.shape, geometry, error_map, max_regions=entry.max_regions, context=entry.region_context,
            min_fraction=entry.region_min_fraction)
        requests.append((display, boxes, tensor))
    results = model.region_guided_many(requests)  # type: ignore[attr-defined]
    outputs = []
    for (_tensor, display, geometry, _map), result in zip(frames, results):
        values = result.head_values(model.layout)  # type: ignore[attr-defined]
        region = None
        if result.findings and result.findings[0].crop != 0:
            box = result.boxes[result.findings[0].crop]
            left, top, right, bottom = box.scaled(geometry.columns / display.shape[1], geometry.rows / display.shape[0])
            region = np.array([[left, top], [right, top], [right, bottom], [left, bottom], [left, top]])
        outputs.append({
            "score": None, "map224": None, "region": region,
            "heads": {name: values[name] for name in configured.heads},
            "activations": {name: "sigmoid" for name in configured.heads},  # maxima over crops, each on its own
            "findings": {f.name: f.decision for f in result.findings
                         if f.decision is not None and f.name in configured.heads},
            "crops": len(result.boxes),
        })
    return outputs


def reported_heads(entry: ModelEntry, available: Mapping[str, Any], key: str = "models[0].heads") -> dict[str, Any]:
    """The heads ``entry`` reports: all of ``available``, or those it lists (``ValueError`` naming ``key`` for a
    listed head the model lacks)."""
    if entry.heads is None:
        return dict(available)
    missing = [name for name in entry.heads if name not in available]
    if missing:
        raise ValueError(f"{key}: model {entry.path} has no head(s) {', '.join(missing)} "
                         f"(it has: {', '.join(sorted(available)) or 'none'})")
    return {name: available[name] for name in entry.heads}


def configured_head_labels(entries: Sequence[ModelEntry], head_labels_of: Any) -> tuple[dict[str, dict[str, list[str]]] | None, list[str]]:
    """{configured name: head labels} for triage checks without loading weights, and the problems found.

    ``head_labels_of(path)`` reads a model folder's head files (None when it cannot without loading the weights:
    then the names are checked when the worker starts, and None is returned)."""
    models: dict[str, dict[str, list[str]]] = {}
    problems: list[str] = []
    for index, entry in enumerate(entries):
        labels = head_labels_of(Path(entry.path))
        if labels is None:
            return None, problems
        try:
            models[entry.name] = reported_heads(entry, labels, f"models[{index}].heads")
        except ValueError as exc:
            problems.append(str(exc))
            models[entry.name] = {}
    return models, problems
