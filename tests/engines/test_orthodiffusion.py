"""OrthoDiffusion family: parity with the authors' code (golden files), the checkpoint loader, the input path.

The golden files in ``tests/engines/golden/orthodiffusion/`` were made by running the authors' reference code
(github.com/lt-0123/OrthoDiffusion) with ``tests/engines/golden/make_orthodiffusion_golden.py``; the weights of
every network there and here come from the same seeded rule (``fill_seeded`` in that script).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engines.family import ModelFamily, VolumeModelFamily
from engines.heads import HeadEncoderMismatch, LinearHead, save_head
from engines.imaging.volume import assemble_volume
from engines.orthodiffusion.family import (
    CONFIG_FILE,
    ConfigError,
    InputSpec,
    OrthoDiffusionConfig,
    centre_window,
    labels_to_volume,
    load_orthodiffusion,
    prepare_volume,
)
from engines.orthodiffusion.loaders import EMA_FORMAT, STATE_DICT_FORMAT, CheckpointMismatch, read_unet_checkpoint
from engines.orthodiffusion.network import NoiseSchedule, SegHead3D, UNet3D, UNet3DConfig, seeded_noise
from engines.training.knee_mri_phantoms import default_protocol, generate_study

GOLDEN = Path(__file__).parent / "golden" / "orthodiffusion"
TOL = 1e-4


def _golden_script():
    script = GOLDEN.parent / "make_orthodiffusion_golden.py"
    spec = importlib.util.spec_from_file_location("make_orthodiffusion_golden", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fill_seeded = _golden_script().fill_seeded


def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def seeded_unet(config: UNet3DConfig, seed: int) -> UNet3D:
    unet = UNet3D(config).eval()
    fill_seeded(unet, seed)
    return unet


def authors_checkpoint(unet: nn.Module, path: Path, prefix: str = "denoise_fn.module.", schedule: bool = True) -> Path:
    """Write ``unet`` as med-ddpm's Trainer.save does: {"step", "model", "ema", "opt"}, ema = the whole
    GaussianDiffusion (prefixed UNet tensors + schedule buffers)."""
    ema = {f"{prefix}{k}": v.clone() for k, v in unet.state_dict().items()}
    if schedule:
        ema.update({k: v.clone() for k, v in NoiseSchedule().state_dict().items()})
    torch.save({"step": 3, "model": {"denoise_fn.x": torch.zeros(1)}, "ema": ema, "opt": {"state": {}}}, path)
    return path


# --- schedule and noise -----------------------------------------------------------------------------------


def test_cosine_schedule_and_q_sample_constants_match_the_reference() -> None:
    ref = golden("unet_a")
    schedule = NoiseSchedule()
    for name in ("betas", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        np.testing.assert_allclose(getattr(schedule, name).numpy(), ref[name], rtol=0, atol=1e-7, err_msg=name)
    assert schedule.num_timesteps == 1000
    assert 0 < float(schedule.betas[0]) < float(schedule.betas[500]) < float(schedule.betas[-1])
    assert float(schedule.betas[-1]) == pytest.approx(0.999)  # clipped, as theirs


def test_seeded_noise_is_what_the_reference_drew_and_is_deterministic() -> None:
    ref = golden("unet_a")
    noise = seeded_noise(ref["x"].shape, int(ref["noise_seed"]))
    np.testing.assert_array_equal(noise.numpy(), ref["noise"])
    torch.manual_seed(12345)  # the global generator does not matter
    again = seeded_noise(ref["x"].shape, int(ref["noise_seed"]))
    assert torch.equal(noise, again)
    assert not torch.equal(noise, seeded_noise(ref["x"].shape, int(ref["noise_seed"]) + 1))


def test_q_sample_refuses_timesteps_outside_the_schedule() -> None:
    x = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="outside 0..999"):
        NoiseSchedule().q_sample(x, torch.tensor([1000]), x)


# --- UNet parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet_a", "unet_b"])
def test_unet_features_and_noise_prediction_match_the_reference(name: str) -> None:
    ref = golden(name)
    config = UNet3DConfig.from_dict(json.loads(str(ref["config"])))
    unet = seeded_unet(config, int(ref["weight_seed"]))
    x, t = torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"])
    noisy = NoiseSchedule().q_sample(x, t, seeded_noise(x.shape, int(ref["noise_seed"])))
    layers = [k for k in ref if k.startswith(("in_", "mid_"))]
    assert {"mid_0", "mid_1", "mid_2"} <= set(layers)
    with torch.no_grad():
        for layer in layers:
            ours = unet.features(noisy, t, layer).numpy()
            assert ours.shape == ref[layer].shape, layer
            np.testing.assert_allclose(ours, ref[layer], rtol=0, atol=TOL, err_msg=layer)
        prediction = unet(x, t).numpy()
    np.testing.assert_allclose(prediction, ref["noise_prediction"], rtol=0, atol=TOL)


def test_unet_names_what_it_cannot_do() -> None:
    unet = UNet3D(UNet3DConfig(model_channels=32, channel_mult=(1, 2)))
    with pytest.raises(ValueError, match="unknown feature layer 'mid_9'"):
        unet.features(torch.zeros(1, 1, 2, 2, 2), torch.tensor([1]), "mid_9")
    with pytest.raises(ValueError, match="multiples of 2"):
        unet.features(torch.zeros(1, 1, 3, 4, 4), torch.tensor([1]), "mid_0")
    with pytest.raises(ValueError, match="must divide by 32"):
        UNet3DConfig(model_channels=48)


# --- input path ------------------------------------------------------------------------------------------


def test_input_path_matches_the_reference_dataset() -> None:
    ref = golden("planes")
    for i in range(3):
        x, window = prepare_volume(ref[f"raw_{i}"], InputSpec(depth=16, size=32))
        assert tuple(x.shape) == (1, 1, 16, 32, 32)
        np.testing.assert_allclose(x[0].numpy(), ref[f"input_{i}"], rtol=0, atol=1e-5, err_msg=f"plane {i}")
        assert window.stop - window.start == 16
        assert float(x.min()) == -1.0 and abs(float(x.max()) - 1.0) < 1e-6


def test_centre_window_is_their_crop() -> None:
    assert centre_window(16, 16) == (w := centre_window(16, 16)) and (w.start, w.stop) == (0, 16)
    assert (centre_window(21, 16).start, centre_window(21, 16).stop) == (2, 18)
    assert (centre_window(40, 16).start, centre_window(40, 16).stop) == (12, 28)
    with pytest.raises(ValueError, match="12 slices; the model needs at least 16"):
        centre_window(12, 16)


def test_bad_volumes_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"sagittal: expected a volume \[slices, rows, cols\]"):
        prepare_volume(np.zeros((4, 4)), plane="sagittal")
    bad = np.zeros((16, 8, 8))
    bad[3, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare_volume(bad, InputSpec(16, 8), plane="axial")
    with pytest.raises(ValueError, match="at least 16"):
        prepare_volume(np.zeros((10, 8, 8)), InputSpec(16, 8))


def test_labels_map_back_onto_the_volume_grid() -> None:
    """A block drawn in the volume, thresholded on the model grid, lands where it was drawn (rotation, resize,
    slice window undone); slices outside the window are background."""
    spec = InputSpec(depth=16, size=32, rot90_k=3)
    volume = np.zeros((24, 45, 60), dtype=np.float32)
    volume[6:20, 10:25, 35:55] = 100.0
    volume[0, 0, 0] = -5.0  # min-max must not hide the block
    x, window = prepare_volume(volume, spec)
    grid = (x[0, 0] > 0).to(torch.uint8)
    labels = labels_to_volume(grid, window, volume.shape, spec)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    truth = np.zeros(volume.shape, dtype=bool)
    truth[window.start : window.stop] = volume[window.start : window.stop] > 50
    inter = np.logical_and(labels == 1, truth).sum()
    union = np.logical_or(labels == 1, truth).sum()
    assert inter / union > 0.85  # edges blur by a voxel through two resamplings
    for index in range(window.start + 2, 20):  # no shift, flip or transpose: the box is where it was drawn
        rows, cols = np.where(labels[index].any(1))[0], np.where(labels[index].any(0))[0]
        assert abs(rows.min() - 10) <= 1 and abs(rows.max() - 24) <= 1
        assert abs(cols.min() - 35) <= 1 and abs(cols.max() - 54) <= 1
    assert labels[: window.start].sum() == 0 and labels[window.stop :].sum() == 0


# --- loaders ---------------------------------------------------------------------------------------------


def test_the_authors_checkpoint_layout_is_ours() -> None:
    """Every UNet tensor of the authors' real GaussianDiffusion (64 channels) has our name and shape."""
    keys = json.loads((GOLDEN / "reference_keys.json").read_text())
    unet_keys = {k[len("denoise_fn.") :]: tuple(v) for k, v in keys.items() if k.startswith("denoise_fn.")}
    schedule_keys = {k for k in keys if not k.startswith("denoise_fn.")}
    ours = {k: tuple(v.shape) for k, v in UNet3D(UNet3DConfig()).state_dict().items()}
    assert unet_keys == ours
    assert {"betas", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"} <= schedule_keys
    assert sum(np.prod(s) for s in ours.values()) == 34_524_545


def test_loader_reads_a_reference_shaped_model_pt(tmp_path: Path) -> None:
    """A random state dict with the real model's names and shapes, saved as their model.pt (["ema"], prefix)."""
    keys = json.loads((GOLDEN / "reference_keys.json").read_text())
    generator = torch.Generator().manual_seed(0)
    ema = {}
    for key, shape in keys.items():
        name = key.replace("denoise_fn.", "denoise_fn.module.", 1) if key.startswith("denoise_fn.") else key
        ema[name] = torch.randn(shape, generator=generator) * 0.01
    ema.update(NoiseSchedule().state_dict())
    path = tmp_path / "model.pt"
    torch.save({"step": 1, "ema": ema, "model": {}, "opt": {}}, path)
    loaded = read_unet_checkpoint(path, UNet3DConfig())
    assert loaded.format == EMA_FORMAT and loaded.schedule_source == "checkpoint" and not loaded.notes
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, ema[f"denoise_fn.module.{key}"]), key


