"""Every checkpoint format, saved the way its own tools save it, loaded by us and compared with the reference."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

import engines
from engines.mae.network import encoder_sha256
from engines.mae.loaders import CheckpointError, detect_format, hf_filter_fn, to_hf_state_dict
from engines.mae.network import random_masking_ids

TOL = 1e-4


def hf_reference_embedding(hf_vit_mae_model, images):
    """CLS after the final norm from transformers: mask_ratio 0 with increasing noise keeps token order."""
    config = hf_vit_mae_model.config
    saved = config.mask_ratio
    config.mask_ratio = 0.0
    try:
        noise = torch.arange(196, dtype=torch.float32).expand(images.shape[0], -1)
        with torch.no_grad():
            return hf_vit_mae_model.vit(pixel_values=images, noise=noise).last_hidden_state[:, 0]
    finally:
        config.mask_ratio = saved


def test_hf_folder_saved_by_transformers(tmp_path, hf_mae, images):
    hf_mae.save_pretrained(tmp_path / "mae")
    assert detect_format(tmp_path / "mae") == "hf-vitmae"
    encoder = engines.load(tmp_path / "mae")
    assert encoder.format == "hf-vitmae" and encoder.has_decoder
    assert encoder.config.layer_norm_eps == hf_mae.config.layer_norm_eps
    assert (encoder.embed(images) - hf_reference_embedding(hf_mae, images)).abs().max() < TOL
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf_mae(pixel_values=images, noise=noise).logits
    ids_keep, ids_restore, _ = random_masking_ids(noise, encoder.config.mask_ratio)
    ours = encoder.backend.reconstruct(images, ids_keep, ids_restore)
    assert (ours - reference).abs().max() < TOL


def test_transformers4_names_and_our_writer_load_in_transformers(tmp_path, hf_mae, tiny_model, images):
    """Files with transformers-4 names (SKELEX's release) load in both us and transformers, same results."""
    from transformers import ViTMAEForPreTraining

    from engines.mae.loaders import save_hf_vitmae

    save_hf_vitmae(tiny_model, tmp_path / "legacy")
    keys = json.loads((tmp_path / "legacy" / "config.json").read_text())
    assert keys["model_type"] == "vit_mae"
    reference = ViTMAEForPreTraining.from_pretrained(tmp_path / "legacy").eval()
    ours = engines.load(tmp_path / "legacy")
    noise = torch.rand(2, 196, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_logits = reference(pixel_values=images, noise=noise).logits
        _, our_logits, _ = tiny_model(images, noise)
    assert (ref_logits - our_logits).abs().max() < TOL
    assert (ours.embed(images) - hf_reference_embedding(reference, images)).abs().max() < TOL
    assert ours.encoder_hash == encoder_sha256(tiny_model)


def test_mae_pth_full_and_encoder_only(tmp_path, tiny_model, images):
    state = tiny_model.state_dict()
    full = tmp_path / "mae_visualize.pth"
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(model="mae_vit_tiny")}, full)
    encoder_only = tmp_path / "mae_pretrain.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}}, encoder_only)
    # MAE files carry no config: heads and eps come from a sidecar when the width is not one of MAE's.
    for path in (full, encoder_only):
        sidecar = {"num_attention_heads": tiny_model.config.num_attention_heads,
                   "decoder_num_attention_heads": tiny_model.config.decoder_num_attention_heads,
                   "layer_norm_eps": tiny_model.config.layer_norm_eps}
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    assert detect_format(full) == "mae-pth"
    loaded_full, loaded_encoder = engines.load(full), engines.load(encoder_only)
    assert loaded_full.has_decoder and not loaded_encoder.has_decoder
    with torch.no_grad():
        expected = tiny_model.embed(images)
    for encoder in (loaded_full, loaded_encoder):
        assert (encoder.embed(images) - expected).abs().max() < TOL
        assert encoder.encoder_hash == encoder_sha256(tiny_model)
    maps, _ = loaded_full.error_map(images, passes=2)
    assert maps.shape == (2, 224, 224)
    with pytest.raises(RuntimeError, match="no decoder"):
        loaded_encoder.error_map(images)


