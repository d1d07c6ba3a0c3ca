"""The plain-torch ViT-MAE against transformers' ViTMAEForPreTraining on the pieces that define its semantics."""

from __future__ import annotations

import pytest
import torch

from engines.mae.loaders import hf_filter_fn
from engines.mae.network import (
    MAEConfig,
    MaskedAutoencoderViT,
    count_parameters,
    expected_shapes,
    random_masking_ids,
    sincos_pos_embed_2d,
)


def test_sincos_table_matches_hf_layout():
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    table = build_2d_sinusoidal_position_embedding(14, 14, 64, cls_token=True)
    half = table.shape[-1] // 2
    hf_layout = torch.cat([table[..., half:], table[..., :half]], dim=-1)  # HF rotates to MAE's layout
    assert torch.allclose(sincos_pos_embed_2d(64, 14)[0], hf_layout.float(), atol=1e-6)


def test_masking_matches_hf_random_masking(hf_mae):
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(4))
    sequence = torch.randn(3, 196, hf_mae.config.hidden_size)
    hf_kept, hf_mask, hf_restore = hf_mae.vit.embeddings.random_masking(sequence, noise)
    ids_keep, ids_restore, mask = random_masking_ids(noise, hf_mae.config.mask_ratio)
    assert ids_keep.shape == (3, 49)
    assert torch.equal(mask, hf_mask) and torch.equal(ids_restore, hf_restore)
    assert torch.equal(torch.gather(sequence, 1, ids_keep[..., None].expand(-1, -1, sequence.shape[-1])), hf_kept)
    assert mask.sum(dim=1).tolist() == [147.0] * 3


def test_patchify_matches_hf_and_round_trips(tiny_model, hf_mae, images):
    patches = tiny_model.patchify(images)
    assert torch.equal(patches, hf_mae.patchify(images))
    assert torch.equal(tiny_model.unpatchify(patches), images)
    assert torch.equal(tiny_model.unpatchify(patches), hf_mae.unpatchify(patches))


def test_forward_matches_hf_with_same_noise(hf_mae, images):
    ours = MaskedAutoencoderViT(MAEConfig.from_hf_dict(hf_mae.config.to_dict()))
    ours.load_state_dict(hf_filter_fn(hf_mae.state_dict()))
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = hf_mae(pixel_values=images, noise=noise)
        loss, pred, mask = ours.eval()(images, noise)
    assert (pred - reference.logits).abs().max() < 1e-4
    assert torch.equal(mask, reference.mask)
    assert abs(loss.item() - reference.loss.item()) < 1e-5


def test_shared_patch_embedding_equals_repeated_images(tiny_model, images):
    """Gathering from one patch embedding per image is the same as embedding each repeated image."""
    noise = torch.rand(6, 196, generator=torch.Generator().manual_seed(3))
    ids_keep, _, _ = random_masking_ids(noise, 0.75)
    with torch.no_grad():
        shared = tiny_model.forward_encoder_masked(images, ids_keep)
        repeated = tiny_model.forward_encoder_masked(images.repeat_interleave(3, dim=0), ids_keep)
    assert torch.allclose(shared, repeated, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        tiny_model.forward_encoder_masked(images, ids_keep[:5])


def test_training_step_reduces_loss(tiny_config, images):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(tiny_config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss, _, _ = model(images, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.pos_embed.grad is None  # fixed sin-cos table is not trained


def test_config_round_trips_through_transformers(tiny_config):
    from transformers import ViTMAEConfig

    hf = ViTMAEConfig(**tiny_config.to_hf_dict())
    assert MAEConfig.from_hf_dict(hf.to_dict()) == tiny_config
    with pytest.raises(ValueError, match="hidden_act"):
        MAEConfig.from_hf_dict({**tiny_config.to_hf_dict(), "hidden_act": "relu"})


def test_vit_large_parameter_count_matches_skelex_checkpoint():
    """ViT-L/16 + 512 x 8 decoder: 526 tensors in HF layout (390 encoder), 329,541,888 parameters."""
    shapes = expected_shapes(MAEConfig())
    fused_blocks = 24 + 8
    assert len(shapes) + 2 * 2 * fused_blocks == 526  # each fused qkv weight/bias is 3 HF tensors
    assert count_parameters(MAEConfig()) == 329_541_888


def test_encoder_only_model_refuses_decoding(tiny_config, images):
    model = MaskedAutoencoderViT(tiny_config, with_decoder=False).eval()
    assert model.embed(images).shape == (2, tiny_config.hidden_size)
    with pytest.raises(RuntimeError, match="decoder"):
        model.forward_decoder(torch.zeros(1, 50, tiny_config.hidden_size), torch.arange(196)[None])
