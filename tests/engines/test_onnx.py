"""The exported graphs (what a TensorRT build consumes) against torch, run with onnxruntime at several batches."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.mae.errormap import masks_from_noise
from engines.mae.onnx_export import GRAPH_NAMES, export_onnx
from engines.mae.network import MaskedAutoencoderViT

TOL = 1e-4


@pytest.fixture
def exported(tmp_path, tiny_model):
    return export_onnx(tiny_model, tmp_path, passes=3)


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,passes", [(1, 10), (3, 2)])
def test_graphs_match_torch_with_dynamic_batch(exported, tiny_model, batch, passes):
    assert set(exported.paths) == set(GRAPH_NAMES) and all(len(h) == 64 for h in exported.sha256.values())
    generator = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, 224, 224, generator=generator)
    noise = torch.rand(batch, passes, 196, generator=generator)
    ids_keep, ids_restore, _ = masks_from_noise(noise, 0.75)
    with torch.no_grad():
        cls = tiny_model.embed(pixels)
        latent = tiny_model.forward_encoder_masked(pixels, ids_keep)
        pred = tiny_model.forward_decoder(latent, ids_restore)
    onnx_cls = session(exported.paths["encoder_full"]).run(None, {"pixels": pixels.numpy()})[0]
    onnx_latent = session(exported.paths["encoder_masked"]).run(
        None, {"pixels": pixels.numpy(), "ids_keep": ids_keep.reshape(batch, passes, -1).numpy()})[0]
    onnx_pred = session(exported.paths["decoder"]).run(
        None, {"latent": onnx_latent, "ids_restore": ids_restore.numpy()})[0]
    assert onnx_cls.shape == tuple(cls.shape) and np.abs(onnx_cls - cls.numpy()).max() < TOL
    assert np.abs(onnx_latent - latent.numpy()).max() < TOL
    assert np.abs(onnx_pred - pred.numpy()).max() < TOL


def test_encoder_only_exports_only_the_full_encoder(tmp_path, tiny_config):
    model = MaskedAutoencoderViT(tiny_config, with_decoder=False).eval()
    assert set(export_onnx(model, tmp_path, graphs=("encoder_full",)).paths) == {"encoder_full"}
    with pytest.raises(RuntimeError, match="no decoder"):
        export_onnx(model, tmp_path, graphs=("decoder",))


def test_export_is_deterministic(tmp_path, tiny_model):
    first = export_onnx(tiny_model, tmp_path / "a", graphs=("encoder_full",))
    second = export_onnx(tiny_model, tmp_path / "b", graphs=("encoder_full",))
    assert first.sha256 == second.sha256  # the plan cache key relies on it