def test_timm_state_dict_names(tmp_path, tiny_model, images):
    """timm VisionTransformer names == MAE encoder names; timm's classifier head is dropped."""
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    state["head.weight"] = torch.zeros(10, tiny_model.config.hidden_size)
    state["head.bias"] = torch.zeros(10)
    path = tmp_path / "vit_timm.safetensors"
    save_file(state, str(path))
    (tmp_path / "vit_timm.json").write_text(json.dumps({
        "num_attention_heads": tiny_model.config.num_attention_heads,
        "layer_norm_eps": tiny_model.config.layer_norm_eps}))
    assert detect_format(path) == "timm"
    encoder = engines.load(path)
    with torch.no_grad():
        assert (encoder.embed(images) - tiny_model.embed(images)).abs().max() < TOL


def test_timm_avg_pool_model_is_refused(tmp_path, tiny_model):
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder", "mask_token", "norm."))}
    state["fc_norm.weight"] = torch.ones(tiny_model.config.hidden_size)
    state["fc_norm.bias"] = torch.zeros(tiny_model.config.hidden_size)
    torch.save(state, tmp_path / "avg.pth")
    with pytest.raises(CheckpointError, match="average pooling"):
        engines.load(tmp_path / "avg.pth")


@pytest.mark.parametrize(
    "problem_type,activation",
    [("multi_label_classification", "sigmoid"), ("single_label_classification", "softmax")],
)
def test_hf_vit_classification_folder(tmp_path, tiny_config, images, problem_type, activation, randomize):
    from transformers import ViTConfig, ViTForImageClassification

    labels = {0: "malignant", 1: "intermediate", 2: "benign"}
    hf_config = ViTConfig(
        hidden_size=tiny_config.hidden_size, num_hidden_layers=tiny_config.num_hidden_layers,
        num_attention_heads=tiny_config.num_attention_heads, intermediate_size=tiny_config.intermediate_size,
        layer_norm_eps=tiny_config.layer_norm_eps, qkv_bias=tiny_config.qkv_bias,
        id2label=labels, label2id={v: k for k, v in labels.items()}, problem_type=problem_type,
        finetuning_task="tumour",
    )
    reference = randomize(ViTForImageClassification(hf_config), seed=3).eval()
    reference.save_pretrained(tmp_path / "cls")
    assert detect_format(tmp_path / "cls") == "hf-vit-classification"
    encoder = engines.load(tmp_path / "cls")
    assert not encoder.has_decoder
    head = encoder.heads["tumour"]
    assert head.labels == ["malignant", "intermediate", "benign"] and head.activation == activation
    with torch.no_grad():
        ref_logits = reference(pixel_values=images).logits
    emb = encoder.embed(images)
    assert (head(emb) - ref_logits).abs().max() < TOL
    probs = encoder.predict(images)["tumour"]
    expected = torch.sigmoid(ref_logits) if activation == "sigmoid" else torch.softmax(ref_logits, -1)
    assert (probs - expected).abs().max() < TOL


def test_shape_mismatch_is_refused_with_names(tmp_path, hf_mae):
    hf_mae.save_pretrained(tmp_path / "mae")
    config_path = tmp_path / "mae" / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks\.0\.mlp\.fc1\.bias"):
        engines.load(tmp_path / "mae")


def test_unknown_inputs_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        detect_format(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(CheckpointError):
        detect_format(tmp_path / "x.txt")


def test_hash_is_format_independent_and_weight_sensitive(tiny_model):
    hf_names = to_hf_state_dict(tiny_model.state_dict())
    assert encoder_sha256(hf_filter_fn(hf_names)) == encoder_sha256(tiny_model)
    encoder_only = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    assert encoder_sha256(encoder_only) == encoder_sha256(tiny_model)
    changed = dict(encoder_only)
    changed["norm.bias"] = changed["norm.bias"] + 1e-3
    assert encoder_sha256(changed) != encoder_sha256(tiny_model)
