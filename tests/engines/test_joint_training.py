"""engines.training.joint: the encoder learns its heads while it keeps its MAE loss (tiny model, a few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.mae.network import MAEConfig, MaskedAutoencoderViT
from engines.training.inputs import normalise_uint8
from engines.training.joint import HeadTask, JointSettings, head_loss, train_jointly

TINY = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                 decoder_intermediate_size=64, layer_norm_eps=1e-6)


def _images(count: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Grey noise; label 1 images carry a bright 48-px square somewhere (a finding a head can learn quickly)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(count, 224, 224)).astype(np.uint8)
    labels = np.arange(count) % 2
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, 176, size=2)
        images[i, r:r + 48, c:c + 48] = 230
    return torch.from_numpy(images), labels


def test_heads_learn_and_the_mae_keeps_reconstructing() -> None:
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(TINY)
    images, labels = _images(64, 0)
    normals, _ = _images(32, 1)
    grade = np.where(np.arange(64) % 4 == 0, -1, labels * 2)  # a 3-class head that skips every fourth image
    tasks = [HeadTask("square", ["square"], labels), HeadTask("grade", ["g0", "g1", "g2"], grade)]
    settings = JointSettings(steps=60, batch_size=16, mae_batch_size=8, lr=1e-3, head_lr=1e-2, warmup_steps=5,
                             threads=1)
    before = model.state_dict()["blocks.0.attn.qkv.weight"].clone()
    result = train_jointly(model, normals, images, tasks, settings)

    assert set(result.heads) == {"square", "grade"}
    assert result.heads["square"].out_features == 1 and result.heads["grade"].out_features == 3
    assert len(result.losses) == 60 and all(np.isfinite(result.mae_losses))
    assert not torch.equal(before, model.state_dict()["blocks.0.attn.qkv.weight"])  # the encoder was fine-tuned
    assert not model.training  # returned ready for inference
    test_images, test_labels = _images(40, 2)
    with torch.no_grad():
        embedding = model.embed(normalise_uint8(test_images))
        square = torch.sigmoid(result.heads["square"](embedding)[:, 0]).numpy()
    assert np.mean((square > 0.5) == (test_labels == 1)) >= 0.9


def test_head_loss_leaves_out_images_the_head_does_not_apply_to() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    weights = torch.ones(2)
    with_skipped = head_loss(logits, torch.tensor([0, 1, -1]), weights)
    without = head_loss(logits[:2], torch.tensor([0, 1]), weights)
    assert torch.isclose(with_skipped, without)
    assert head_loss(logits, torch.tensor([-1, -1, -1]), weights) == 0


def test_bad_inputs_are_refused() -> None:
    model = MaskedAutoencoderViT(TINY)
    images, labels = _images(8, 0)
    with pytest.raises(ValueError, match="labelled must be uint8"):
        train_jointly(model, images, images.float(), [HeadTask("s", ["s"], labels)], JointSettings(steps=1))
    with pytest.raises(ValueError, match="3 targets for 8 images"):
        train_jointly(model, images, images, [HeadTask("s", ["s"], labels[:3])], JointSettings(steps=1))
