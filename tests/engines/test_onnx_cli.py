"""``msknode model info | export-onnx | build-engine`` on a tiny checkpoint."""

from __future__ import annotations

import json

import onnx
from typer.testing import CliRunner

from engines.mae.family import MAEModel
from engines.heads import LinearHead, save_head
from engines.mae.loaders import save_hf_vitmae
from node.cli import app

runner = CliRunner()


def test_model_info_reports_format_sizes_hash_and_heads(tmp_path, tiny_model):
    folder = save_hf_vitmae(tiny_model, tmp_path / "m")
    encoder_hash = MAEModel(tiny_model, name="t").encoder_hash
    head = LinearHead("fracture", tiny_model.config.hidden_size, ["fracture"], "sigmoid", encoder_hash)
    save_head(head, folder / "heads")
    result = runner.invoke(app, ["model", "info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"] == "hf-vitmae" and info["encoder_sha256"] == encoder_hash
    assert info["hidden_size"] == tiny_model.config.hidden_size and info["has_decoder"] is True
    assert info["parameters"] == tiny_model.num_parameters()
    assert info["model_heads"] == {"fracture": {"labels": ["fracture"], "activation": "sigmoid"}}
    table = runner.invoke(app, ["model", "info", str(folder)])
    assert table.exit_code == 0 and encoder_hash[:16] in table.output.replace("\n", "")


def test_model_info_shows_whether_a_head_is_calibrated(tmp_path, tiny_model):
    folder = save_hf_vitmae(tiny_model, tmp_path / "m")
    encoder_hash = MAEModel(tiny_model, name="t").encoder_hash
    calibrated = LinearHead("lesion", tiny_model.config.hidden_size, ["none", "lytic"], "softmax", encoder_hash,
                            calibration={"method": "temperature", "scale": 0.5})
    save_head(calibrated, folder / "heads")
    save_head(LinearHead("fracture", tiny_model.config.hidden_size, ["fracture"], "sigmoid", encoder_hash),
              folder / "heads")
    info = json.loads(runner.invoke(app, ["model", "info", str(folder), "--json"]).output)
    assert info["model_heads"]["lesion"]["calibration"] == "temperature 2"
    assert "calibration" not in info["model_heads"]["fracture"]
    table = runner.invoke(app, ["model", "info", str(folder)], env={"COLUMNS": "200"}).output
    lines = table.splitlines()
    assert any("lesion: softmax" in line and "(calibrated: temperature 2)" in line for line in lines), table
    assert any("fracture: sigmoid" in line and "calibrated" not in line for line in lines), table


def test_model_info_refuses_unknown_input(tmp_path):
    result = runner.invoke(app, ["model", "info", str(tmp_path)])
    assert result.exit_code == 1 and "config.json" in result.output


def test_export_onnx_writes_three_valid_graphs(tmp_path, tiny_model):
    folder = save_hf_vitmae(tiny_model, tmp_path / "m")
    result = runner.invoke(app, ["model", "export-onnx", str(folder), "--out", str(tmp_path / "onnx"), "--passes", "2"])
    assert result.exit_code == 0, result.output
    for graph in ("encoder_full", "encoder_masked", "decoder"):
        onnx.checker.check_model(str(tmp_path / "onnx" / f"{graph}.onnx"))


def test_build_engine_without_tensorrt_says_why(tmp_path, tiny_model):
    folder = save_hf_vitmae(tiny_model, tmp_path / "m")
    result = runner.invoke(app, ["model", "build-engine", str(folder)])
    assert result.exit_code == 1 and "tensorrt" in result.output.lower()
