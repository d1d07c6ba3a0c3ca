"""The MAE family: :class:`MAEModel`, one loaded ViT-MAE checkpoint with its heads and the backend that runs it.

It implements :class:`engines.family.ModelFamily` (embeddings, heads, the zero-shot error map, identity), so the
worker and the CLI use it without knowing it is an MAE; :func:`load_mae` reads any MAE / timm / HF ViT checkpoint
(``engines.mae.loaders``) and is what :func:`engines.load` calls for this family.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engines.backends import Backend
from engines.backends.tensorrt_backend import BatchProfile, TensorRTBackend
from engines.backends.torch_backend import TorchBackend
from engines.family import ErrorMapResult, ErrorMapSpec, RunsOnBackend
from engines.heads import LinearHead, head_from_classifier, load_heads_dir
from engines.imaging.preprocessor_config import PreprocessorConfig
from engines.mae.backend import build_backend, tensorrt_backend
from engines.mae.errormap import compute_error_map
from engines.mae.loaders import LoadedCheckpoint, build_model, load_checkpoint
from engines.mae.network import MAEConfig, MaskedAutoencoderViT, count_parameters, encoder_sha256
from engines.mae.onnx_export import GRAPH_NAMES, ExportedGraphs, export_onnx

log = logging.getLogger(__name__)

FAMILY = "mae"
ERROR_MAP_METHOD = "masked-reconstruction"


class MAEModel(RunsOnBackend):
    """A ViT-MAE checkpoint ready to run: fp32 reference weights (``network``), heads, and a backend.

    Implements :class:`engines.family.ModelFamily` and :class:`engines.family.ExportsGraphs`.
    """

    family = FAMILY

    def __init__(
        self,
        network: MaskedAutoencoderViT,
        *,
        name: str,
        version: str | None = None,
        format: str = "in-memory",
        source: Path | None = None,
        backend: Backend | None = None,
        heads: dict[str, LinearHead] | None = None,
        preprocessing: PreprocessorConfig | None = None,
    ) -> None:
        self.network = network.eval()
        self.name = name
        self.format = format
        self.source = source
        self.encoder_hash = encoder_sha256(network)
        self.version = version or self.encoder_hash[:12]
        self.preprocessing = preprocessing or PreprocessorConfig.square(network.config.image_size)
        self.backend = backend if backend is not None else TorchBackend(network)
        self.heads: dict[str, LinearHead] = {}
        for head in (heads or {}).values():
            self.add_head(head)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: LoadedCheckpoint,
        device: str = "cpu",
        backend: str | None = None,
        precision: str | None = None,
        load_heads: bool = True,
    ) -> MAEModel:
        network = build_model(checkpoint)
        source = checkpoint.source
        name, version = source.stem if source.is_file() else source.name, None
        meta_file = (source if source.is_dir() else source.parent) / "config.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            name = meta.get("msknode_name", name)
            version = meta.get("msknode_version")
        chosen = build_backend(network, backend=backend, device=device, precision=precision)
        model = cls(
            network, name=name, version=version, format=checkpoint.format, source=source, backend=chosen,
            preprocessing=checkpoint.preprocessing,
        )
        if checkpoint.classifier is not None:
            model.add_head(head_from_classifier(checkpoint.classifier, model.encoder_hash, str(source)))
        heads_dir = source / "heads" if source.is_dir() else None
        if load_heads and heads_dir is not None and heads_dir.is_dir():
            for head in load_heads_dir(heads_dir, model.encoder_hash).values():
                model.add_head(head)
        for note in checkpoint.notes:
            log.info("%s: %s", name, note)
        log.info(
            "encoder %s ready: backend=%s precision=%s heads=%s",
            name, model.backend_name, model.precision, sorted(model.heads),
        )
        return model

    # ------------------------------------------------------------------------------------------ identity
    @property
    def config(self) -> MAEConfig:
        return self.network.config

    @property
    def has_decoder(self) -> bool:
        return self.network.has_decoder

    @property
    def supports_error_map(self) -> bool:
        """The error map needs the decoder: an encoder-only checkpoint gives embeddings and heads only."""
        return self.network.has_decoder

    @property
    def error_map_spec(self) -> ErrorMapSpec | None:
        return ErrorMapSpec(ERROR_MAP_METHOD, self.config.mask_ratio) if self.supports_error_map else None

    def describe(self) -> dict[str, Any]:
        """Identity and run settings, as /healthz and ``model info`` show them."""
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "encoder_sha256": self.encoder_hash,
            "has_decoder": self.has_decoder,
            "heads": sorted(self.heads),
            **self.backend.describe(),
        }

    def inspect(self) -> dict[str, Any]:
        """What ``msknode model info`` shows (after its ``path``), in that order."""
        c = self.config
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "hidden_size": c.hidden_size,
            "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads,
            "mlp_size": c.intermediate_size,
            "layer_norm_eps": c.layer_norm_eps,
            "has_decoder": self.has_decoder,
            "decoder": (
                f"{c.decoder_hidden_size} x {c.decoder_num_hidden_layers} layers, {c.decoder_num_attention_heads} "
                f"heads, MLP {c.decoder_intermediate_size}" if self.has_decoder else None
            ),
            "mask_ratio": c.mask_ratio,
            "encoder_parameters": count_parameters(c, with_decoder=False),
            "parameters": count_parameters(c, with_decoder=self.has_decoder),
            "encoder_sha256": self.encoder_hash,
            "model_heads": {name: head.describe() for name, head in sorted(self.heads.items())},
        }

    # ------------------------------------------------------------------------------------------ heads
    def add_head(self, head: LinearHead) -> None:
        """Attach a head; refused if it was trained on other encoder weights or another width."""
        head.check_encoder(self.encoder_hash)
        if head.pooling != "cls":
            raise ValueError(f"head {head.name!r} reads {head.pooling!r} features; an MAE model offers only 'cls'")
        if head.in_features != self.config.hidden_size:
            raise ValueError(
                f"head {head.name!r} expects {head.in_features}-d embeddings, "
                f"encoder gives {self.config.hidden_size}"
            )
        self.heads[head.name] = head.eval()

    # ------------------------------------------------------------------------------------------ inference
    def _check_input(self, x: Tensor) -> Tensor:
        c = self.config
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"expected [B, {c.num_channels}, {c.image_size}, {c.image_size}], got {list(x.shape)}")
        return x.float()

    def embed(self, x: Tensor) -> Tensor:
        """CLS feature after the final norm: [B, D] fp32 (``x`` normalised, [B, 3, 224, 224])."""
        # clone outside inference mode: callers (head training) may use the result in autograd
        return self.backend.embed(self._check_input(x)).cpu().clone()

    def predict(self, x: Tensor, embedding: Tensor | None = None) -> dict[str, Tensor]:
        """Every head on the one shared embedding pass: name -> probabilities [B, K] (``embedding`` reused if given)."""
        emb = self.embed(x) if embedding is None else embedding
        with torch.no_grad():
            return {name: head.predict(emb.float()) for name, head in self.heads.items()}

    def error_map_result(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> ErrorMapResult:
        """The error map with what reproduces it (seed or noise); see :mod:`engines.mae.errormap`."""
        if not self.supports_error_map:
            raise RuntimeError(
                f"{self.name}: this checkpoint has no decoder ({self.format}, encoder only), so it cannot "
                "reconstruct masked patches; load a full MAE checkpoint for error maps"
            )
        x = self._check_input(x)
        c = self.config
        result = compute_error_map(
            self.backend.reconstruct,
            x,
            patch_size=c.patch_size,
            num_patches=c.num_patches,
            mask_ratio=c.mask_ratio,
            noise=noise,
            seed=seed,
            passes=passes,
            mean=self.preprocessing.image_mean,
            std=self.preprocessing.image_std,
        )
        result.maps, result.scores = result.maps.cpu().clone(), result.scores.cpu().clone()
        return result

    def error_map(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> tuple[Tensor, Tensor]:
        """(maps [B, 224, 224], scores [B]); ``noise`` as HF ([passes, L] or [B, passes, L]), else ``seed``."""
        result = self.error_map_result(x, noise=noise, seed=seed, passes=passes)
        return result.maps, result.scores

    # ------------------------------------------------------------------------------------------ graphs
    def graph_names(self) -> tuple[str, ...]:
        return GRAPH_NAMES if self.has_decoder else ("encoder_full",)

    def export_onnx(self, out_dir: Path, graphs: tuple[str, ...] | None = None, passes: int = 10) -> ExportedGraphs:
        """The ONNX graphs (fp32, dynamic batch) of this checkpoint; see :mod:`engines.mae.onnx_export`."""
        return export_onnx(self.network, out_dir, graphs=graphs or self.graph_names(), passes=passes)

    def build_tensorrt(
        self,
        cache_dir: Path | None = None,
        precision: str = "fp16",
        profile: BatchProfile | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> TensorRTBackend:
        """TensorRT plans for this GPU (cached); the backend returned is not switched to."""
        return tensorrt_backend(self.network, precision=precision, cache_dir=cache_dir, profile=profile,
                                progress=progress)


def load_mae(
    path: str | Path,
    device: str = "cpu",
    backend: str | None = None,
    precision: str | None = None,
    load_heads: bool = True,
) -> MAEModel:
    """Load any MAE-family checkpoint (HF ViT-MAE / ViT folder, MAE ``.pth``, timm) as an :class:`MAEModel`."""
    checkpoint = load_checkpoint(path)
    log.info(
        "loaded %s checkpoint: %d layers x %d wide, decoder=%s",
        checkpoint.format,
        checkpoint.config.num_hidden_layers,
        checkpoint.config.hidden_size,
        checkpoint.has_decoder,
    )
    return MAEModel.from_checkpoint(
        checkpoint, device=device, backend=backend, precision=precision, load_heads=load_heads
    )
