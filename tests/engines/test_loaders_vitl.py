"""Parity at the exact ViT-L/16 shapes of the SKELEX checkpoint (random weights; built once per module).

The tiny-config tests exercise the files on disk; here the same HF -> canonical filter maps a full-size
transformers model in memory (writing 1.3 GB per run would cost more than it proves).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engines.encoder import Encoder
from engines.errormap import noise_from_seed
from engines.loaders import LoadedCheckpoint, build_model, check_shapes, hf_filter_fn
from engines.vit_mae import MAEConfig

TOL = 1e-4


@pytest.fixture(scope="module")
def vitl_pair():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from engines.vit_mae import sincos_pos_embed_2d

    config = MAEConfig()  # ViT-L/16, decoder 512 x 8, eps 1e-12: SKELEX's sizes
    with torch.device("meta"):  # skip transformers' slow random init; we fill every tensor below
        hf = ViTMAEForPreTraining(ViTMAEConfig(**config.to_hf_dict()))
    hf = hf.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.dim() == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        hf.vit.embeddings.position_embeddings.copy_(sincos_pos_embed_2d(config.hidden_size, config.grid_size))
        hf.decoder.decoder_pos_embed.copy_(sincos_pos_embed_2d(config.decoder_hidden_size, config.grid_size))
    state = hf_filter_fn(hf.state_dict())
    check_shapes(state, config, True, source="vit-l")  # type: ignore[arg-type]
    checkpoint = LoadedCheckpoint("hf-vitmae", config, {k: v.clone() for k, v in state.items()}, True, Path("vit-l"))
    del state
    ours = build_model(checkpoint)
    return hf, Encoder(ours.eval(), name="vit-l")


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 224, 224, generator=generator)


def test_vitl_embedding_parity(vitl_pair, image):
    hf, encoder = vitl_pair
    hf.config.mask_ratio = 0.0
    try:
        with torch.no_grad():
            reference = hf.vit(pixel_values=image, noise=torch.arange(196.0)[None]).last_hidden_state[:, 0]
    finally:
        hf.config.mask_ratio = 0.75
    assert encoder.config.hidden_size == 1024
    assert (encoder.embed(image) - reference).abs().max() < TOL


def test_vitl_reconstruction_and_error_map_parity(vitl_pair, image):
    hf, encoder = vitl_pair
    noise = noise_from_seed(0, 2, 196)
    with torch.no_grad():
        reference = hf(pixel_values=image.expand(2, -1, -1, -1), noise=noise)
    from engines.vit_mae import random_masking_ids

    ids_keep, ids_restore, mask = random_masking_ids(noise, 0.75)
    ours = encoder.backend.reconstruct(image, ids_keep, ids_restore)
    assert torch.equal(mask, reference.mask)
    assert (ours - reference.logits).abs().max() < TOL
    assert encoder.model.num_parameters() == 329_541_888