@pytest.mark.parametrize("prefix", ["denoise_fn.module.", "denoise_fn.", ""])
def test_loader_accepts_each_prefix_and_a_plain_state_dict(tmp_path: Path, prefix: str) -> None:
    config = UNet3DConfig(model_channels=32, channel_mult=(1, 2))
    unet = seeded_unet(config, 3)
    if prefix:
        path = authors_checkpoint(unet, tmp_path / "model.pt", prefix)
        expected_format = EMA_FORMAT
    else:
        path = tmp_path / "unet.pt"
        torch.save(unet.state_dict(), path)
        expected_format = STATE_DICT_FORMAT
    loaded = read_unet_checkpoint(path, config)
    assert loaded.format == expected_format
    assert loaded.schedule_source == ("checkpoint" if prefix else "cosine")
    for key, value in unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value)


def test_loader_names_missing_unexpected_and_misshaped_tensors(tmp_path: Path) -> None:
    config = UNet3DConfig(model_channels=32, channel_mult=(1, 2))
    state = seeded_unet(config, 3).state_dict()
    state.pop("middle_block.1.qkv.weight")
    state["extra.head.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pt"
    torch.save({"ema": {f"denoise_fn.module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(CheckpointMismatch) as err:
        read_unet_checkpoint(path, config)
    message = str(err.value)
    assert "broken.pt" in message and "missing 1: middle_block.1.qkv.weight" in message
    assert "unexpected 1: extra.head.weight" in message
    wider = tmp_path / "wider.pt"
    authors_checkpoint(seeded_unet(UNet3DConfig(model_channels=64, channel_mult=(1, 2)), 3), wider)
    with pytest.raises(CheckpointMismatch, match=r"mis-shaped \d+: .*input_blocks.0.0.weight \(64, 1, 3, 3, 3\)"):
        read_unet_checkpoint(wider, config)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="notes.pt: not a readable torch checkpoint"):
        read_unet_checkpoint(not_torch, config)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_unet_checkpoint(tmp_path / "absent.pt", config)


# --- the family: three planes, heads, segmentation --------------------------------------------------------


class _FusionHead(nn.Module):
    """Their ``LinearOrMLP(use_mlp=False)``: ``net`` is one Linear."""

    def __init__(self, in_dim: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Linear(in_dim, classes)


def build_reference_folder(folder: Path) -> dict[str, np.ndarray]:
    ref = golden("planes")
    config = json.loads(str(ref["config"]))
    unet_config = UNet3DConfig.from_dict(config)
    planes = []
    for i, name in enumerate(("sagittal", "coronal", "axial")):
        (folder / name).mkdir(parents=True)
        authors_checkpoint(seeded_unet(unet_config, int(ref["weight_seeds"][i])), folder / name / "model.pt")
        planes.append({"name": name, "weights": f"{name}/model.pt", "timestep": int(ref["timesteps"][i]),
                       "layer": str(ref["layers"][i]), "seed": int(ref["noise_seeds"][i])})
    head = _FusionHead(ref["pooled"].shape[1], 8)
    fill_seeded(head, int(ref["head_seed"]))
    torch.save(head.state_dict(), folder / "knee_head.pt")
    seg = SegHead3D(unet_config.feature_channels, 11)
    fill_seeded(seg, int(ref["seg_seed"]))
    torch.save(seg.state_dict(), folder / "seghead.pt")
    (folder / CONFIG_FILE).write_text(json.dumps({
        "format": "msknode-orthodiffusion/1", "name": "orthodiffusion-golden", "version": "test",
        "unet": unet_config.to_dict(), "input": {"depth": 16, "size": 32}, "planes": planes,
        "heads": [{"name": "knee", "file": "knee_head.pt", "labels": [str(v) for v in ref["labels"]]}],
        "segmentation": {"plane": "sagittal", "weights": "seghead.pt", "timestep": 100, "layer": "mid_2",
                         "seed": int(ref["seg_noise_seed"])},
    }))
    return ref


def test_three_planes_heads_and_segmentation_match_the_reference(tmp_path: Path) -> None:
    ref = build_reference_folder(tmp_path)
    model = load_orthodiffusion(tmp_path)
    volumes = {name: ref[f"raw_{i}"] for i, name in enumerate(("sagittal", "coronal", "axial"))}
    embedding = model.embed(volumes)
    for i, plane in enumerate(model.plane_names):
        np.testing.assert_allclose(model.last_features()[plane].features.numpy(), ref[f"features_{i}"], atol=TOL)
    np.testing.assert_allclose(embedding.numpy(), ref["pooled"], rtol=0, atol=TOL)
    probabilities = model.predict(embedding=embedding)
    assert list(probabilities) == ["knee"] and model.heads["knee"].labels == list(ref["labels"])
    np.testing.assert_allclose(probabilities["knee"].numpy(), ref["probabilities"], rtol=0, atol=TOL)
    assert model.heads["knee"].activation == "sigmoid"

    # the segmentation head on the sagittal plane's own features (t = 100, mid_2, its seed)
    x, _ = prepare_volume(ref["raw_0"], model.config.input)
    plane = model.planes["sagittal"].checkpoint
    t = torch.tensor([100])
    with torch.no_grad():
        feats = plane.unet.features(plane.schedule.q_sample(x, t, seeded_noise(x.shape, int(ref["seg_noise_seed"]))),
                                    t, "mid_2")
        np.testing.assert_allclose(feats.numpy(), ref["seg_features"], rtol=0, atol=TOL)
        logits = model.segmentation_head(feats)
    np.testing.assert_allclose(logits[:, :, ::4, ::4, ::4].numpy(), ref["seg_logits_strided"], rtol=0, atol=TOL)
    result = model.segment(ref["raw_0"])
    assert result.model_grid.shape == (16, 32, 32) and result.labels.shape == ref["raw_0"].shape
    decided = ref["seg_margin"][0].astype(np.float32) > 1e-3
    np.testing.assert_array_equal(result.model_grid[decided], ref["seg_labels"][0][decided])
    assert result.labels[: result.window.start].sum() == 0


def test_embedding_is_deterministic_and_follows_the_seed(tmp_path: Path) -> None:
    ref = build_reference_folder(tmp_path)
    volumes = {name: ref[f"raw_{i}"] for i, name in enumerate(("sagittal", "coronal", "axial"))}
    first = load_orthodiffusion(tmp_path).embed(volumes)
    assert torch.equal(first, load_orthodiffusion(tmp_path).embed(volumes))
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["planes"][0]["seed"] += 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    reseeded = load_orthodiffusion(tmp_path)
    other = reseeded.embed(volumes)
    width = model_width = reseeded.config.unet.feature_channels
    assert not torch.equal(first[:, :width], other[:, :width])
    assert torch.equal(first[:, model_width:], other[:, model_width:])


def test_family_refuses_missing_planes_files_and_bad_configs(tmp_path: Path) -> None:
    ref = build_reference_folder(tmp_path)
    model = load_orthodiffusion(tmp_path, load_heads=False)
    assert model.heads == {}
    with pytest.raises(ValueError, match=r"missing volume\(s\) for plane\(s\) \['axial'\]"):
        model.embed({"sagittal": ref["raw_0"], "coronal": ref["raw_1"]})
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / "axial" / "model.pt").unlink()
    with pytest.raises(ConfigError, match="plane 'axial' file 'axial/model.pt' does not exist"):
        load_orthodiffusion(tmp_path)
    for change, message in [
        ({"planes": [{**config["planes"][0], "layer": "mid_7"}]}, "layer 'mid_7' is not one of"),
        ({"planes": [{**config["planes"][0], "timestep": 1000}]}, "timestep 1000 outside"),
        ({"segmentation": {**config["segmentation"], "plane": "oblique"}}, "'oblique' is not one of"),
        ({"input": {"depth": 12}}, "multiples of 16"),
        ({"planes": [{**config["planes"][0], "colour": "red"}]}, r"unknown key\(s\) \['colour'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            OrthoDiffusionConfig.from_dict({**config, **change})
    with pytest.raises(ConfigError, match="has no orthodiffusion.json"):
        load_orthodiffusion(tmp_path / "sagittal")


def test_describe_and_inspect_name_planes_heads_and_segmentation(tmp_path: Path) -> None:
    build_reference_folder(tmp_path)
    model = load_orthodiffusion(tmp_path)
    info = model.inspect()
    assert info["family"] == "orthodiffusion" and info["format"] == EMA_FORMAT
    assert info["planes"]["coronal"] == {"timestep": 150, "layer": "mid_0", "seed": 102}
    assert info["heads"]["knee"][-2:] == ["PD", "EFFU"] and info["segmentation"]["classes"] == 11
    assert info["embedding_dim"] == 3 * 128 and len(info["encoder_hash"]) == 64
    assert set(info["schedule"].values()) == {"checkpoint"}
    # the 3-D protocol, not the 2-D one: a worker that checks for ModelFamily never hands it image batches
    assert isinstance(model, VolumeModelFamily) and not isinstance(model, ModelFamily)
    assert model.plane_names == ("sagittal", "coronal", "axial") and model.supports_segmentation


def test_assembled_phantom_series_run_end_to_end(tmp_path: Path) -> None:
    """The contract with the volume assembly: a rendered knee study's three series, assembled, are the model's
    inputs as they come; labels come back on each series' own grid."""
    build_reference_folder(tmp_path)
    model = load_orthodiffusion(tmp_path)
    study = generate_study(seed=4, protocol=default_protocol(48, 18, localizer=False, t1=False), size=48, slices=18)
    names = {"sagittal": "sag_pd_fs", "coronal": "cor_pd_fs", "axial": "ax_t2_fs"}
    volumes = {plane: assemble_volume(study.by_name(series).datasets).array for plane, series in names.items()}
    embedding = model.embed(volumes)
    assert embedding.shape == (1, model.embedding_dim) and torch.isfinite(embedding).all()
    assert torch.equal(embedding, model.embed(volumes))
    probabilities = model.predict(embedding=embedding)["knee"]
    assert probabilities.shape == (1, 8) and ((probabilities > 0) & (probabilities < 1)).all()
    result = model.segment(volumes["sagittal"])
    assert result.labels.shape == study.by_name("sag_pd_fs").labels.shape == (18, 48, 48)
    assert (result.window.start, result.window.stop) == (1, 17)
    assert result.labels[0].sum() == 0 and result.labels[17].sum() == 0 and result.labels.max() < 11


def test_heads_in_our_format_are_tied_to_the_encoder_and_foreign_heads_refused(tmp_path: Path) -> None:
    build_reference_folder(tmp_path)
    model = load_orthodiffusion(tmp_path)
    ours = LinearHead("effusion", model.embedding_dim, ["EFFU"], "sigmoid", encoder_sha256=model.encoder_hash)
    save_head(ours, tmp_path / "heads")
    assert set(load_orthodiffusion(tmp_path).heads) == {"knee", "effusion"}
    save_head(LinearHead("stale", model.embedding_dim, ["x"], "sigmoid", encoder_sha256="0" * 64), tmp_path / "heads")
    with pytest.raises(HeadEncoderMismatch, match="'stale'"):
        load_orthodiffusion(tmp_path)
    (tmp_path / "heads" / "stale.json").unlink()
    mlp = {"net.0.weight": torch.zeros(4, model.embedding_dim), "net.0.bias": torch.zeros(4),
           "net.3.weight": torch.zeros(8, 4), "net.3.bias": torch.zeros(8)}
    torch.save(mlp, tmp_path / "knee_head.pt")
    with pytest.raises(CheckpointMismatch, match="no linear head"):
        load_orthodiffusion(tmp_path)
    torch.save({"net.weight": torch.zeros(8, 100), "net.bias": torch.zeros(8)}, tmp_path / "knee_head.pt")
    with pytest.raises(CheckpointMismatch, match=r"mis-shaped 1: weight \(8, 100\) != \(8, 384\)"):
        load_orthodiffusion(tmp_path)
