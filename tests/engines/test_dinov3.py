"""The DINOv3 family (#16): parity with transformers' DINOv3ViTModel, the three checkpoint layouts, RoPE on / off,
heads on CLS and mean-pooled patch tokens, preprocessing from the model folder, ONNX, backends.

Tiny random configs (ViT-L shapes: test_dinov3_vitl.py). Parity: max abs difference <= 1e-4 in fp32.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import engines
from engines.dinov3.family import DINOv3Model
from engines.dinov3.loaders import (
    CheckpointError,
    detect_format,
    hf_filter_fn,
    to_authors_state_dict,
    to_hf_state_dict,
)
from engines.dinov3.network import DINOv3Config, DINOv3ViT, encoder_sha256, expected_shapes
from engines.family import ExportsGraphs, ModelFamily
from engines.heads import LinearHead, load_head, save_head
from engines.imaging.preprocess import preprocess
from engines.loading import detect_family
from tests.engines.dicom_fixtures import make_dataset, synthetic_radiograph
from tests.engines.dinov3_reference import hf_features, hf_rope_disabled, make_hf_dinov3, ours_from_hf

TOL = 1e-4

TINY = {
    # OrthoFoundation's shape in small: MLP, 4 registers, masked key bias, theta 100
    "mlp-reg4": DINOv3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             num_register_tokens=4, image_size=64),
    # gated SwiGLU, no registers, a real key bias, another RoPE base, 224 px input
    "swiglu-reg0-kbias": DINOv3Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                      intermediate_size=80, num_register_tokens=0, use_gated_mlp=True,
                                      hidden_act="silu", key_bias=True, rope_theta=50.0, image_size=224),
    # no qkv / proj / mlp biases, 2 registers
    "nobias-reg2": DINOv3Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                                num_register_tokens=2, query_bias=False, value_bias=False, proj_bias=False,
                                mlp_bias=False, image_size=96, layer_norm_eps=1e-6),
}


def report(label: str, diff: float) -> None:
    print(f"PARITY {label}: max abs diff {diff:.3g}")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def pixels(config: DINOv3Config, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 8, 8, generator=generator)
    size = (config.image_size, config.image_size)
    return (torch.nn.functional.interpolate(base, size=size, mode="bilinear") - 0.45) / 0.226


@pytest.fixture(params=sorted(TINY))
def case(request):
    config = TINY[request.param]
    return request.param, config, make_hf_dinov3(config, seed=3)


def hf_folder(hf, tmp_path, name="hf"):
    folder = tmp_path / name
    hf.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- parity
def test_hf_folder_parity_rope_on(case, tmp_path):
    label, config, hf = case
    model = engines.load(hf_folder(hf, tmp_path))
    assert isinstance(model, DINOv3Model) and model.format == "hf-dinov3" and model.config.use_rope
    x = pixels(config)
    cls_ref, patches_ref = hf_features(hf, x, config.num_register_tokens)
    features = model.network.forward_features(x)
    report(f"{label} hf rope-on cls", max_diff(model.embed(x), cls_ref))
    report(f"{label} hf rope-on patches", max_diff(features[1], patches_ref))
    assert max_diff(model.embed(x), cls_ref) <= TOL
    assert max_diff(features[1], patches_ref) <= TOL
    assert max_diff(model.features(x)["patch_mean"], patches_ref.mean(1)) <= TOL


def test_rope_off_matches_reference_with_identity_rotary(case, tmp_path):
    label, config, hf = case
    folder = hf_folder(hf, tmp_path)
    hf_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf_config, "use_rope": False}))
    model = engines.load(folder)
    assert not model.config.use_rope and model.describe()["rope"] == "off"
    assert model.inspect()["rope_source"] == "config.json use_rope"
    x = pixels(config)
    with hf_rope_disabled():
        cls_ref, patches_ref = hf_features(hf, x, config.num_register_tokens)
    cls, patches = model.network.forward_features(x)
    report(f"{label} rope-off cls", max_diff(cls, cls_ref))
    report(f"{label} rope-off patches", max_diff(patches, patches_ref))
    assert max_diff(cls, cls_ref) <= TOL and max_diff(patches, patches_ref) <= TOL
    # the switch matters: with RoPE the same weights give other features, and another hash
    on = ours_from_hf(hf, config)
    assert max_diff(on.embed(x), cls) > 1e-3
    assert on.encoder_hash != model.encoder_hash


def test_authors_pth_layout_round_trip(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=5)
    canonical = hf_filter_fn(hf.state_dict(), config)
    # the authors' file: native names, bias_mask, rope periods, mask_token; a k bias that the mask removes
    authors = to_authors_state_dict(canonical, config)
    for key in [k for k in authors if k.endswith("attn.qkv.bias")]:
        authors[key] = authors[key].clone()
        authors[key][config.hidden_size : 2 * config.hidden_size] = 7.0
    torch.save(authors, tmp_path / "dinov3_vit.pth")
    (tmp_path / "dinov3_vit.json").write_text(json.dumps({"image_size": 64}))  # a .pth carries no input size
    x = pixels(config)
    cls_ref, patches_ref = hf_features(hf, x, config.num_register_tokens)
    model = engines.load(tmp_path / "dinov3_vit.pth")
    assert model.format == "dinov3-pth" and model.config.use_rope and model.config.rope_theta == pytest.approx(100.0)
    report("authors-pth rope-on cls", max_diff(model.embed(x), cls_ref))
    assert max_diff(model.embed(x), cls_ref) <= TOL
    assert max_diff(model.network.forward_features(x)[1], patches_ref) <= TOL
    # ... and back: the canonical tensors map to the reference's names and values exactly
    back = to_hf_state_dict(model.network.state_dict(), model.config)
    reference = {k.replace("model.layer.", "layer.", 1): v for k, v in hf.state_dict().items()}  # as saved
    assert set(back) == set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference if k != "embeddings.mask_token")  # pre-training
    assert model.encoder_hash == ours_from_hf(hf, config).encoder_hash  # same weights, same hash, any layout


def test_bf16_rope_periods_in_the_file_are_used_as_stored(tmp_path):
    config = TINY["nobias-reg2"]  # head 16: periods 1, 3.16, 10, 31.6 (not exact in bf16)
    hf = make_hf_dinov3(config, seed=13)
    authors = to_authors_state_dict(hf_filter_fn(hf.state_dict(), config), config)
    authors["rope_embed.periods"] = authors["rope_embed.periods"].to(torch.bfloat16)  # as Meta's files hold them
    torch.save(authors, tmp_path / "meta.pth")
    (tmp_path / "meta.json").write_text(json.dumps({"image_size": 96}))
    model = engines.load(tmp_path / "meta.pth")
    assert model.config.rope_theta == 100.0 and any("RoPE periods taken from the file" in n for n in model.notes)
    assert torch.equal(model.network.rope_periods, authors["rope_embed.periods"].float())
    x = pixels(config)
    diff = max_diff(model.embed(x), hf_features(hf, x, config.num_register_tokens)[0])
    assert 0 < diff < 0.05  # transformers recomputes fp32 periods from the base; the authors' model does not


def test_orthofoundation_layout_runs_without_rope_and_ignores_its_dino_head(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=6)
    state = to_authors_state_dict(hf_filter_fn(hf.state_dict(), config), config, prefix="backbone.")
    state.update({"head.mlp.0.weight": torch.zeros(8, 32), "head.last_layer.weight_g": torch.ones(16, 1)})
    torch.save(state, tmp_path / "OrthoFoudation-L.pth")
    (tmp_path / "OrthoFoudation-L.json").write_text(json.dumps({"image_size": 64}))
    x = pixels(config)
    model = engines.load(tmp_path / "OrthoFoudation-L.pth")
    assert not model.config.use_rope and "OrthoFoundation" in model.rope_source
    assert any("DINO head" in note and "head.mlp.0.weight" in note for note in model.notes)
    with hf_rope_disabled():
        cls_ref, _ = hf_features(hf, x, config.num_register_tokens)
    report("orthofoundation-pth rope-off cls", max_diff(model.embed(x), cls_ref))
    assert max_diff(model.embed(x), cls_ref) <= TOL
    # a sidecar turns RoPE back on
    (tmp_path / "OrthoFoudation-L.pth.json").write_text(json.dumps({"use_rope": True, "image_size": 64}))
    on = engines.load(tmp_path / "OrthoFoudation-L.pth")
    assert on.config.use_rope and on.rope_source == "sidecar config use_rope"
    assert max_diff(on.embed(x), hf_features(hf, x, config.num_register_tokens)[0]) <= TOL


def test_nested_training_checkpoint_takes_the_teacher(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=7)
    canonical = hf_filter_fn(hf.state_dict(), config)
    student = {k: v + 1 for k, v in canonical.items()}
    nested = {"teacher": to_authors_state_dict(canonical, config, "backbone."),
              "student": to_authors_state_dict(student, config, "backbone."), "iteration": 3}
    torch.save(nested, tmp_path / "checkpoint.pth")
    model = engines.load(tmp_path / "checkpoint.pth")
    assert any("teacher" in note for note in model.notes)
    assert model.encoder_hash == ours_from_hf(hf, config, use_rope=False).encoder_hash


# ------------------------------------------------------------------------------------------------- refusals
def test_partial_or_foreign_files_are_refused_by_name(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=8)
    authors = to_authors_state_dict(hf_filter_fn(hf.state_dict(), config), config)
    missing = {k: v for k, v in authors.items() if k != "blocks.1.mlp.fc2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*blocks\.1\.mlp\.fc2\.weight"):
        engines.load(tmp_path / "missing.pth")
    torch.save({**authors, "blocks.0.attn.extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*blocks\.0\.attn\.extra\.weight"):
        engines.load(tmp_path / "extra.pth")
    wrong = dict(authors)
    wrong["blocks.0.norm1.weight"] = torch.ones(31)
    torch.save(wrong, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks\.0\.norm1\.weight"):
        engines.load(tmp_path / "shape.pth")
    nan_mask = dict(authors)
    nan_mask["blocks.0.attn.qkv.bias_mask"] = torch.full((96,), float("nan"))
    nan_mask["blocks.1.attn.qkv.bias_mask"] = torch.full((96,), float("nan"))
    torch.save(nan_mask, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="NaN"):
        engines.load(tmp_path / "nan.pth")
    folder = hf_folder(hf, tmp_path)
    state = {k: v for k, v in to_hf_state_dict(hf_filter_fn(hf.state_dict(), config), config).items()
             if k != "layer.0.attention.k_proj.weight"}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.0.*query/key/value weights incomplete"):
        engines.load(folder)


def test_detection_leaves_mae_checkpoints_to_the_mae_family(tmp_path, tiny_model):
    from engines.mae.loaders import save_hf_vitmae

    save_hf_vitmae(tiny_model, tmp_path / "mae")
    torch.save({k: v for k, v in tiny_model.state_dict().items() if not k.startswith("decoder")}, tmp_path / "t.pth")
    assert detect_family(tmp_path / "mae") == "mae" and detect_format(tmp_path / "mae") is None
    assert detect_family(tmp_path / "t.pth") == "mae"


# ------------------------------------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm():
    from tests.engines.test_loaders_timm import _TorchvisionFinder
    import sys

    finder = _TorchvisionFinder()
    sys.meta_path.insert(0, finder)
    try:
        try:
            import timm as timm_module
            from timm.models.eva import Eva  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the installed timm
            pytest.skip(f"timm (Eva / DINOv3) cannot be imported even with a torchvision stand-in: {exc}")
        yield timm_module
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


@pytest.mark.parametrize("qkv_bias,swiglu", [(True, False), (False, True)])
def test_timm_dinov3_state_dict_matches_timm_forward(timm, tmp_path, randomize, qkv_bias, swiglu):
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    assert "vit_large_patch16_dinov3" in timm.list_models("*dinov3*")
    reference = Eva(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, qkv_bias=qkv_bias, init_values=1e-5,
        rope_type="dinov3", rope_temperature=100, use_rot_pos_emb=True, use_abs_pos_emb=False,
        rope_rotate_half=True, num_reg_tokens=4, use_fc_norm=False, norm_layer=partial(LayerNorm, eps=1e-5),
        global_pool="token", num_classes=3, dynamic_img_size=True, swiglu_mlp=swiglu, swiglu_align_to=8 if swiglu else 0,
    ).eval()
    randomize(reference, seed=4)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "timm_dinov3.safetensors"))
    # a timm state dict holds no head count or input size (published widths map to heads; this one does not)
    (tmp_path / "timm_dinov3.json").write_text(json.dumps({"image_size": 64, "num_attention_heads": 4}))
    model = engines.load(tmp_path / "timm_dinov3.safetensors")
    assert model.format == "timm-dinov3" and model.config.use_rope
    assert model.config.use_gated_mlp == swiglu and any("head.weight" in n for n in model.notes)
    x = pixels(model.config)
    with torch.no_grad():
        tokens = reference.forward_features(x)
    report(f"timm qkv_bias={qkv_bias} swiglu={swiglu} cls", max_diff(model.embed(x), tokens[:, 0]))
    assert max_diff(model.embed(x), tokens[:, 0]) <= TOL
    assert max_diff(model.network.forward_features(x)[1], tokens[:, 5:]) <= TOL


# ------------------------------------------------------------------------------------------------- family
def test_family_protocol_heads_and_one_encoder_pass(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=9)
    folder = hf_folder(hf, tmp_path)
    model = engines.load(folder)
    assert isinstance(model, ModelFamily) and isinstance(model, ExportsGraphs)
    assert model.family == "dinov3" and not model.supports_error_map and model.error_map_spec is None
    with pytest.raises(RuntimeError, match="no decoder"):
        model.error_map(pixels(config))
    described = model.describe()
    assert described["rope"] == "on" and described["register_tokens"] == 4 and described["backend"] == "cpu"
    generator = torch.Generator().manual_seed(0)
    for name, pooling in (("kl_grade", "cls"), ("meniscus", "patch_mean")):
        head = LinearHead(name, 32, ["a", "b", "c"], "softmax", encoder_sha256=model.encoder_hash, pooling=pooling)
        with torch.no_grad():
            head.linear.weight.copy_(torch.randn(3, 32, generator=generator))
        save_head(head, folder / "heads")
    assert "pooling" not in json.loads((folder / "heads" / "kl_grade.json").read_text())  # old files unchanged
    assert json.loads((folder / "heads" / "meniscus.json").read_text())["pooling"] == "patch_mean"
    model = engines.load(folder)
    assert model.inspect()["model_heads"]["meniscus"]["pooling"] == "patch_mean"
    x = pixels(config, batch=3)
    cls_ref, patches_ref = hf_features(hf, x, 4)
    calls = []
    original = model.backend.features
    model.backend.features = lambda t: calls.append(1) or original(t)
    embedding = model.embed(x)
    probs = model.predict(x, embedding=embedding)
    assert len(calls) == 1  # the worker's embed + predict(embedding=...) is one encoder pass
    with torch.no_grad():
        expected_cls = torch.softmax(model.heads["kl_grade"].linear(cls_ref.clone()), -1)
        expected_mean = torch.softmax(model.heads["meniscus"].linear(patches_ref.mean(1).clone()), -1)
    assert max_diff(probs["kl_grade"], expected_cls) <= TOL and max_diff(probs["meniscus"], expected_mean) <= TOL
    assert max_diff(model.predict(x)["meniscus"], expected_mean) <= TOL and len(calls) == 2
    assert max_diff(model.embed(x, pooling="patch_mean"), patches_ref.mean(1)) <= TOL


def test_pooled_head_is_refused_by_mae_and_foreign_pooling_refused(tmp_path, tiny_model):
    from engines.mae.family import MAEModel

    mae = MAEModel(tiny_model, name="mae")
    head = LinearHead("h", tiny_model.config.hidden_size, ["x"], "sigmoid", mae.encoder_hash, pooling="patch_mean")
    with pytest.raises(ValueError, match="offers only 'cls'"):
        mae.add_head(head)
    with pytest.raises(ValueError, match="pooling must be one of"):
        LinearHead("h", 4, ["x"], pooling="max")
    save_head(LinearHead("old", 4, ["x"], "sigmoid", encoder_sha256="0" * 64), tmp_path)
    assert load_head(tmp_path / "old.json").pooling == "cls"


def test_preprocessing_from_the_model_folder(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=10)
    folder = hf_folder(hf, tmp_path)
    custom = {"do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
              "size": {"height": 96, "width": 96}, "resample": 3, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.25, 0.25, 0.25], "rescale_factor": 1 / 255,
              "image_processor_type": "DINOv3ViTImageProcessorFast"}
    (folder / "preprocessor_config.json").write_text(json.dumps(custom))
    model = engines.load(folder)
    prep = model.preprocessing
    assert (prep.height, prep.width, prep.resample, prep.image_mean) == (96, 96, 3, (0.5, 0.5, 0.5))
    ds = make_dataset(synthetic_radiograph(300, 240), photometric="MONOCHROME1")
    x = preprocess(ds, preprocessing=model.preprocessing).tensor
    assert x.shape == (1, 3, 96, 96) and torch.equal(x[:, 0], x[:, 1])  # grey copied to RGB
    cls_ref, _ = hf_features(hf, x, 4)
    assert max_diff(model.embed(x), cls_ref) <= TOL  # RoPE at another grid than the config's image size
    custom["size"] = {"height": 100, "width": 100}
    (folder / "preprocessor_config.json").write_text(json.dumps(custom))
    with pytest.raises(CheckpointError, match="not a multiple of the patch size"):
        engines.load(folder)


# ------------------------------------------------------------------------------------------------- graphs, backends
@pytest.mark.parametrize("use_rope", [True, False])
def test_onnx_graph_matches_torch_with_dynamic_batch(tmp_path, use_rope):
    config = TINY["mlp-reg4"]
    model = ours_from_hf(make_hf_dinov3(config, seed=11), config, use_rope=use_rope)
    exported = model.export_onnx(tmp_path)
    assert set(exported.paths) == {"encoder_full"} and model.graph_names() == ("encoder_full",)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(exported.paths["encoder_full"]), options, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = pixels(config, batch=batch, seed=batch)
        cls, patch_mean = session.run(None, {"pixels": x.numpy()})
        features = model.features(x)
        report(f"onnx rope={'on' if use_rope else 'off'} batch {batch}", float(np.abs(cls - features["cls"].numpy()).max()))
        assert np.abs(cls - features["cls"].numpy()).max() <= TOL
        assert np.abs(patch_mean - features["patch_mean"].numpy()).max() <= TOL


def test_backends_cpu_precisions_and_tensorrt_fallback(tmp_path):
    config = TINY["mlp-reg4"]
    hf = make_hf_dinov3(config, seed=12)
    folder = hf_folder(hf, tmp_path)
    fp32 = engines.load(folder)
    x = pixels(config, batch=2)
    for precision in ("bf16", "int8"):
        other = engines.load(folder, precision=precision)
        assert other.precision == precision and other.encoder_hash == fp32.encoder_hash
        a, b = fp32.embed(x).flatten(), other.embed(x).flatten()
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.99
    auto = engines.load(folder, backend="auto")  # no CUDA here: tensorrt -> cuda -> cpu
    assert auto.backend_name == "cpu"
    with pytest.raises((ImportError, RuntimeError)):
        engines.load(folder, backend="tensorrt")
    with pytest.raises((ImportError, RuntimeError)):
        fp32.build_tensorrt(cache_dir=tmp_path / "plans")


def test_expected_shapes_cover_the_network():
    for config in TINY.values():
        network = DINOv3ViT(config)
        assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == expected_shapes(config)
        assert len(encoder_sha256(network)) == 64
