"""The committed demo 3-D model (models/demo-orthodiffusion): its folder, loading through engines.load, the same
outputs as when it was evaluated, the DICOM path, and the issue's targets on freshly generated held-out phantoms."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "demo-orthodiffusion"

# Targets from issue #17 (held-out phantoms): mean Dice over the structures, mean AUROC over the findings.
MEAN_DICE_TARGET = 0.7
AUROC_TARGET = 0.85
TEST_STUDIES = 8


@pytest.fixture(scope="module")
def demo():
    """The training script as a module: its phantom protocol, seed ranges and evaluation are the ones tested."""
    spec = importlib.util.spec_from_file_location("demo_orthodiffusion", ROOT / "benchmarks" / "demo_orthodiffusion.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_orthodiffusion"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    import engines

    return engines.load(MODEL)


@pytest.fixture(scope="module")
def report():
    return json.loads((MODEL / "training_report.json").read_text())


def test_folder_is_small_and_states_its_input(demo):
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < 10 * 1024 * 1024
    config = json.loads((MODEL / "orthodiffusion.json").read_text())
    assert config["format"] == "msknode-orthodiffusion/1"
    assert config["input"]["depth"] == demo.SLICES and config["input"]["size"] == demo.SIZE
    assert [p["name"] for p in config["planes"]] == ["sagittal", "coronal", "axial"]
    assert config["segmentation"]["classes"] == 12 and config["segmentation"]["class_names"][0] == "background"
    assert config["heads"][0]["labels"] == ["ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU"]
    assert "not for clinical use" in (MODEL / "README.md").read_text().lower()


def test_loads_as_a_volume_model(model):
    from engines.family import ModelFamily, VolumeModelFamily

    assert model.family == "orthodiffusion"
    assert isinstance(model, VolumeModelFamily) and not isinstance(model, ModelFamily)
    assert model.plane_names == ("sagittal", "coronal", "axial")
    assert model.supports_segmentation and set(model.heads) == {"knee"}
    assert model.embedding_dim == 3 * model.config.unet.feature_channels


def test_same_outputs_as_in_the_training_report(demo, model, report):
    """The studies the report recorded give the same probabilities and label counts again (seeded noise)."""
    for recorded in report["heldout"]["first_studies"]:
        study = demo.make_study(recorded["seed"], recorded["findings"])
        volumes = {plane: study.by_name(series).pixels for plane, series in demo.PLANES.items()}
        probabilities = model.predict(volumes)["knee"][0].numpy()
        np.testing.assert_allclose(probabilities, recorded["probabilities"], atol=1e-4)
        labels = model.segment(volumes["sagittal"]).labels
        counts = np.bincount(labels.ravel(), minlength=12)
        assert np.abs(counts - np.array(recorded["label_counts"])).sum() <= 0.001 * labels.size


def test_dicom_series_give_the_same_volume(demo, model):
    """What the node assembles from the DICOM files is the array the model was trained and evaluated on."""
    from engines.imaging.volume import assemble_volume

    study = demo.make_study(demo.TEST_SEEDS + 99, ["acl_tear"])
    for series in demo.PLANES.values():
        volume = assemble_volume(study.by_name(series).datasets)
        np.testing.assert_array_equal(volume.array, study.by_name(series).pixels.astype(np.float32))


def test_reaches_the_targets_on_fresh_held_out_phantoms(demo, model):
    """Studies never seen in training or in the report's evaluation: each finding is planted in half of them
    (a balanced design, so every AUROC is defined), the structures are segmented on the sagittal series' grid."""
    rng = np.random.default_rng(7)
    findings = []
    for _ in range(TEST_STUDIES // 2):
        chosen = rng.permutation(len(demo.FINDINGS))[:4]
        findings.append([demo.FINDINGS[k] for k in sorted(chosen)])
        findings.append([name for k, name in enumerate(demo.FINDINGS) if k not in chosen])
    result = demo.evaluate(model, demo.TEST_SEEDS, TEST_STUDIES, findings=findings)
    assert all(value is not None for value in result["auroc"].values()), result["auroc"]
    assert result["mean_dice"] >= MEAN_DICE_TARGET, result["dice"]
    assert result["mean_auroc"] >= AUROC_TARGET, result["auroc"]
