"""The one interface every model family offers the worker and the CLI: :class:`ModelFamily`.

A *model family* is a kind of network with its own checkpoints, loaders and graphs: ``mae`` (ViT-MAE, SKELEX;
``engines/mae/``) today, DINOv3 and a 3-D diffusion UNet later. :func:`engines.load` detects the family and the
format on disk and returns a loaded model that implements this protocol, so the worker never asks which family
it holds. Everything family-specific (MAE's config, mask ratio, decoder) stays behind it.

Optional capabilities:

- **Error map**: ``supports_error_map`` says whether ``error_map_result`` works; ``error_map_spec`` describes the
  method (None without one). ``error_map_result`` on a model without one raises ``RuntimeError`` naming why.
- **ONNX / TensorRT graphs**: a model that also implements :class:`ExportsGraphs` can be exported and built
  (``msknode model export-onnx | build-engine``); check with ``isinstance(model, ExportsGraphs)``.

This module imports no family (families import it), so there is no cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - types only; importing them would pull torch into light callers
    from torch import Tensor

    from engines.heads import LinearHead
    from engines.imaging.preprocessor_config import PreprocessorConfig


@dataclass
class ErrorMapResult:
    """Maps [B, H, W] (224 x 224 for SKELEX's input), scores [B], and what reproduces them (seed or the noise)."""

    maps: Tensor
    scores: Tensor
    noise: Tensor  # [B, passes, L]
    seed: int | None
    passes: int


@dataclass(frozen=True)
class ErrorMapSpec:
    """How a family's error map is made, as results record it (e.g. the SR's method description).

    ``method``: e.g. ``"masked-reconstruction"`` (MAE); ``mask_ratio``: the share of patches hidden per pass.
    """

    method: str
    mask_ratio: float


class RunsOnBackend:
    """``device``, ``backend_name`` and ``precision`` read from ``self.backend``: the same in every family whose
    model runs through an :mod:`engines.backends` backend, so they are written once."""

    backend: Any

    @property
    def device(self) -> str:
        return str(self.backend.device)

    @property
    def backend_name(self) -> str:
        return str(self.backend.name)

    @property
    def precision(self) -> str:
        return str(self.backend.precision)


@runtime_checkable
class ModelFamily(Protocol):
    """A loaded model, whatever its family: identity, inputs, embeddings, heads, optional error map, backend."""

    family: str  # "mae", later "dinov3", "diffusion-unet-3d"
    name: str
    version: str
    format: str  # checkpoint format on disk, e.g. "hf-vitmae"
    encoder_hash: str  # sha256 of the weights heads and calibrations are tied to
    heads: Mapping[str, LinearHead]
    preprocessing: PreprocessorConfig  # from the model's preprocessor_config.json (ImageNet 224 by default)
    supports_error_map: bool
    error_map_spec: ErrorMapSpec | None  # None exactly when supports_error_map is False

    @property
    def backend_name(self) -> str: ...  # "cpu", "cuda", "tensorrt"

    @property
    def precision(self) -> str: ...  # "fp32", "bf16", "fp16", "int8"

    @property
    def device(self) -> str: ...

    def embed(self, x: Tensor) -> Tensor:
        """Model input [B, C, H, W] (as ``preprocess`` gives it) -> embeddings [B, D] fp32 on the CPU."""
        ...

    def predict(self, x: Tensor, embedding: Tensor | None = None) -> dict[str, Tensor]:
        """Every head on one shared embedding pass: head name -> probabilities [B, K]."""
        ...

    def error_map_result(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> ErrorMapResult:
        """Maps [B, H, W], scores [B] and what reproduces them; RuntimeError when ``supports_error_map`` is False."""
        ...

    def error_map(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> tuple[Tensor, Tensor]:
        """``(maps, scores)`` of :meth:`error_map_result`."""
        ...

    def describe(self) -> dict[str, Any]:
        """Identity and run settings, as /healthz and the worker's heartbeat show them."""
        ...

    def inspect(self) -> dict[str, Any]:
        """What ``msknode model info`` shows: format, sizes, parameter counts, hash, heads (family-specific keys)."""
        ...


@runtime_checkable
class ExportsGraphs(Protocol):
    """Optional: a model whose graphs can be exported to ONNX and built as TensorRT plans."""

    def graph_names(self) -> tuple[str, ...]:
        """The graphs this checkpoint has (e.g. no decoder graph for an encoder-only MAE)."""
        ...

    def export_onnx(self, out_dir: Path, graphs: tuple[str, ...] | None = None, passes: int = 10) -> Any:
        """Write ``<graph>.onnx`` files; returns paths and sha256 per graph (``.paths``, ``.sha256``)."""
        ...

    def build_tensorrt(
        self,
        cache_dir: Path | None = None,
        precision: str = "fp16",
        profile: Any = None,
        progress: Callable[[str], None] | None = None,
    ) -> Any:
        """Build (or find cached) TensorRT plans; returns the TensorRT backend (``.keys``: graph -> plan key)."""
        ...


@runtime_checkable
class VolumeModelFamily(Protocol):
    """A loaded 3-D model (OrthoDiffusion): one assembled volume per plane in, not a batch of 2-D images.

    It shares :class:`ModelFamily`'s identity (family, name, version, format, encoder_hash, heads, backend,
    describe/inspect, ``supports_error_map`` False) but not its input contract: ``embed`` and ``predict`` take
    ``{plane: volume [slices, rows, cols]}`` (DICOM pixel layout, slices along the normal) and the model does its
    own input path per plane; ``segment`` returns a label volume on the assembled volume's grid.
    """

    family: str
    name: str
    version: str
    format: str
    encoder_hash: str
    heads: Mapping[str, LinearHead]
    supports_error_map: bool

    @property
    def backend_name(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def plane_names(self) -> tuple[str, ...]: ...  # the planes embed() needs, in fusion order

    @property
    def supports_segmentation(self) -> bool: ...

    def embed(self, volumes: Mapping[str, Any]) -> Tensor:
        """``{plane: volume}`` -> fused embedding [1, D] fp32 on the CPU."""
        ...

    def predict(self, volumes: Mapping[str, Any] | None = None, embedding: Tensor | None = None) -> dict[str, Tensor]:
        """Every head on one fused embedding: head name -> probabilities [1, K]."""
        ...

    def segment(self, volume: Any) -> Any:
        """Labels of the segmentation plane's volume (``.labels`` [slices, rows, cols] uint8); RuntimeError if none."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def inspect(self) -> dict[str, Any]: ...
