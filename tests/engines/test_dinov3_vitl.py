"""DINOv3 parity at OrthoFoundation's exact shapes: ViT-L/16, 4 register tokens, RoPE base 100, masked key bias.

transformers' DINOv3ViTModel with random values (built on the meta device and filled, so no slow init) against our
network on the same tensors, RoPE on and off, CLS and patch tokens, max abs difference <= 1e-4 in fp32. One test,
two images (~1 min on two cores): the ViT-L shapes are checked once, the tiny configs cover the rest.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tests.engines.dinov3_reference import VITL16, hf_features, hf_rope_disabled, make_hf_dinov3, ours_from_hf

TOL = 1e-4


def test_vitl16_cls_and_patch_tokens_match_transformers_with_rope_on_and_off():
    assert (VITL16.hidden_size, VITL16.num_hidden_layers, VITL16.num_attention_heads) == (1024, 24, 16)
    assert VITL16.num_register_tokens == 4 and VITL16.rope_theta == 100 and not VITL16.key_bias
    hf = make_hf_dinov3(VITL16, seed=0)
    ours = ours_from_hf(hf, VITL16, name="vit-l")
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 14, 14, generator=generator), size=(224, 224),
                                        mode="bilinear") * 4 - 2
    cls_ref, patches_ref = hf_features(hf, x, 4)
    with torch.inference_mode():
        cls, patches = ours.network.forward_features(x)
    assert patches.shape == (2, 196, 1024)
    diffs = {"rope-on cls": float((cls - cls_ref).abs().max()), "rope-on patches": float((patches - patches_ref).abs().max())}
    ours.network.config = replace(VITL16, use_rope=False)  # the same weights, OrthoFoundation's forward
    with hf_rope_disabled():
        cls_ref_off, patches_ref_off = hf_features(hf, x, 4)
    with torch.inference_mode():
        cls_off, patches_off = ours.network.forward_features(x)
    diffs["rope-off cls"] = float((cls_off - cls_ref_off).abs().max())
    diffs["rope-off patches"] = float((patches_off - patches_ref_off).abs().max())
    print("PARITY ViT-L/16", {k: f"{v:.3g}" for k, v in diffs.items()})
    assert all(v <= TOL for v in diffs.values()), diffs
    assert float((cls_off - cls).abs().max()) > 1e-3  # RoPE matters at these shapes too
