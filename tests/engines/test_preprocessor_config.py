"""preprocessor_config.json travels with the weights: written once, read back, and applied to the input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engines
from engines.imaging.geometry import SourceGeometry
from engines.imaging.preprocess import preprocess, to_uint8_minmax
from engines.imaging.preprocessor_config import (
    IMAGENET_224,
    PreprocessorConfig,
    PreprocessorConfigError,
    read_preprocessor_config,
)
from engines.imaging.regions import highest_error_region
from engines.mae.errormap import compute_error_map
from engines.mae.loaders import CheckpointError, save_hf_vitmae
from engines.mae.network import MAEConfig, MaskedAutoencoderViT
from tests.engines.dicom_fixtures import make_dataset, synthetic_radiograph

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-mae"
TINY = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
    decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
)


def _expected(pixels: np.ndarray, height: int, width: int, mean, std, resample: int) -> torch.Tensor:
    """The documented path by hand: min-max uint8, PIL resize, /255, mean / std, grey to 3 channels."""
    image8 = np.asarray(Image.fromarray(to_uint8_minmax(pixels)).resize((width, height), resample=resample))
    scaled = image8.astype(np.float32)[None] * np.float32(1 / 255)
    out = (scaled - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return torch.from_numpy(out.astype(np.float32))


def test_demo_model_file_reads_as_skelex_input_and_writes_back_byte_for_byte():
    config = read_preprocessor_config(DEMO)
    assert config == IMAGENET_224
    written = json.dumps(config.to_hf_dict(), indent=2) + "\n"
    assert written == (DEMO / "preprocessor_config.json").read_text()


def test_default_preprocessing_is_unchanged():
    pixels = synthetic_radiograph(300, 260, seed=3)
    ds = make_dataset(pixels)
    default = preprocess(ds).tensor
    assert torch.equal(default, preprocess(ds, preprocessing=IMAGENET_224).tensor)
    expected = _expected(pixels.astype(np.float64), 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 2)
    assert torch.equal(default[0], expected)


def test_a_model_folders_mean_std_and_filter_are_honoured(tmp_path):
    torch.manual_seed(0)
    folder = save_hf_vitmae(MaskedAutoencoderViT(MAEConfig(**TINY)), tmp_path / "m")
    custom = {**json.loads((folder / "preprocessor_config.json").read_text()),
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.3, 0.35], "resample": 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(custom))
    model = engines.load(folder)
    assert model.preprocessing == PreprocessorConfig(224, 224, (0.5, 0.5, 0.5), (0.25, 0.3, 0.35), 3)
    pixels = synthetic_radiograph(300, 260, seed=4)
    x = preprocess(make_dataset(pixels), preprocessing=model.preprocessing).tensor
    assert torch.equal(x[0], _expected(pixels.astype(np.float64), 224, 224, (0.5,) * 3, (0.25, 0.3, 0.35), 3))
    assert not torch.equal(x, preprocess(make_dataset(pixels)).tensor)
    # the error map undoes the model's normalisation before comparing pixels, not ImageNet's
    c, reconstruct = model.config, model.backend.reconstruct
    ours = model.error_map(x, seed=0, passes=2)[0]
    args = dict(patch_size=c.patch_size, num_patches=c.num_patches, mask_ratio=c.mask_ratio, seed=0, passes=2)
    assert torch.equal(ours, compute_error_map(reconstruct, x, mean=(0.5,) * 3, std=(0.25, 0.3, 0.35), **args).maps)
    assert not torch.equal(ours, compute_error_map(reconstruct, x, **args).maps)


def test_a_model_folders_size_gives_that_input_and_map(tmp_path):
    torch.manual_seed(0)
    network = MaskedAutoencoderViT(MAEConfig(image_size=112, **TINY))
    folder = save_hf_vitmae(network, tmp_path / "m112")
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {"height": 112, "width": 112}
    model = engines.load(folder)
    assert (model.preprocessing.height, model.preprocessing.width) == (112, 112)
    pixels = synthetic_radiograph(300, 260, seed=5)
    prepared = preprocess(make_dataset(pixels), preprocessing=model.preprocessing)
    assert prepared.tensor.shape == (1, 3, 112, 112)
    assert torch.equal(prepared.tensor[0], _expected(pixels.astype(np.float64), 112, 112, (0.485, 0.456, 0.406),
                                                     (0.229, 0.224, 0.225), 2))
    assert prepared.geometry.model_size == (112, 112)
    maps, _ = model.error_map(prepared.tensor, seed=0, passes=2)
    assert maps.shape == (1, 112, 112)
    region = highest_error_region(maps[0].numpy(), prepared.geometry)
    assert region is not None
    assert region.polygon[:, 0].max() <= 260 + 1e-9 and region.polygon[:, 1].max() <= 300 + 1e-9


def test_geometry_maps_model_space_of_its_size():
    geometry = SourceGeometry(rows=300, columns=260, model_size=(112, 112))
    assert np.allclose(geometry.model_to_source(np.array([[112.0, 112.0]])), [[260.0, 300.0]])
    assert np.allclose(geometry.source_to_model(np.array([[260.0, 300.0]])), [[112.0, 112.0]])
    with pytest.raises(ValueError, match="112 x 112"):
        highest_error_region(np.random.rand(224, 224), geometry)


def test_preprocessor_file_that_does_not_fit_the_model_is_refused(tmp_path):
    folder = save_hf_vitmae(MaskedAutoencoderViT(MAEConfig(**TINY)), tmp_path / "m")
    data = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**data, "size": {"height": 256, "width": 256}}))
    with pytest.raises(CheckpointError, match="256 x 256"):
        engines.load(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({**data, "image_std": [0.2, 0.0, 0.2]}))
    with pytest.raises(CheckpointError, match="image_std"):
        engines.load(folder)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({}, IMAGENET_224),
        ({"size": 192}, PreprocessorConfig(192, 192)),
        ({"size": {"shortest_edge": 160}}, PreprocessorConfig(160, 160)),
        ({"size": {"height": 96, "width": 128}, "resample": 3}, PreprocessorConfig(96, 128, resample=3)),
    ],
)
def test_hf_size_forms(data, expected):
    assert PreprocessorConfig.from_hf_dict(data) == expected


@pytest.mark.parametrize("data", [{"size": "big"}, {"do_normalize": False}, {"resample": 9}, {"image_mean": [0.5]}])
def test_unusable_preprocessor_files_are_refused(data):
    with pytest.raises(PreprocessorConfigError):
        PreprocessorConfig.from_hf_dict(data)
