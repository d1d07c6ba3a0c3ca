"""DINOv3 reference models shared by the parity tests and benchmarks/dinov3.py (transformers is test-only).

- :func:`make_hf_dinov3`: a transformers ``DINOv3ViTModel`` with random values in every tensor (norms near 1), built
  on the meta device and filled here, which skips transformers' slow random initialisation (ViT-L: seconds, not
  tens of seconds);
- :func:`ours_from_hf`: our :class:`~engines.dinov3.family.DINOv3Model` on the same tensors (through the HF filter);
- :func:`hf_rope_disabled`: the reference with its rotary embedding made the identity (cos 1, sin 0), which is what
  running the blocks without RoPE means (OrthoFoundation's forward); used to check our RoPE-off mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from engines.dinov3.family import DINOv3Model
from engines.dinov3.loaders import LoadedDINOv3, build_model, check_shapes, hf_filter_fn
from engines.dinov3.network import DINOv3Config

#: OrthoFoundation's backbone: DINOv3 ViT-L/16, 4 register tokens, RoPE base 100, LayerScale, masked k bias.
VITL16 = DINOv3Config()


def make_hf_dinov3(config: DINOv3Config, seed: int = 0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    with torch.device("meta"):
        hf = DINOv3ViTModel(DINOv3ViTConfig(**config.to_hf_dict()))
    hf = hf.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "lambda1" in name:
                param.copy_(0.5 + 0.1 * noise)  # LayerScale large enough that every block matters
            else:
                param.copy_(0.05 * noise)
        rope = hf.rope_embeddings
        rope.inv_freq.copy_(1 / rope.base ** torch.arange(0, 1, 4 / rope.head_dim, dtype=torch.float32))
    return hf


def ours_from_hf(hf, config: DINOv3Config, use_rope: bool | None = None, name: str = "ours") -> DINOv3Model:
    if use_rope is not None:
        config = replace(config, use_rope=use_rope)
    state = hf_filter_fn({k: v.detach().clone() for k, v in hf.state_dict().items()}, config)
    check_shapes(state, config, Path(name))
    checkpoint = LoadedDINOv3("hf-dinov3", config, state, Path(name), "test")
    return DINOv3Model(build_model(checkpoint), name=name)


@contextlib.contextmanager
def hf_rope_disabled() -> Iterator[None]:
    """transformers' DINOv3 rotary embedding returns cos = 1, sin = 0 inside the block: the blocks run without RoPE."""
    from transformers.models.dinov3_vit import modeling_dinov3_vit as module

    original = module.DINOv3ViTRopePositionEmbedding.forward

    def identity(self, pixel_values):
        cos, sin = original(self, pixel_values)
        return torch.ones_like(cos), torch.zeros_like(sin)

    module.DINOv3ViTRopePositionEmbedding.forward = identity
    try:
        yield
    finally:
        module.DINOv3ViTRopePositionEmbedding.forward = original


def hf_features(hf, x: torch.Tensor, registers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooler_output = normed CLS, normed patch tokens) of the reference."""
    with torch.inference_mode():
        out = hf(pixel_values=x)
    return out.pooler_output, out.last_hidden_state[:, 1 + registers :]
