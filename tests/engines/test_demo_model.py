"""The committed demo model (models/demo-mae): format, size, HF compatibility, heads, and that it localises."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.training.evaluation import phantom_input
from engines.training.phantoms import generate
from tests.helpers.scripts import benchmark_script

MODEL = Path(__file__).resolve().parents[2] / "models" / "demo-mae"


@pytest.fixture(scope="module")
def encoder():
    import engines

    return engines.load(MODEL)


def test_files_size_and_hf_config():
    assert (MODEL / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "vit_mae" and config["architectures"] == ["ViTMAEForPreTraining"]
    assert config["norm_pix_loss"] is False and config["mask_ratio"] == 0.5
    preprocessor = json.loads((MODEL / "preprocessor_config.json").read_text())
    assert preprocessor["image_mean"] == [0.485, 0.456, 0.406] and preprocessor["image_std"] == [0.229, 0.224, 0.225]
    assert (MODEL.parent / "README.md").read_text().lower().count("not for clinical use") >= 1


def test_transformers_loads_it_and_agrees(encoder):
    """Hugging Face's own ViTMAEForPreTraining reads the folder with no missing/unexpected tensors, same output."""
    import transformers  # a test dependency ([test] extra): missing is a failure, not a skip
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(str(MODEL), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    x = torch.stack([phantom_input(generate("knee", 1))])
    noise = torch.rand(1, encoder.config.num_patches, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = encoder.network(x, noise=noise)[1]
        theirs = hf(pixel_values=x, noise=noise).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_heads_match_the_encoder_and_give_probabilities(encoder):
    # narrowing is trained but not shipped: worse than a constant grade (models/README.md); demo-dinov3 grades knees
    assert set(encoder.heads) == {"fracture", "lesion"}
    x = torch.stack([phantom_input(generate(kind, 5)) for kind in ("hand", "knee", "long_bone")])
    out = encoder.predict(x)
    assert out["fracture"].shape == (3, 1) and out["lesion"].shape == (3, 3)
    for name, probs in out.items():
        assert ((probs >= 0) & (probs <= 1)).all(), name
    assert torch.allclose(out["lesion"].sum(1), torch.ones(3), atol=1e-5)
    for name in ("fracture", "lesion"):
        meta = json.loads((MODEL / "heads" / f"{name}.json").read_text())
        assert meta["encoder_sha256"] == encoder.encoder_hash


# Localisation on unseen phantoms (models/README.md has the figures on 90 held-out cases per finding). Issue #19's
# targets are pointing game >= 0.7 lytic (>= 0.5 on hands), >= 0.7 sclerotic, pixel AUROC >= 0.95; the committed
# model meets only the last (held out: lytic 0.64, hands 0.37, sclerotic 0.56, pixel AUROC 0.974). These floors are
# what it holds on the 60 cases below (measured: lytic 0.68, hands 0.40, sclerotic 0.60, pixel AUROC 0.978), a
# little under, so that a regression fails.
LOCALISATION_SEEDS = range(2_500_000, 2_500_020)
POINTING_LYTIC = 0.6
POINTING_LYTIC_HAND = 0.3
POINTING_SCLEROTIC = 0.5
PIXEL_AUROC = 0.95


def _localisation(encoder, finding: str) -> tuple[float, dict[str, float], float]:
    """Pointing game @8 px overall and per kind, and mean pixel AUROC, on LOCALISATION_SEEDS x every kind."""
    from engines.training.evaluation import evaluate_localisation

    report, _ = evaluate_localisation(lambda x: encoder.error_map(x, seed=0, passes=10), finding,
                                      list(LOCALISATION_SEEDS))
    return report.pointing[8], {k: v["pointing_game@8"] for k, v in report.per_kind.items()}, report.pixel_auroc


def test_error_map_points_at_planted_lytic_lesions(encoder):
    """The argmax of the error map lies on the lytic lesion (dilated half a patch) in most unseen phantoms and in
    some hands; lesion pixels rank above the rest of the image (pixel AUROC, the issue's target)."""
    overall, per_kind, pixel = _localisation(encoder, "lytic")
    assert overall >= POINTING_LYTIC, (overall, per_kind)
    assert per_kind["hand"] >= POINTING_LYTIC_HAND, per_kind
    assert pixel >= PIXEL_AUROC, pixel


def test_error_map_points_at_planted_sclerotic_lesions(encoder):
    overall, per_kind, _ = _localisation(encoder, "sclerotic")
    assert overall >= POINTING_SCLEROTIC, (overall, per_kind)


def test_lesion_raises_the_image_score_over_its_normal_twin(encoder):
    higher = []
    for seed in LOCALISATION_SEEDS[:6]:
        for kind in ("hand", "knee", "long_bone"):
            lesion, normal = generate(kind, seed, findings=["lytic"]), generate(kind, seed)
            x = torch.stack([phantom_input(lesion), phantom_input(normal)])
            _, scores = encoder.error_map(x, seed=0, passes=10)
            higher.append(bool(scores[0] > scores[1]))
    assert np.mean(higher) >= 0.6, higher


# Heads on other unseen phantoms (figures on 900 held-out phantoms in models/README.md). Issue #19's targets: fracture
# AUROC >= 0.85 (not met: 0.83 held out, hands 0.54; measured here 0.826, floor 0.78), lesion macro AUROC >= 0.9 (met:
# 0.927; here 0.937), a normal phantom rarely above 0.5 for fracture (met: 0.9 %; here 1.6 %). Narrowing (grade error
# <= 0.6) is not met and that head is not shipped.
HEAD_CHECK_SEEDS = 3_500_000
HEAD_CHECK_IMAGES = 240
FRACTURE_AUROC = 0.78
LESION_MACRO_AUROC = 0.9
NORMAL_ABOVE_HALF = 0.1  # "a normal phantom should rarely read above 0.5 for fracture"


def test_heads_find_what_they_claim_on_unseen_phantoms(encoder):
    """Calibrated heads on phantoms no training, calibration or evaluation step used (every kind; 40 % without a
    focal finding, 20 % each fracture / lytic / sclerotic)."""
    from engines.training.evaluation import head_metrics
    from engines.training.inputs import normalise_uint8

    images, labels, _ = benchmark_script("demo_model").labelled_set(HEAD_CHECK_IMAGES, HEAD_CHECK_SEEDS)
    out = encoder.predict(normalise_uint8(images))
    fracture = out["fracture"][:, 0].numpy()
    assert head_metrics(fracture, labels["fracture"])["auroc"] >= FRACTURE_AUROC
    assert np.mean(fracture[labels["fracture"] == 0] > 0.5) <= NORMAL_ABOVE_HALF
    assert head_metrics(out["lesion"].numpy(), labels["lesion"])["auroc_macro_ovr"] >= LESION_MACRO_AUROC
    for name in ("fracture", "lesion"):  # each head carries the calibration its figures were made with
        assert encoder.heads[name].calibration is not None, name
