"""``msknode heads train`` (``--pooling cls | patch_mean``) and ``model calibrate`` on a DINOv3 model (issue #16)."""

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
    assert result.exit_code == 2 and "no error map" in result.output
    assert not (dino_dir / "calibration.json").exists()
