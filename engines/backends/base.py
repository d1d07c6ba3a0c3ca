"""What a backend offers a model family (:class:`Backend`), and what the torch backends need from a module.

Tensors in, tensors out: a backend never imports a family's model code.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


class BackendUnavailable(RuntimeError):
    """A remote backend's server cannot be reached, is not ready or timed out: transient, never the input's fault.

    The worker waits and runs the same batch again (the error map's masks are seeded, so the results are the same);
    it never counts this against a job's attempts.
    """


class TorchGraphs(Protocol):
    """A ``torch.nn.Module`` offering the three graphs the torch backends run (``MaskedAutoencoderViT`` does).

    ``has_decoder`` False: only ``embed`` exists (no reconstructions, so no error map); such a module may leave
    ``forward_encoder_masked`` out and offer ``features(x) -> {name: [B, D]}`` instead (DINOv3), which
    ``TorchBackend.features`` / ``TensorRTBackend.features`` run.
    """

    has_decoder: bool

    def embed(self, x: Tensor) -> Tensor: ...

    def forward_encoder_masked(self, x: Tensor, ids_keep: Tensor) -> Tensor: ...

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor: ...


@runtime_checkable
class Backend(Protocol):
    """Runs the model's three graphs; inputs and outputs are fp32 tensors on the backend's device.

    ``name`` is ``cpu``, ``cuda`` or ``tensorrt``; ``precision`` is ``fp32``, ``bf16`` or ``fp16``.
    """

    name: str
    precision: str
    device: str

    def embed(self, x: Tensor) -> Tensor:
        """CLS after the final norm from the full 197-token pass: [B, D]."""
        ...

    def reconstruct(self, x: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        """Masked encoder then decoder: [N, L, p*p*C]; ``x`` [B, ...] serves N = B * passes rows image-major."""
        ...

    def describe(self) -> dict[str, str]:
        """What /healthz shows: backend, precision, device and anything that identifies the build."""
        ...
