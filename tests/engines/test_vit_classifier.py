"""The multi-head ViT classifier family (SKELEX's region-guided tumour model): layout, loader, parity with
transformers' ViTForImageClassification (tiny config from disk; ViT-L/16 with 38 outputs in memory), and a
synthetic image whose answer is known (a bright lesion seen only in its crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import engines
from engines.imaging.geometry import SourceGeometry
from engines.imaging.regions import high_error_regions, highest_error_region
from engines.loading import detect_family
from engines.mae.loaders import CheckpointError
from engines.mae.network import MAEConfig
from engines.vit_classifier.family import ViTClassifierModel, load_vit_classifier
from engines.vit_classifier.layout import (
    LAYOUT_FILE,
    HeadLayoutError,
    parse_layout,
    read_layout,
    skelex_region_guided_layout,
    write_layout,
)
from engines.vit_classifier.loaders import (
    VIT_LARGE_PATCH16_224,
    load_classifier_checkpoint,
    read_hf_config,
    split_state,
)
from engines.vit_classifier.region_guided import CropBox, activate, aggregate, boxes_around_regions

TOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, layer_norm_eps=1e-12, qkv_bias=True)


def hf_classifier(num_labels: int = 38, seed: int = 0, **sizes):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(**{**TINY, **sizes}, num_labels=num_labels)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot pass by luck
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "cls_token" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def write_folder(folder: Path, model, layout=None) -> Path:
    model.save_pretrained(folder)
    write_layout(folder, layout or skelex_region_guided_layout())
    return folder


def reference_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The released grouping, written out: sigmoid 0 and 37, softmax 1-4, 5-33, 34-36."""
    out = torch.empty_like(logits)
    out[:, [0, 37]] = torch.sigmoid(logits[:, [0, 37]])
    out[:, 1:5] = torch.softmax(logits[:, 1:5], dim=1)
    out[:, 5:34] = torch.softmax(logits[:, 5:34], dim=1)
    out[:, 34:37] = torch.softmax(logits[:, 34:37], dim=1)
    return out


# ------------------------------------------------------------------------------------------------ layout
def test_skelex_layout_covers_38_outputs_in_five_groups():
    layout = skelex_region_guided_layout()
    assert layout.num_outputs == 38
    assert {g.name: (g.activation, len(g.indices)) for g in layout.groups} == {
        "abnormal": ("sigmoid", 1), "implant": ("sigmoid", 1), "tumour_class": ("softmax", 4),
        "fracture_type": ("softmax", 3), "site": ("softmax", 29)}
    assert sorted(i for g in layout.groups for i in g.indices) == list(range(38))
    assert layout.group("site").labels[0] == "carpal bones" and layout.group("site").labels[-1] == "ulna diaphysis"
    assert [(f.name, f.sum_of, f.inclusive, f.requires) for f in layout.findings] == [
        ("bone_tumour", (1, 2, 3), False, None), ("malignancy", (1,), True, "bone_tumour")]
    assert parse_layout(layout.to_dict()) == layout


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["groups"][2].update(indices=[1, 2, 3, 4, 0], labels=list("abcde")), "groups[2].indices"),
    (lambda d: d["groups"][2]["indices"].pop(), "groups[2].labels"),
    (lambda d: d["groups"][4].update(indices=list(range(5, 33)), labels=d["groups"][4]["labels"][:28]), "groups"),
    (lambda d: d["groups"][0].update(activation="relu"), "groups[0].activation"),
    (lambda d: d["groups"][1].update(indices=[38]), "groups[1].indices"),
    (lambda d: d["findings"][1].update(requires="nothing"), "findings[1].requires"),
    (lambda d: d["findings"][0].update(sum_of=[0, 1]), "findings[0].sum_of"),
    (lambda d: d["findings"][0].update(threshold=1.5), "findings[0].threshold"),
    (lambda d: d.update(extra=1), "extra"),
])
def test_layout_errors_name_the_key(change, key):
    data = skelex_region_guided_layout().to_dict()
    change(data)
    with pytest.raises(HeadLayoutError) as caught:
        parse_layout(data, "x/head_layout.json")
    assert f"x/head_layout.json: {key}:" in str(caught.value)


