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


# ------------------------------------------------------------------------------------------- probability calibration
def sampled_labels(true_logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Labels drawn from softmax(true_logits): data on which softmax(true_logits) is calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator)[:, 0]


def test_temperature_scaling_recovers_an_overconfident_head_and_keeps_its_ranking():
    from engines.calibration import (
        class_probabilities,
        expected_calibration_error,
        fit_logit_calibration,
        log_loss,
    )

    generator = torch.Generator().manual_seed(1)
    true_logits = 1.5 * torch.randn(4000, 4, generator=generator)
    y = sampled_labels(true_logits)
    overconfident = 3.0 * true_logits  # what a head fitted elsewhere might give: right ranking, too sure
    fitted = fit_logit_calibration(overconfident, y, "softmax")
    assert fitted.method == "temperature" and fitted.offset == 0
    assert abs(fitted.temperature - 3.0) < 0.3
    before, after = class_probabilities(overconfident, "softmax"), class_probabilities(overconfident, "softmax", fitted)
    assert expected_calibration_error(after, y) < 0.5 * expected_calibration_error(before, y)
    assert log_loss(after, y) < log_loss(before, y)
    assert torch.equal(before.argmax(1), after.argmax(1))  # temperature never changes the predicted class


def test_platt_scaling_recovers_scale_and_offset_of_a_sigmoid_head():
    from engines.calibration import class_probabilities, expected_calibration_error, fit_logit_calibration

    generator = torch.Generator().manual_seed(2)
    z = 2.0 * torch.randn(5000, 1, generator=generator)
    true = 0.5 * z - 1.0
    y = (torch.rand(5000, generator=generator) < torch.sigmoid(true[:, 0])).long()
    fitted = fit_logit_calibration(z, y, "sigmoid")
    assert fitted.method == "platt" and abs(fitted.scale - 0.5) < 0.1 and abs(fitted.offset + 1.0) < 0.15
    assert expected_calibration_error(class_probabilities(z, "sigmoid", fitted), y) < 0.03


def test_calibration_of_well_calibrated_logits_stays_close_to_identity_and_bad_input_is_refused():
    from engines.calibration import fit_logit_calibration

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, 3, generator=generator)
    fitted = fit_logit_calibration(logits, sampled_labels(logits, seed=4), "softmax")
    assert abs(fitted.scale - 1.0) < 0.15
    with pytest.raises(ValueError, match="class indices"):
        fit_logit_calibration(logits[:4], torch.tensor([0, 1, 2, 3]), "softmax")
    with pytest.raises(ValueError, match="softmax and single-label sigmoid"):
        fit_logit_calibration(logits[:3], torch.tensor([0, 1, 2]), "identity")
    with pytest.raises(ValueError, match="one sigmoid label"):
        fit_logit_calibration(logits[:3], torch.tensor([0, 1, 1]), "sigmoid")


def test_head_calibration_is_stored_applied_and_checked(tmp_path, tiny_model):
    encoder = MAEModel(tiny_model, name="t")
    dim = tiny_model.config.hidden_size
    head = make_head("kl_grade", dim, [f"KL{i}" for i in range(3)], "softmax", encoder.encoder_hash)
    _, meta_path = save_head(head, tmp_path)
    original_bytes = meta_path.read_bytes()
    assert "calibration" not in json.loads(original_bytes)
    emb = torch.randn(5, dim)
    raw = head.predict(emb)
    head.set_calibration({"method": "temperature", "scale": 0.25, "offset": 0.0, "fitted_on": 40})
    with torch.no_grad():
        expected = torch.softmax(head(emb) * 0.25, -1)
    assert torch.allclose(head.predict(emb), expected) and not torch.allclose(head.predict(emb), raw)
    save_head(head, tmp_path)
    stored = json.loads(meta_path.read_text())["calibration"]
    assert stored["method"] == "temperature" and stored["fitted_on"] == 40
    loaded = load_head(meta_path, encoder.encoder_hash)
    assert torch.allclose(loaded.predict(emb), expected)
    loaded.set_calibration(None)  # removed: the file reads and writes as before
    save_head(loaded, tmp_path)
    assert meta_path.read_bytes() == original_bytes
    with pytest.raises(ValueError, match="calibrated by temperature"):
        head.set_calibration({"method": "platt", "scale": 1.0, "offset": 0.5})
    with pytest.raises(ValueError, match="invalid calibration"):
        head.set_calibration({"method": "temperature", "scale": -1.0})
    sigmoid = make_head("fracture", dim, ["fracture"], "sigmoid", encoder.encoder_hash)
    sigmoid.set_calibration({"method": "platt", "scale": 0.5, "offset": -1.0})
    with torch.no_grad():
        assert torch.allclose(sigmoid.predict(emb), torch.sigmoid(sigmoid(emb) * 0.5 - 1.0))
    with pytest.raises(ValueError, match="only softmax and single-label sigmoid"):
        make_head("v", dim, ["a", "b"], "identity", encoder.encoder_hash).set_calibration(
            {"method": "temperature", "scale": 1.0})
