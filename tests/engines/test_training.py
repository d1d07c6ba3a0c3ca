"""Training helpers: the MAE loop (tiny, a few steps), linear probes, AUROC, calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.calibration import Calibration, load_calibration, percentile
from engines.training.metrics import auroc
from engines.training.pretrain import PretrainSettings, pretrain_mae
from engines.training.probes import fit_linear_probe, probe_to_head
from engines.mae.network import MAEConfig, MaskedAutoencoderViT
from tests.helpers.scripts import benchmark_script

TINY = MAEConfig(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
    decoder_intermediate_size=64, layer_norm_eps=1e-6,
)


def _images(n: int = 16) -> torch.Tensor:
    """Smooth structured images (a bright disc on a ramp): learnable in a few steps, unlike white noise."""
    yy, xx = np.mgrid[0:224, 0:224]
    out = []
    for i in range(n):
        cx, cy = 60 + 7 * i, 80 + 5 * i
        img = 40 + 0.3 * xx + 150 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 40**2)
        out.append(np.clip(img, 0, 255))
    return torch.from_numpy(np.stack(out).astype(np.uint8))


def _train(seed: int, steps: int = 12) -> tuple[MaskedAutoencoderViT, list[float]]:
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(TINY)
    settings = PretrainSettings(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, seed=seed, threads=1, log_every=0)
    return model, pretrain_mae(model, _images(), settings).losses


def test_pretraining_learns_and_is_reproducible():
    model, losses = _train(seed=0)
    again, losses_again = _train(seed=0)
    assert all(np.isfinite(losses))
    assert losses == pytest.approx(losses_again, rel=1e-5)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the loss goes down on learnable images
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not model.training  # handed back in eval mode


def test_pretraining_refuses_float_images():
    with pytest.raises(ValueError):
        pretrain_mae(MaskedAutoencoderViT(TINY), torch.zeros(4, 224, 224), PretrainSettings(steps=1))


def test_auroc_known_values():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5  # ties count half
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def _separable(n: int = 300, d: int = 24, classes: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 3, (classes, d))
    # Large offset and uneven scales: the fit must standardise and fold the scaling back correctly.
    x = centres[y] + rng.normal(0, 1, (n, d))
    x = x * rng.uniform(0.1, 10, d) + 50
    return torch.tensor(x, dtype=torch.float32), y


def test_binary_probe_separates_and_folds_standardisation():
    x, y = _separable()
    fit = fit_linear_probe(x, y, ["finding"], seed=1)
    assert fit.activation == "sigmoid" and fit.weight.shape == (1, x.shape[1])
    assert fit.metrics["auroc"] > 0.95 and fit.metrics["accuracy"] > 0.9
    assert fit.train_size + fit.test_size == len(y)
    # The weights apply to raw embeddings: recomputing the held-out AUROC from them gives the same figure.
    probs = torch.sigmoid(x @ fit.weight.T + fit.bias)[:, 0].numpy()
    assert auroc(probs, y) > 0.95


def test_softmax_probe_and_head_round_trip(tmp_path):
    from engines.heads import load_head, save_head

    x, y = _separable(classes=3, seed=2)
    fit = fit_linear_probe(x, y, ["a", "b", "c"], seed=0)
    assert fit.activation == "softmax" and fit.metrics["accuracy"] > 0.85
    head = probe_to_head(fit, "demo", "ab" * 32, provenance={"data": "synthetic"})
    save_head(head, tmp_path)
    loaded = load_head(tmp_path / "demo.json", encoder_sha256="ab" * 32)
    assert torch.allclose(loaded.predict(x), head.predict(x), atol=1e-6)
    meta = json.loads((tmp_path / "demo.json").read_text())
    assert meta["provenance"]["held_out_metrics"]["accuracy"] == pytest.approx(fit.metrics["accuracy"])


def test_probe_refuses_bad_targets():
    x, y = _separable()
    with pytest.raises(ValueError):
        fit_linear_probe(x, y + 5, ["finding"])
    with pytest.raises(ValueError):
        fit_linear_probe(x[:10], y, ["finding"])


def test_calibration_percentiles_and_file(tmp_path):
    calibration = Calibration.from_scores([0.3, 0.1, 0.2, 0.4, float("nan")], encoder_sha256="cd" * 32)
    assert calibration.scores == [0.1, 0.2, 0.3, 0.4]
    assert calibration.percentile(0.05) == 0.0
    assert calibration.percentile(0.5) == 100.0
    assert calibration.percentile(0.2) == pytest.approx(37.5)  # one below, one tie of four
    assert calibration.percentile(0.25) < calibration.percentile(0.35)
    path = calibration.save(tmp_path)
    assert path.name == "calibration.json"
    assert percentile(0.35, path) == calibration.percentile(0.35)
    assert load_calibration(tmp_path, "cd" * 32) is not None
    assert load_calibration(tmp_path, "ef" * 32) is None  # made for other weights: not used
    with pytest.raises(ValueError):
        Calibration.from_scores([])


def test_pool_kind_cycle():
    """``benchmarks/demo_model.py --kind-weights``: the default cycles the kinds in turn, as before."""
    module = benchmark_script("demo_model")
    assert module.kind_cycle((1, 1, 1)) == ["hand", "knee", "long_bone"]
    assert module.kind_cycle((2, 1, 1)) == ["hand", "knee", "long_bone", "hand"]
    assert module.kind_cycle((0, 1, 1)) == ["knee", "long_bone"]
    with pytest.raises(ValueError):
        module.kind_cycle((1, 1))


def test_demo_script_refuses_a_device_it_does_not_have(capsys):
    """``--device cuda`` on a machine without CUDA is a usage error naming the option, before any work."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    module = benchmark_script("demo_model")
    for bad in ("cuda", "tpu9", "mps"):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--device", bad, "--quick"])
        assert exit_info.value.code == 2
        assert "--device" in capsys.readouterr().err
