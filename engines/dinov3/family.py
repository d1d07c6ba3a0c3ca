"""The DINOv3 family: :class:`DINOv3Model`, one loaded DINOv3 / OrthoFoundation checkpoint with heads and a backend.

It implements :class:`engines.family.ModelFamily` (embeddings, heads, identity; **no error map**: DINOv3 has no
decoder, so ``supports_error_map`` is False) and :class:`engines.family.ExportsGraphs` (one ONNX graph, TensorRT
plans through the shared factory). :func:`load_dinov3` reads any DINOv3 checkpoint (``engines.dinov3.loaders``) and
is what :func:`engines.load` calls for this family.

Heads read one of two features (the head file's ``pooling``): the normed CLS token (``"cls"``, the embedding, what
OrthoFoundation's tasks use) or the mean of the normed patch tokens (``"patch_mean"``). Both come from one pass:
:meth:`DINOv3Model.embed` keeps the features of its last batch, so ``predict(x, embedding=model.embed(x))`` (what the
worker does) never runs the encoder twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engines.backends import Backend
from engines.backends.tensorrt_backend import BatchProfile, TensorRTBackend
from engines.backends.torch_backend import TorchBackend
from engines.dinov3.backend import build_backend, tensorrt_backend
from engines.dinov3.loaders import LoadedDINOv3, build_model, describe_rope, detect_format, load_checkpoint
from engines.dinov3.network import DINOv3Config, DINOv3ViT, count_parameters, encoder_sha256
from engines.dinov3.onnx_export import GRAPH_NAMES, ExportedGraphs, export_onnx
from engines.family import ErrorMapResult, ErrorMapSpec, RunsOnBackend
from engines.heads import LinearHead, load_heads_dir
from engines.imaging.preprocessor_config import PreprocessorConfig

log = logging.getLogger(__name__)

FAMILY = "dinov3"
POOLINGS = ("cls", "patch_mean")


class DINOv3Model(RunsOnBackend):
    """A DINOv3 checkpoint ready to run: fp32 reference weights (``network``), heads, and a backend.

    Implements :class:`engines.family.ModelFamily` and :class:`engines.family.ExportsGraphs`.
    """

    family = FAMILY
    supports_error_map = False
    error_map_spec: ErrorMapSpec | None = None
    poolings = POOLINGS

    def __init__(
        self,
        network: DINOv3ViT,
        *,
        name: str,
        version: str | None = None,
        format: str = "in-memory",
        source: Path | None = None,
        backend: Backend | None = None,
        heads: dict[str, LinearHead] | None = None,
        preprocessing: PreprocessorConfig | None = None,
        rope_source: str = "config",
        notes: list[str] | None = None,
    ) -> None:
        self.network = network.eval()
        self.name = name
        self.format = format
        self.source = source
        self.rope_source = rope_source
        self.notes = list(notes or [])
        self.encoder_hash = encoder_sha256(network)
        self.version = version or self.encoder_hash[:12]
        self.preprocessing = preprocessing or PreprocessorConfig.square(network.config.image_size)
        p = network.config.patch_size
        if self.preprocessing.height % p or self.preprocessing.width % p:
            raise ValueError(f"input {self.preprocessing.height} x {self.preprocessing.width} is not in whole {p}-px patches")
        self.backend = backend if backend is not None else TorchBackend(network)
        self.heads: dict[str, LinearHead] = {}
        self._last: tuple[Tensor, dict[str, Tensor]] | None = None  # (embedding returned, its batch's features)
        for head in (heads or {}).values():
            self.add_head(head)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: LoadedDINOv3,
        device: str = "cpu",
        backend: str | None = None,
        precision: str | None = None,
        load_heads: bool = True,
    ) -> DINOv3Model:
        network = build_model(checkpoint)
        source = checkpoint.source
        name = checkpoint.meta.get("msknode_name", source.stem if source.is_file() else source.name)
        prep = checkpoint.preprocessing
        chosen = build_backend(network, prep.height, prep.width, backend=backend, device=device, precision=precision)
        model = cls(
            network, name=name, version=checkpoint.meta.get("msknode_version"), format=checkpoint.format,
            source=source, backend=chosen, preprocessing=prep, rope_source=checkpoint.rope_source,
            notes=checkpoint.notes,
        )
        heads_dir = source / "heads" if source.is_dir() else None
        if load_heads and heads_dir is not None and heads_dir.is_dir():
            for head in load_heads_dir(heads_dir, model.encoder_hash).values():
                model.add_head(head)
        for note in checkpoint.notes:
            log.info("%s: %s", name, note)
        log.info(
            "DINOv3 encoder %s ready: rope=%s backend=%s precision=%s heads=%s",
            name, describe_rope(model.config), model.backend_name, model.precision, sorted(model.heads),
        )
        return model

    # ------------------------------------------------------------------------------------------ identity
    @property
    def config(self) -> DINOv3Config:
        return self.network.config

    @property
    def has_decoder(self) -> bool:
        return False

    def describe(self) -> dict[str, Any]:
        """Identity and run settings, as /healthz and the worker's heartbeat show them."""
        return {
            "family": self.family,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "encoder_sha256": self.encoder_hash,
            "rope": "on" if self.config.use_rope else "off",
            "register_tokens": self.config.num_register_tokens,
            "has_decoder": False,
            "heads": sorted(self.heads),
            **self.backend.describe(),
        }

    def inspect(self) -> dict[str, Any]:
        """What ``msknode model info`` shows (after its ``path``), in that order."""
        c = self.config
        prep = self.preprocessing
        return {
            "family": self.family,
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "image_size": f"{prep.height} x {prep.width}",
            "patch_size": c.patch_size,
            "hidden_size": c.hidden_size,
            "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads,
            "mlp": f"{'gated ' + c.hidden_act if c.use_gated_mlp else c.hidden_act} {c.intermediate_size}",
            "register_tokens": c.num_register_tokens,
            "layer_norm_eps": c.layer_norm_eps,
            "rope": describe_rope(c),
            "rope_source": self.rope_source,
            "qkv_bias": "/".join(p for p, on in zip("qkv", (c.query_bias, c.key_bias, c.value_bias)) if on) or "none",
            "layerscale": c.layerscale,
            "has_decoder": False,
            "error_map": "none (DINOv3 has no decoder)",
            "encoder_parameters": count_parameters(c),
            "parameters": count_parameters(c),
            "encoder_sha256": self.encoder_hash,
            "preprocessing": f"{prep.height} x {prep.width}, resample {prep.resample}, mean {list(prep.image_mean)}, "
                             f"std {list(prep.image_std)}",
            "notes": self.notes,
            "model_heads": {
                name: {**head.describe(), "pooling": head.pooling} for name, head in sorted(self.heads.items())
            },
        }

    # ------------------------------------------------------------------------------------------ heads
    def add_head(self, head: LinearHead) -> None:
        """Attach a head; refused if trained on other encoder weights, another width or an unknown pooling."""
        head.check_encoder(self.encoder_hash)
        if head.in_features != self.config.hidden_size:
            raise ValueError(
                f"head {head.name!r} expects {head.in_features}-d features, encoder gives {self.config.hidden_size}"
            )
        if head.pooling not in self.poolings:
            raise ValueError(f"head {head.name!r} reads {head.pooling!r}; this family offers {self.poolings}")
        self.heads[head.name] = head.eval()

    # ------------------------------------------------------------------------------------------ inference
    def _check_input(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        c, prep = self.config, self.preprocessing
        if tuple(x.shape[1:]) != (c.num_channels, prep.height, prep.width):
            raise ValueError(f"expected [B, {c.num_channels}, {prep.height}, {prep.width}], got {list(x.shape)}")
        return x.float()

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """``cls`` and ``patch_mean`` [B, D] fp32 on the CPU from one encoder pass."""
        raw = self.backend.features(self._check_input(x))
        # clone outside inference mode: callers (head training) may use the results in autograd
        return {name: value.cpu().clone() for name, value in raw.items()}

    def embed(self, x: Tensor, pooling: str = "cls") -> Tensor:
        """The normed CLS token [B, D] fp32 (``x`` normalised, [B, 3, H, W]); ``pooling="patch_mean"`` for the other."""
        if pooling not in self.poolings:
            raise ValueError(f"pooling must be one of {self.poolings}, got {pooling!r}")
        features = self.features(x)
        embedding = features[pooling]
        self._last = (embedding, features) if pooling == "cls" else None
        return embedding

    def predict(self, x: Tensor, embedding: Tensor | None = None) -> dict[str, Tensor]:
        """Every head on one shared encoder pass: name -> probabilities [B, K].

        ``embedding`` (the CLS from :meth:`embed`) is reused; patch-mean heads then take the features of that
        same ``embed`` call, or one new pass over ``x`` if the embedding came from elsewhere.
        """
        needed = {head.pooling for head in self.heads.values()}
        features: dict[str, Tensor]
        if embedding is not None and self._last is not None and embedding is self._last[0]:
            features = self._last[1]
        elif embedding is not None and needed <= {"cls"}:
            features = {"cls": embedding}
        else:
            features = self.features(x) if self.heads else {}
        with torch.no_grad():
            return {name: head.predict(features[head.pooling].float()) for name, head in self.heads.items()}

    def error_map_result(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> ErrorMapResult:
        raise RuntimeError(
            f"{self.name}: the DINOv3 family has no decoder and so no reconstruction error map "
            "(supports_error_map is False)"
        )

    def error_map(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> tuple[Tensor, Tensor]:
        result = self.error_map_result(x, noise=noise, seed=seed, passes=passes)
        return result.maps, result.scores

    # ------------------------------------------------------------------------------------------ graphs
    def graph_names(self) -> tuple[str, ...]:
        return GRAPH_NAMES

    def export_onnx(self, out_dir: Path, graphs: tuple[str, ...] | None = None, passes: int = 10) -> ExportedGraphs:
        """``encoder_full.onnx`` (fp32, dynamic batch; outputs ``cls``, ``patch_mean``); ``passes`` is unused here."""
        prep = self.preprocessing
        return export_onnx(self.network, out_dir, height=prep.height, width=prep.width, graphs=graphs or GRAPH_NAMES)

    def build_tensorrt(
        self,
        cache_dir: Path | None = None,
        precision: str = "fp16",
        profile: BatchProfile | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> TensorRTBackend:
        """TensorRT plan for this GPU (cached); the backend returned is not switched to."""
        prep = self.preprocessing
        return tensorrt_backend(self.network, prep.height, prep.width, precision=precision, cache_dir=cache_dir,
                                profile=profile, progress=progress)


def load_dinov3(
    path: str | Path,
    device: str = "cpu",
    backend: str | None = None,
    precision: str | None = None,
    load_heads: bool = True,
) -> DINOv3Model:
    """Load any DINOv3 checkpoint (HF folder, the authors' / OrthoFoundation ``.pth``, timm) as a :class:`DINOv3Model`."""
    checkpoint = load_checkpoint(path)
    log.info(
        "loaded %s checkpoint: %d layers x %d wide, %d registers, rope %s",
        checkpoint.format, checkpoint.config.num_hidden_layers, checkpoint.config.hidden_size,
        checkpoint.config.num_register_tokens, describe_rope(checkpoint.config),
    )
    return DINOv3Model.from_checkpoint(
        checkpoint, device=device, backend=backend, precision=precision, load_heads=load_heads
    )


def is_dinov3(path: str | Path) -> bool:
    """Whether ``path`` holds a DINOv3 checkpoint this family reads (used by :func:`engines.loading.detect_family`)."""
    return detect_format(path) is not None