def test_missing_or_broken_layout_file_is_named(tmp_path):
    with pytest.raises(HeadLayoutError, match="head_layout.json: missing"):
        read_layout(tmp_path)
    (tmp_path / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(HeadLayoutError, match="not readable JSON"):
        read_layout(tmp_path)


# ------------------------------------------------------------------------------------------------ parity
def test_tiny_parity_with_transformers_and_detection(tmp_path):
    hf = hf_classifier()
    folder = write_folder(tmp_path / "clf", hf)
    assert detect_family(folder) == "vit-classifier"
    model = engines.load(folder)
    assert isinstance(model, ViTClassifierModel) and not model.supports_error_map
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(pixel_values=x).logits
    assert (model.logits(x) - reference).abs().max() <= TOL
    assert (model.probabilities(x) - reference_probabilities(reference)).abs().max() <= TOL
    predicted = model.predict(x)
    assert list(predicted) == ["bone_tumour", "malignancy", "abnormal", "implant", "tumour_class",
                               "fracture_type", "site"]
    expected = reference_probabilities(reference)
    assert (predicted["bone_tumour"][:, 0] - expected[:, 1:4].sum(1)).abs().max() <= TOL
    assert (predicted["site"] - expected[:, 5:34]).abs().max() <= TOL
    assert torch.allclose(predicted["tumour_class"].sum(1), torch.ones(3), atol=1e-5)
    info = model.inspect()
    assert info["outputs"] == 38 and info["output_groups"]["site"]["indices"] == "5-33"
    assert info["output_groups"]["implant"]["indices"] == "37"


def test_safetensors_beside_the_layout_without_config_is_read_as_vit_l(tmp_path):
    """SKELEX's External_validation.py: a bare .safetensors + google/vit-large-patch16-224's sizes."""
    hf = hf_classifier()
    folder = write_folder(tmp_path / "bare", hf)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()
    save_file(state, str(folder / "checkpoint-best.safetensors"))
    with pytest.raises(CheckpointError, match=r"checkpoint-best.safetensors: classifier.weight \(38, 32\).*1024-wide"):
        load_classifier_checkpoint(folder)  # tiny tensors, ViT-L/16 sizes assumed: refused, naming the file
    config, notes = read_hf_config(folder)
    assert config["hidden_size"] == 1024 and "google/vit-large-patch16-224" in notes[0]
    save_file(state, str(folder / "other.safetensors"))
    with pytest.raises(CheckpointError, match="several"):
        load_classifier_checkpoint(folder)


def test_wrong_and_partial_files_are_refused_clearly(tmp_path):
    hf = hf_classifier()
    folder = write_folder(tmp_path / "clf", hf)
    weights = folder / "model.safetensors"
    state = {k: v.clone() for k, v in load_file(str(weights)).items()}  # not a view of the file we overwrite
    # truncated download
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable weights"):
        load_classifier_checkpoint(folder)
    # an encoder without its classifier (SKELEX's MAE folder, or a ViTModel)
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, str(weights))
    with pytest.raises(CheckpointError, match="no classifier.weight / classifier.bias"):
        load_classifier_checkpoint(folder)
    # a missing encoder tensor
    save_file({k: v for k, v in state.items() if "layernorm_after" not in k or ".1." not in k}, str(weights))
    with pytest.raises(CheckpointError, match="missing 2 tensors"):
        load_classifier_checkpoint(folder)
    # layout and classifier disagree
    save_file(state, str(weights))
    layout = skelex_region_guided_layout().to_dict()
    layout["num_outputs"] = 39
    layout["groups"][1]["indices"] = [37, 38]
    layout["groups"][1]["labels"] = ["Implant", "Other"]
    (folder / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match="id2label has 38 outputs"):
        load_classifier_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"], config["label2id"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"classifier.weight \(38, 32\).*39 outputs"):
        load_classifier_checkpoint(folder)
    # no weights at all
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_classifier_checkpoint(folder)
    # not a ViT
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit"}))
    with pytest.raises(CheckpointError, match="model_type 'dinov3_vit'"):
        load_classifier_checkpoint(folder)


def test_vit_l16_with_38_outputs_matches_transformers():
    """The released model's shape: google/vit-large-patch16-224 with 38 labels (random weights, in memory)."""
    from transformers import ViTConfig, ViTForImageClassification

    sizes = {k: v for k, v in VIT_LARGE_PATCH16_224.items() if k != "model_type"}
    with torch.device("meta"):
        hf = ViTForImageClassification(ViTConfig(**sizes, num_labels=38))
    hf = hf.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            scale = 0.05 if param.dim() == 1 else 0.02
            param.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + scale * torch.randn(param.shape, generator=generator))
    state = hf.state_dict()
    assert len(state) == 392  # the 390 encoder tensors of SKELEX's checkpoint + classifier.weight/bias
    layout = skelex_region_guided_layout()
    config, encoder_state, weight, bias = split_state(state, MAEConfig.from_hf_dict(VIT_LARGE_PATCH16_224),
                                                      layout, Path("vit-l-38"))
    from engines.vit_classifier.loaders import ClassifierCheckpoint
    from engines.imaging.preprocessor_config import PreprocessorConfig

    model = ViTClassifierModel.from_checkpoint(ClassifierCheckpoint(
        config, encoder_state, weight, bias, layout, PreprocessorConfig.square(224), Path("vit-l-38"),
        Path("vit-l-38/model.safetensors"), "vit-l-38"))
    assert model.inspect()["parameters"] == sum(p.numel() for p in hf.parameters()) == 303_340_582
    x = torch.randn(1, 3, 224, 224, generator=generator)
    with torch.no_grad():
        reference = hf(pixel_values=x).logits
    difference = float((model.logits(x) - reference).abs().max())
    print(f"PARITY ViT-L/16 38 outputs: max |logit difference| {difference:.3g} (logit std {reference.std():.3g})")
    assert reference.std() > 0.1  # outputs that differ, so the comparison means something
    assert difference <= TOL


