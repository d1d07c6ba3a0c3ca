"""Reference models shared by the parity tests and benchmarks/engine.py (transformers is test-only)."""

from __future__ import annotations

from pathlib import Path

import torch

from engines.mae.family import MAEModel
from engines.mae.loaders import LoadedCheckpoint, build_model, check_shapes, hf_filter_fn
from engines.mae.network import MAEConfig, sincos_pos_embed_2d


def random_vitl_pair(seed: int = 0, name: str = "vit-l"):
    """A ViT-L/16 MAE with SKELEX's sizes and random weights: transformers' model and our MAEModel, same tensors.

    Built on the meta device and filled here, which skips transformers' slow random initialisation.
    """
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = MAEConfig()  # ViT-L/16, decoder 512 x 8, eps 1e-12: SKELEX's sizes
    with torch.device("meta"):
        hf = ViTMAEForPreTraining(ViTMAEConfig(**config.to_hf_dict()))
    hf = hf.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in hf.named_parameters():
            if param.dim() == 1 and "norm" in param_name and param_name.endswith("weight"):
                param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        hf.vit.embeddings.position_embeddings.copy_(sincos_pos_embed_2d(config.hidden_size, config.grid_size))
        hf.decoder.decoder_pos_embed.copy_(sincos_pos_embed_2d(config.decoder_hidden_size, config.grid_size))
    state = hf_filter_fn(hf.state_dict())
    check_shapes(state, config, True, source=Path(name))
    checkpoint = LoadedCheckpoint("hf-vitmae", config, {k: v.clone() for k, v in state.items()}, True, Path(name))
    del state
    return hf, MAEModel(build_model(checkpoint).eval(), name=name)
