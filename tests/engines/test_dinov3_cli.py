"""``msknode heads train`` (``--pooling cls | patch_mean``) and ``model calibrate`` on a DINOv3 model (issue #16):
without an error map, calibrating means the heads' probabilities (``--labels``: temperature / Platt scaling)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from node.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    result = runner.invoke(app, ["phantoms", str(out), "--count", "10", "--seed", "5", "--p-finding", "0.5"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def dino_dir(tmp_path):
    from engines.dinov3.loaders import save_hf_dinov3
    from engines.dinov3.network import DINOv3Config, DINOv3ViT

    network = DINOv3ViT(DINOv3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_register_tokens=2)).init_weights(3)
    network.init_buffers("cpu")
    return save_hf_dinov3(network, tmp_path / "tiny-dino")


@pytest.mark.parametrize("pooling", ["cls", "patch_mean"])
def test_heads_train_on_a_dinov3_model_with_either_pooling(phantom_dir, dino_dir, pooling):
    import engines

    result = runner.invoke(app, ["heads", "train", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(phantom_dir / "labels.csv"), "--name", "kl_grade",
                                 "--column", "narrowing", "--pooling", pooling])
    assert result.exit_code == 0, result.output
    meta = json.loads((dino_dir / "heads" / "kl_grade.json").read_text())
    assert meta.get("pooling", "cls") == pooling and meta["activation"] == "softmax"
    model = engines.load(dino_dir)
    assert model.family == "dinov3" and model.heads["kl_grade"].pooling == pooling
    x = torch.zeros(2, 3, 224, 224)
    probabilities = model.predict(x)["kl_grade"]
    assert probabilities.shape == (2, len(meta["labels"])) and torch.allclose(probabilities.sum(-1), torch.ones(2))


def test_patch_mean_is_refused_where_the_family_does_not_offer_it_and_calibrate_needs_an_error_map(
        phantom_dir, dino_dir, tmp_path):
    from tests.helpers.models import tiny_model

    mae = tiny_model(tmp_path / "mae", width=32, layers=1)
    result = runner.invoke(app, ["heads", "train", "--model", str(mae), "--data", str(phantom_dir),
                                 "--labels", str(phantom_dir / "labels.csv"), "--name", "lesion",
                                 "--pooling", "patch_mean"])
    assert result.exit_code == 2 and "offers cls" in result.output
    result = runner.invoke(app, ["model", "calibrate", "--model", str(dino_dir), "--data", str(phantom_dir)])
    assert result.exit_code == 2 and "no error map" in result.output and "--labels" in result.output
    assert not (dino_dir / "calibration.json").exists()


def test_calibrate_a_dinov3_heads_probabilities_on_labelled_studies(phantom_dir, dino_dir):
    """An over-confident head (its trained weights x 25) gets a temperature above 1; probabilities at inference are
    softmax(logits / T); the fit lowers the log loss on the data it saw; the class ranking is unchanged."""
    import engines
    from safetensors.torch import load_file, save_file

    labels = phantom_dir / "labels.csv"
    result = runner.invoke(app, ["model", "calibrate", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(labels)])
    assert result.exit_code == 2 and "--head NAME" in result.output  # no head yet
    result = runner.invoke(app, ["heads", "train", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(labels), "--name", "kl_grade", "--column", "narrowing"])
    assert result.exit_code == 0, result.output
    weights = dino_dir / "heads" / "kl_grade.safetensors"
    tensors = load_file(str(weights))
    save_file({name: 25 * value for name, value in tensors.items()}, str(weights))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before = engines.load(dino_dir).predict(x)["kl_grade"]

    result = runner.invoke(app, ["model", "calibrate", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(labels), "--column", "narrowing", "--test-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert "temperature" in result.output and "ECE" in result.output
    calibration = json.loads((dino_dir / "heads" / "kl_grade.json").read_text())["calibration"]
    assert calibration["method"] == "temperature" and calibration["temperature"] > 1
    assert calibration["fit"]["log_loss_after"] < calibration["fit"]["log_loss_before"]
    assert calibration["fitted_on"] == 10 and calibration["held_out"] == 0
    model = engines.load(dino_dir)
    after = model.predict(x)["kl_grade"]
    with torch.no_grad():
        expected = torch.softmax(model.heads["kl_grade"](model.embed(x)) / calibration["temperature"], -1)
    assert torch.allclose(after, expected, atol=1e-6)
    assert torch.equal(after.argmax(-1), before.argmax(-1)) and after.max() < before.max()

    result = runner.invoke(app, ["model", "calibrate", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(labels), "--column", "narrowing"])  # default: 30 % held out
    assert result.exit_code == 0 and "held out (" in result.output, result.output
    refitted = json.loads((dino_dir / "heads" / "kl_grade.json").read_text())["calibration"]
    assert refitted["held_out"] > 0 and refitted["held_out_metrics"]["log_loss_before"] > 0
    assert refitted["fitted_on"] + refitted["held_out"] == 10
    result = runner.invoke(app, ["model", "calibrate", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(labels), "--head", "meniscus"])
    assert result.exit_code == 2 and "no head 'meniscus'" in result.output
    result = runner.invoke(app, ["model", "calibrate", "--model", str(dino_dir), "--data", str(phantom_dir),
                                 "--labels", str(labels), "--head", "kl_grade", "--column", "kind"])
    assert result.exit_code == 2 and "integer labels" in result.output
