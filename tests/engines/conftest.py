"""Shared fixtures for engine tests: tiny random ViT-MAE configs in our and in Hugging Face's classes."""

from __future__ import annotations

import pytest
import torch

from engines.mae.network import MAEConfig, MaskedAutoencoderViT

TINY_CONFIGS = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, layer_norm_eps=1e-12, qkv_bias=True,
    ),
    "tiny-eps6-nobias": dict(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
        decoder_hidden_size=24, decoder_num_hidden_layers=2, decoder_num_attention_heads=3,
        decoder_intermediate_size=40, layer_norm_eps=1e-6, qkv_bias=False,
    ),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor (norms, biases, tokens included) random values so no parity check passes by zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed" in name or "position_embeddings" in name:
                continue  # fixed sin-cos tables stay as built
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("weight") and param.dim() == 1:  # LayerNorm gains near 1
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request) -> MAEConfig:
    return MAEConfig(**TINY_CONFIGS[request.param])


@pytest.fixture
def tiny_model(tiny_config) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return randomize_(MaskedAutoencoderViT(tiny_config)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Two normalised 224 x 224 inputs with structure (not pure noise)."""
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(2, 1, 28, 28, generator=generator)
    x = torch.nn.functional.interpolate(base, size=(224, 224), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def make_hf_mae(config: MAEConfig, seed: int = 0):
    """A randomised transformers ViTMAEForPreTraining (the reference) with real sin-cos position tables.

    transformers 5 leaves the fixed tables at zero when a model is built directly (they come from the
    checkpoint), so we copy MAE's tables in: that is what every released checkpoint holds.
    """
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from engines.mae.network import sincos_pos_embed_2d

    hf = ViTMAEForPreTraining(ViTMAEConfig(**config.to_hf_dict()))
    randomize_(hf, seed)
    with torch.no_grad():
        hf.vit.embeddings.position_embeddings.copy_(sincos_pos_embed_2d(config.hidden_size, config.grid_size))
        hf.decoder.decoder_pos_embed.copy_(sincos_pos_embed_2d(config.decoder_hidden_size, config.grid_size))
    return hf.eval()


@pytest.fixture
def hf_mae(tiny_config):
    return make_hf_mae(tiny_config)


@pytest.fixture
def randomize():
    """The :func:`randomize_` helper, for tests that build their own reference models."""
    return randomize_