# ------------------------------------------------------------------------------------------------ regions
def test_high_error_regions_rank_components_and_keep_the_highest_as_before():
    geometry = SourceGeometry(rows=448, columns=448)
    error = np.zeros((224, 224))
    error[20:30, 20:30] = 1.0  # sum 100
    error[100:120, 150:170] = 2.0  # sum 800: the highest
    error[200:204, 10:14] = 3.0  # sum 48
    regions = high_error_regions(error, geometry, percentile=90.0, max_regions=3)
    assert [round(r.mean_error) for r in regions] == [2, 1, 3]
    first = highest_error_region(error, geometry, percentile=90.0)
    assert np.array_equal(first.polygon, regions[0].polygon)
    boxes = boxes_around_regions(regions, geometry, (448, 448), context=2.0, min_fraction=0.1)
    # region 1: columns 150..170, rows 100..120 in model space = 300..340, 200..240 in source: 80 px crop
    assert (boxes[0].left, boxes[0].top, boxes[0].right, boxes[0].bottom) == (280, 180, 360, 260)
    assert high_error_regions(np.ones((224, 224)), geometry) == []


def test_boxes_stay_inside_the_image():
    geometry = SourceGeometry(rows=100, columns=200)
    error = np.zeros((224, 224))
    error[0:10, 214:224] = 1.0  # top-right corner
    (box,) = boxes_around_regions(high_error_regions(error, geometry, max_regions=1), geometry, (100, 200),
                                  context=3.0, min_fraction=0.5)
    assert box.right == 200 and box.top == 0 and box.right - box.left == 50 and box.bottom == 50


def test_aggregate_is_the_released_rule():
    layout = skelex_region_guided_layout()
    probs = np.zeros((3, 38))
    probs[:, 4] = 1.0  # no tumour everywhere ...
    probs[1, [1, 2, 3, 4]] = [0.10, 0.25, 0.20, 0.45]  # ... except crop 1: tumour sum 0.55 > 0.5, p1 0.10
    probs[2, [1, 2, 3, 4]] = [0.30, 0.00, 0.00, 0.70]  # crop 2: p1 0.30 (the max p1), sum 0.30
    probs[:, 0] = [0.2, 0.9, 0.4]
    boxes = [CropBox(0, 0, 10, 10, "whole image"), CropBox(0, 0, 5, 5, "error region 1"),
             CropBox(5, 5, 10, 10, "error region 2")]
    result = aggregate(probs, boxes, layout)
    tumour, malignancy = result.findings
    assert (tumour.score, tumour.crop, tumour.positive, tumour.decision) == (pytest.approx(0.55), 1, True, "present")
    assert (malignancy.score, malignancy.crop, malignancy.decision) == (pytest.approx(0.30), 2, "benign")
    values = result.head_values(layout)
    assert values["abnormal"] == [pytest.approx(0.9)] and values["tumour_class"][0] == pytest.approx(0.30)
    # exactly 0.5: tumour needs > (absent, so malignancy is not decided); malignant needs >= (malignant)
    probs[1, [1, 2, 3, 4]] = [0.5, 0.0, 0.0, 0.5]
    tumour, malignancy = aggregate(probs, boxes, layout).findings
    assert tumour.decision == "absent" and malignancy.positive is None and malignancy.decision is None
    probs[1, [1, 2, 3, 4]] = [0.5, 0.1, 0.0, 0.4]
    tumour, malignancy = aggregate(probs, boxes, layout).findings
    assert tumour.decision == "present" and malignancy.decision == "malignant"
    # a detector's "left" / "right" boxes are not counted
    labelled = [boxes[0], CropBox(0, 0, 5, 5, "Left"), boxes[2]]
    assert aggregate(probs, labelled, layout).findings[0].decision == "absent"


