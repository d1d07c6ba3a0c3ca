"""Parity at the exact ViT-L/16 shapes of the SKELEX checkpoint (random weights; built once per module).

The tiny-config tests exercise the files on disk; here the same HF -> canonical filter maps a full-size
transformers model in memory (writing 1.3 GB per run would cost more than it proves).
"""

from __future__ import annotations

import pytest
import torch

from engines.mae.errormap import noise_from_seed
from tests.engines.reference_models import random_vitl_pair

TOL = 1e-4


@pytest.fixture(scope="module")
def vitl_pair():
    return random_vitl_pair(seed=0, name="vit-l")


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
    from engines.mae.network import random_masking_ids

    ids_keep, ids_restore, mask = random_masking_ids(noise, 0.75)
    ours = encoder.backend.reconstruct(image, ids_keep, ids_restore)
    assert torch.equal(mask, reference.mask)
    assert (ours - reference.logits).abs().max() < TOL
    assert encoder.network.num_parameters() == 329_541_888
