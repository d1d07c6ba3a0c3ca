"""torch backends: CPU (fp32 default, bf16 on request) and CUDA (fp16/bf16, optional torch.compile).

The backend keeps its own copy of the model in the run precision, so the loaded model's fp32 weights (and
their hash) never change. Outputs are returned as fp32 so error-map arithmetic is the same on every backend.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import Tensor, nn
from torch.ao.quantization import quantize_dynamic

from engines.backends.base import TorchGraphs

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


class TorchBackend:
    """Eager torch on one device under ``inference_mode``.

    Precisions: ``fp32`` (CPU default), ``bf16``, ``fp16`` (CUDA only), ``int8`` (CPU only, dynamic quantisation of
    the linear layers; opt-in, see docs/engine.md).
    """

    def __init__(
        self,
        model: TorchGraphs,
        device: str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        max_batch: int = 40,
    ) -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        torch_device = torch.device(device)
        if torch_device.type == "cpu" and precision == "fp16":
            raise ValueError("fp16 on CPU is not supported; use fp32, bf16 or int8")
        if torch_device.type != "cpu" and precision == "int8":
            raise ValueError("int8 (dynamic quantisation) is a CPU precision; use fp16 or bf16 on CUDA")
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA backend asked for, but torch sees no CUDA device")
        self.name = "cuda" if torch_device.type == "cuda" else "cpu"
        self.device = str(torch_device)
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.max_batch = max_batch  # rows per forward; bounds activation memory for big batches of passes
        shares_weights = precision == "fp32" and torch_device == next(model.parameters()).device
        run_model = model if shares_weights else copy.deepcopy(model)
        self.model = run_model.to(device=torch_device, dtype=self.dtype).eval()
        if precision == "int8":
            self.model = quantize_linear_int8(self.model)
        self._embed = self.model.embed
        # a family without masked graphs (DINOv3: no decoder) offers only embed / features
        self._encode_masked = getattr(self.model, "forward_encoder_masked", None)
        self._decode = self.model.forward_decoder if self.model.has_decoder else None
        if compile:  # CUDA only in practice; guarded so a failing compile falls back to eager
            try:
                self._embed = torch.compile(self.model.embed, dynamic=True)
                self._encode_masked = torch.compile(self.model.forward_encoder_masked, dynamic=True)
                if self._decode is not None:
                    self._decode = torch.compile(self.model.forward_decoder, dynamic=True)
            except Exception as exc:  # pragma: no cover - depends on the toolchain present
                log.warning("torch.compile unavailable (%s); running eager", exc)

    def embed(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            x = x.to(self.device, self.dtype)
            return torch.cat([self._embed(chunk) for chunk in x.split(self.max_batch)]).float()

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """The module's named features (``model.features``, e.g. DINOv3's ``cls`` and ``patch_mean``), fp32."""
        features = getattr(self.model, "features", None)
        if features is None:
            raise RuntimeError("this model offers no named features beyond embed()")
        with torch.inference_mode():
            x = x.to(self.device, self.dtype)
            chunks = [features(chunk) for chunk in x.split(self.max_batch)]
            return {name: torch.cat([c[name] for c in chunks]).float() for name in chunks[0]}

    def reconstruct(self, x: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        if self._decode is None:
            raise RuntimeError("this checkpoint has no decoder: it can give embeddings but not error maps")
        with torch.inference_mode():
            x = x.to(self.device, self.dtype)
            ids_keep, ids_restore = ids_keep.to(self.device), ids_restore.to(self.device)
            rows_per_image = ids_keep.shape[0] // x.shape[0]
            images_per_chunk = max(1, self.max_batch // rows_per_image)
            out = []
            for start in range(0, x.shape[0], images_per_chunk):
                stop = min(start + images_per_chunk, x.shape[0])
                rows = slice(start * rows_per_image, stop * rows_per_image)
                latent = self._encode_masked(x[start:stop], ids_keep[rows])
                out.append(self._decode(latent, ids_restore[rows]).float())
            return torch.cat(out)

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "precision": self.precision, "device": self.device}


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (fbgemm: int8 weights, per-batch activation scales).

    About 2x the fp32 GEMM throughput on an AVX2 CPU; outputs stay fp32. Opt-in only: maps must be checked
    against fp32 (Pearson) before a site uses it, and heads were trained on fp32 embeddings.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao eager quantisation announces its move to torchao
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matmul (AVX-512 BF16 or AMX); without it bf16 is emulated and slow."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
