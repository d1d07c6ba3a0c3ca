"""Format 3e heads: save/load, refusal of a foreign encoder, and all heads on one embedding pass."""

from __future__ import annotations

import json

import pytest
import torch

import engines
from engines.mae.family import MAEModel
from engines.heads import HeadEncoderMismatch, LinearHead, load_head, load_heads_dir, save_head
from engines.mae.loaders import save_hf_vitmae


def make_head(name, dim, labels, activation, encoder_hash, seed=0):
    head = LinearHead(name, dim, labels, activation, encoder_sha256=encoder_hash, provenance={"data": "phantoms v1"})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(head.linear.weight.shape, generator=generator))
        head.linear.bias.copy_(torch.randn(head.linear.bias.shape, generator=generator))
    return head


def test_save_load_round_trip(tmp_path, tiny_model):
    encoder = MAEModel(tiny_model, name="t")
    labels = [f"KL{i}" for i in range(5)]
    head = make_head("kl_grade", tiny_model.config.hidden_size, labels, "softmax", encoder.encoder_hash)
    weights, meta = save_head(head, tmp_path)
    assert weights.name == "kl_grade.safetensors" and meta.name == "kl_grade.json"
    data = json.loads(meta.read_text())
    assert data["encoder_sha256"] == encoder.encoder_hash and data["provenance"] == {"data": "phantoms v1"}
    loaded = load_head(meta, encoder.encoder_hash)
    emb = torch.randn(3, tiny_model.config.hidden_size)
    assert torch.allclose(loaded.predict(emb), head.predict(emb))
    assert torch.allclose(loaded.predict(emb).sum(-1), torch.ones(3))
    assert loaded.labels == head.labels and loaded.activation == "softmax"


def test_head_refuses_another_encoder(tmp_path, tiny_model):
    head = make_head("fracture", tiny_model.config.hidden_size, ["fracture"], "sigmoid", "0" * 64)
    save_head(head, tmp_path)
    with pytest.raises(HeadEncoderMismatch, match="fracture"):
        load_head(tmp_path / "fracture.json", MAEModel(tiny_model, name="t").encoder_hash)
    with pytest.raises(HeadEncoderMismatch):
        MAEModel(tiny_model, name="t").add_head(head)


def test_invalid_heads_are_refused(tiny_model):
    with pytest.raises(ValueError, match="activation"):
        LinearHead("x", 8, ["a"], "relu")
    with pytest.raises(ValueError, match="file name"):
        LinearHead("../escape", 8, ["a"], "sigmoid")
    with pytest.raises(ValueError, match="encoder_sha256"):
        save_head(LinearHead("x", 8, ["a"], "sigmoid"), "/tmp")


def test_model_folder_heads_run_on_one_embedding(tmp_path, tiny_model, images, monkeypatch):
    folder = save_hf_vitmae(tiny_model, tmp_path / "demo")
    encoder_hash = MAEModel(tiny_model, name="t").encoder_hash
    dim = tiny_model.config.hidden_size
    specs = [("fracture", ["fracture"], "sigmoid"), ("tumour", ["malignant", "benign", "none"], "softmax"),
             ("kl_grade", [f"KL{i}" for i in range(5)], "softmax"), ("abnormal", ["abnormal"], "sigmoid")]
    for seed, (name, labels, activation) in enumerate(specs):
        save_head(make_head(name, dim, labels, activation, encoder_hash, seed), folder / "heads")
    encoder = engines.load(folder)
    assert sorted(encoder.heads) == sorted(s[0] for s in specs)
    calls = []
    original = encoder.backend.embed
    monkeypatch.setattr(encoder.backend, "embed", lambda x: calls.append(1) or original(x))
    predictions = encoder.predict(images)
    assert len(calls) == 1  # one shared embedding pass for all heads
    emb = original(images).clone()
    for name, labels, _ in specs:
        assert predictions[name].shape == (2, len(labels))
        with torch.no_grad():
            assert torch.allclose(predictions[name], encoder.heads[name].predict(emb), atol=1e-6)
    assert len(load_heads_dir(folder / "heads", encoder_hash)) == 4