# ------------------------------------------------------------------------------------------------ known answer
def brightness_classifier(folder: Path) -> Path:
    """A ViT-B-free toy whose answer is known: 'malignant' when most patches of its input are bright.

    One block with q = k = 0 (uniform attention), v = o = identity and no MLP: the CLS token becomes the mean of
    the layer-normed tokens; a patch token is [mean normalised brightness, 0, ...], so after the norm it is
    +/- the same vector, and the final norm keeps only the sign of (bright patches - dark patches). Logit 1
    (malignant) = +5 * that feature, logit 4 (no tumour) = -5 * it.
    """
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                       image_size=224, patch_size=16, num_labels=38, layer_norm_eps=1e-6)
    model = ViTForImageClassification(config).eval()
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for key in state:
        if "layernorm" in key and key.endswith("weight"):
            state[key] = torch.ones_like(state[key])
    state["vit.embeddings.patch_embeddings.projection.weight"][0] = 1.0 / (3 * 16 * 16)
    for name in ("v_proj", "o_proj"):
        state[f"vit.layers.0.attention.{name}.weight"] = torch.eye(32)
    state["classifier.weight"][1, 0] = 5.0
    state["classifier.weight"][4, 0] = -5.0
    model.load_state_dict(state)
    return write_folder(folder, model)


def lesion_image() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    image = np.full((512, 512), 10, dtype=np.uint8)  # dark bone background
    top, left, size = 300, 120, 64
    image[top:top + size, left:left + size] = 250  # a bright lesion, 1.6 % of the image
    return image, (left, top, left + size, top + size)


def test_known_answer_tumour_only_in_the_error_region_crop(tmp_path):
    model = load_vit_classifier(brightness_classifier(tmp_path / "toy"))
    image, (left, top, right, bottom) = lesion_image()
    geometry = SourceGeometry(rows=512, columns=512)
    error = np.zeros((224, 224), dtype=np.float32)  # an error map that found the lesion (model space)
    error[top * 224 // 512:bottom * 224 // 512, left * 224 // 512:right * 224 // 512] = 1.0
    error[10:14, 10:14] = 0.2  # a weaker second region, on background
    regions = high_error_regions(error, geometry, percentile=98.0, max_regions=2)
    boxes = boxes_around_regions(regions, geometry, image.shape, context=1.2, min_fraction=0.05)
    result = model.region_guided(image, boxes)
    tumour, malignancy = result.findings
    assert result.boxes[0].label == "whole image" and len(result.boxes) == 3
    assert tumour.decision == "present" and tumour.crop == 1 and tumour.score > 0.9
    assert malignancy.decision == "malignant"
    assert result.probabilities[0, 4] > 0.9  # the whole image alone: no tumour
    assert result.probabilities[2, 4] > 0.9  # the background region: no tumour
    # the whole image only (no regions): the released rule says no tumour
    tumour, malignancy = model.region_guided(image, []).findings
    assert tumour.decision == "absent" and malignancy.decision is None
    # whole-image predict() agrees with the whole-image row of region_guided
    whole = torch.from_numpy(np.ascontiguousarray(result.probabilities[0])).float()
    from engines.imaging.preprocess import tensor_from_uint8

    predicted = model.predict(tensor_from_uint8(image, model.preprocessing)[None])
    assert torch.allclose(predicted["tumour_class"][0], whole[1:5], atol=1e-5)


def test_activate_refuses_wrong_width():
    with pytest.raises(ValueError, match="expected 38 logits"):
        activate(torch.zeros(1, 37), skelex_region_guided_layout())


def test_model_info_describes_the_layout(tmp_path):
    from typer.testing import CliRunner

    from node.cli import app

    folder = write_folder(tmp_path / "clf", hf_classifier())
    result = CliRunner().invoke(app, ["model", "info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == "vit-classifier" and info["format"] == "hf-vit-multihead" and info["outputs"] == 38
    assert info["output_groups"]["tumour_class"] == {
        "activation": "softmax", "indices": "1-4", "labels": ["malignant", "intermediate", "benign", "No bone tumor"]}
    malignancy = info["findings"]["malignancy"]
    assert malignancy["rule"] == ">= 0.5" and malignancy["requires"] == "bone_tumour"
    table = CliRunner().invoke(app, ["model", "info", str(folder)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "fracture_type: {'activation': 'softmax', 'indices': '34-36'" in table.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / LAYOUT_FILE).write_text("{}")
    result = CliRunner().invoke(app, ["model", "info", str(broken)])
    assert result.exit_code == 1 and "head_layout.json: format" in result.output.replace("\n", "")
