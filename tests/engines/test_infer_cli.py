"""``msknode phantoms``, ``heads train``, ``model calibrate`` and ``infer`` end to end on a tiny model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from engines.mae.network import MAEConfig, MaskedAutoencoderViT
from node.cli import app

TINY = MAEConfig(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
    decoder_intermediate_size=64, layer_norm_eps=1e-6,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    result = runner.invoke(app, ["phantoms", str(out), "--count", "12", "--seed", "3", "--p-finding", "0.5", "--monochrome1-every", "4"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def tiny_model_dir(tmp_path):
    from engines.mae.loaders import save_hf_vitmae

    torch.manual_seed(0)
    return save_hf_vitmae(MaskedAutoencoderViT(TINY), tmp_path / "tiny-mae")


def test_phantoms_command_writes_dicom_and_labels(phantom_dir):
    rows = list(csv.DictReader((phantom_dir / "labels.csv").open()))
    assert len(rows) == 12 and all((phantom_dir / r["file"]).is_file() for r in rows)
    assert {r["kind"] for r in rows} == {"hand", "knee", "long_bone"}


def test_phantoms_command_refuses_unknown_kind(tmp_path):
    result = runner.invoke(app, ["phantoms", str(tmp_path), "--kinds", "skull"])
    assert result.exit_code != 0


def test_heads_train_calibrate_then_infer(phantom_dir, tiny_model_dir, tmp_path):
    import engines

    result = runner.invoke(
        app,
        ["heads", "train", "--model", str(tiny_model_dir), "--data", str(phantom_dir), "--labels", str(phantom_dir / "labels.csv"), "--name", "lesion"],
    )
    assert result.exit_code == 0, result.output
    assert "auroc" in result.output and (tiny_model_dir / "heads" / "lesion.safetensors").is_file()
    encoder = engines.load(tiny_model_dir)
    assert encoder.heads["lesion"].labels == ["lesion"] and encoder.heads["lesion"].activation == "sigmoid"

    result = runner.invoke(app, ["model", "calibrate", "--model", str(tiny_model_dir), "--data", str(phantom_dir), "--passes", "2"])
    assert result.exit_code == 0, result.output
    calibration = json.loads((tiny_model_dir / "calibration.json").read_text())
    assert calibration["encoder_sha256"] == encoder.encoder_hash and len(calibration["scores"]) == 12

    files = sorted(phantom_dir.glob("*.dcm"))[:2]
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", *map(str, files), "--out", str(out), "--model", str(tiny_model_dir), "--passes", "2"])
    assert result.exit_code == 0, result.output
    results = sorted(out.glob("*.json"))
    assert len(results) == 2
    for path in results:
        data = json.loads(path.read_text())
        assert data["score"] > 0 and 0.0 <= data["percentile"] <= 100.0
        assert data["model"]["encoder_sha256"] == encoder.encoder_hash
        probs = data["heads"]["lesion"]["probabilities"]
        assert len(probs) == 1 and 0.0 <= probs[0] <= 1.0
        polygon = np.asarray(data["region"]["polygon"])
        rows, cols = data["geometry"]["rows"], data["geometry"]["columns"]
        assert polygon.shape[1] == 2 and (polygon[:, 0] <= cols).all() and (polygon[:, 1] <= rows).all()
        assert (polygon >= 0).all() and np.array_equal(polygon[0], polygon[-1])
        with Image.open(out / data["overlay"]) as png:
            assert png.mode == "RGB" and png.size[1] == rows  # display image at source size (<= 2048)


def test_heads_train_multiclass_with_class_names(phantom_dir, tiny_model_dir):
    result = runner.invoke(
        app,
        [
            "heads", "train", "--model", str(tiny_model_dir), "--data", str(phantom_dir),
            "--labels", str(phantom_dir / "labels.csv"), "--name", "grade", "--column", "narrowing", "--test-fraction", "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tiny_model_dir / "heads" / "grade.json").read_text())
    assert meta["activation"] == "softmax" and meta["labels"][0] == "grade0"
    assert len(meta["labels"]) == 1 + max(int(r["narrowing"]) for r in csv.DictReader((phantom_dir / "labels.csv").open()))


def test_infer_refuses_missing_file_and_bad_model(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["infer", str(tmp_path / "nope.dcm"), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir)])
    assert result.exit_code != 0
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    result = runner.invoke(app, ["infer", str(tmp_path / "junk.dcm"), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nomodel")])
    assert result.exit_code == 2
