"""The model-family protocol: the MAE family implements it, and engines.load returns it for every format."""

from __future__ import annotations

import pytest
import torch

import engines
from engines.family import ErrorMapSpec, ExportsGraphs, ModelFamily
from engines.imaging.preprocessor_config import IMAGENET_224
from engines.mae.family import MAEModel
from engines.mae.loaders import save_hf_vitmae
from engines.mae.network import MaskedAutoencoderViT

PROTOCOL_MEMBERS = (
    "family", "name", "version", "format", "encoder_hash", "heads", "preprocessing", "supports_error_map",
    "error_map_spec", "backend_name", "precision", "device", "embed", "predict", "error_map_result", "error_map",
    "describe", "inspect",
)


def test_mae_model_satisfies_the_protocol(tmp_path, tiny_model, images):
    model = engines.load(save_hf_vitmae(tiny_model, tmp_path / "mae"))
    assert isinstance(model, MAEModel) and isinstance(model, ModelFamily) and isinstance(model, ExportsGraphs)
    assert engines.ModelFamily is ModelFamily
    for member in PROTOCOL_MEMBERS:
        assert hasattr(model, member), member
    assert model.family == "mae" and model.format == "hf-vitmae"
    assert model.supports_error_map
    assert model.error_map_spec == ErrorMapSpec("masked-reconstruction", tiny_model.config.mask_ratio)
    assert model.preprocessing == IMAGENET_224
    emb = model.embed(images)
    assert emb.shape == (2, tiny_model.config.hidden_size) and model.predict(images, embedding=emb) == {}
    result = model.error_map_result(images, seed=0, passes=2)
    maps, scores = model.error_map(images, seed=0, passes=2)
    assert torch.equal(result.maps, maps) and torch.equal(result.scores, scores) and maps.shape == (2, 224, 224)
    assert model.describe()["backend"] == "cpu" and model.inspect()["format"] == "hf-vitmae"
    assert model.graph_names() == ("encoder_full", "encoder_masked", "decoder")


def test_error_map_is_an_optional_capability(tmp_path, tiny_config):
    encoder_only = MaskedAutoencoderViT(tiny_config, with_decoder=False)
    model = engines.load(save_hf_vitmae(encoder_only, tmp_path / "enc"))
    assert isinstance(model, ModelFamily)
    assert not model.supports_error_map and model.error_map_spec is None
    assert model.graph_names() == ("encoder_full",)
    x = torch.zeros(1, 3, 224, 224)
    assert model.embed(x).shape == (1, tiny_config.hidden_size)
    with pytest.raises(RuntimeError, match="no decoder"):
        model.error_map_result(x)


def test_every_format_loads_as_the_protocol(tmp_path, tiny_model):
    torch.save({"model": tiny_model.state_dict()}, tmp_path / "mae.pth")
    model = engines.load(tmp_path / "mae.pth")
    assert isinstance(model, ModelFamily) and model.format == "mae-pth"
    assert model.preprocessing == IMAGENET_224  # no preprocessor file: ImageNet at the model's size
