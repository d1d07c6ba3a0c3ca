"""``Encoder``: one loaded checkpoint, its heads, and the backend that runs it.

Everything downstream (worker, CLI, training) talks to this class only: ``embed``, ``error_map``, ``predict``,
``heads`` and the identity of the weights (``encoder_hash``, ``name``, ``version``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from engines.mae.errormap import ErrorMapResult, compute_error_map
from engines.heads import LinearHead, head_from_classifier, load_heads_dir
from engines.mae.model import MAEConfig, MaskedAutoencoderViT

if TYPE_CHECKING:  # pragma: no cover
    from engines.backends.base import Backend
    from engines.mae.loaders import LoadedCheckpoint

log = logging.getLogger(__name__)


def encoder_sha256(model_or_state: MaskedAutoencoderViT | dict[str, Tensor]) -> str:
    """sha256 over the encoder tensors: canonical names sorted, each name then its fp32 little-endian bytes.

    Decoder tensors are excluded, so the same encoder weights give the same hash from any format and with or
    without a decoder (heads depend on the encoder only).
    """
    from engines.mae.model import is_encoder_key

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    digest = hashlib.sha256()
    for name in sorted(k for k in state if is_encoder_key(k)):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


class Encoder:
    """A checkpoint ready to run: fp32 reference weights, heads, and a backend (cpu / cuda / tensorrt)."""

    def __init__(
        self,
        model: MaskedAutoencoderViT,
        *,
        name: str,
        version: str | None = None,
        format: str = "in-memory",
        source: Path | None = None,
        backend: Backend | None = None,
        heads: dict[str, LinearHead] | None = None,
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.format = format
        self.source = source
        self.encoder_hash = encoder_sha256(model)
        self.version = version or self.encoder_hash[:12]
        if backend is None:
            from engines.backends.torch_backend import TorchBackend

            backend = TorchBackend(model)
        self.backend = backend
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
    ) -> Encoder:
        from engines.backends import select_backend
        from engines.mae.loaders import build_model

        model = build_model(checkpoint)
        source = checkpoint.source
        name, version = source.stem if source.is_file() else source.name, None
        meta_file = (source if source.is_dir() else source.parent) / "config.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            name = meta.get("msknode_name", name)
            version = meta.get("msknode_version")
        chosen = select_backend(model, backend=backend, device=device, precision=precision, source=source)
        encoder = cls(model, name=name, version=version, format=checkpoint.format, source=source, backend=chosen)
        if checkpoint.classifier is not None:
            encoder.add_head(head_from_classifier(checkpoint.classifier, encoder.encoder_hash, str(source)))
        heads_dir = source / "heads" if source.is_dir() else None
        if load_heads and heads_dir is not None and heads_dir.is_dir():
            for head in load_heads_dir(heads_dir, encoder.encoder_hash).values():
                encoder.add_head(head)
        for note in checkpoint.notes:
            log.info("%s: %s", name, note)
        log.info(
            "encoder %s ready: backend=%s precision=%s heads=%s",
            name, encoder.backend_name, encoder.precision, sorted(encoder.heads),
        )
        return encoder

    # ------------------------------------------------------------------------------------------ identity
    @property
    def config(self) -> MAEConfig:
        return self.model.config

    @property
    def has_decoder(self) -> bool:
        return self.model.has_decoder

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        return self.backend.precision

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

    # ------------------------------------------------------------------------------------------ heads
    def add_head(self, head: LinearHead) -> None:
        """Attach a head; refused if it was trained on other encoder weights or another width."""
        head.check_encoder(self.encoder_hash)
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
        if not self.has_decoder:
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
        )
        result.maps, result.scores = result.maps.cpu().clone(), result.scores.cpu().clone()
        return result

    def error_map(
        self, x: Tensor, noise: Tensor | None = None, seed: int | None = None, passes: int = 10
    ) -> tuple[Tensor, Tensor]:
        """(maps [B, 224, 224], scores [B]); ``noise`` as HF ([passes, L] or [B, passes, L]), else ``seed``."""
        result = self.error_map_result(x, noise=noise, seed=seed, passes=passes)
        return result.maps, result.scores
