"""Reading a multi-head ``ViTForImageClassification`` folder: weights, config, head layout, preprocessing.

A folder is this family's when it holds ``head_layout.json`` (:mod:`engines.vit_classifier.layout`) beside:

- the weights: ``model.safetensors`` or ``pytorch_model.bin`` (or a sharded ``*.index.json``), as
  ``save_pretrained`` writes them, or else exactly one ``*.safetensors`` file (SKELEX's training script saves
  bare safetensors checkpoints; ``External_validation.py`` loads one with ``load_state_dict``);
- ``config.json`` (HF ``ViTConfig``, ``model_type`` ``vit``, or ``vit_mae`` when fine-tuned from SKELEX's MAE
  folder). Without one, the sizes are those of ``google/vit-large-patch16-224``, which is what SKELEX's
  ``External_validation.py`` builds the model from (ViT-L/16, 224 px, LayerNorm eps 1e-12);
- optionally ``preprocessor_config.json`` (default ImageNet mean/std, bilinear 224 x 224, as their torchvision
  ``Resize`` + ``Normalize``).

Tensor names are HF's (``vit.embeddings.*``, ``vit.encoder.layer.N.*``, ``vit.layernorm.*``, ``classifier.*``;
transformers 4.x and 5.x spellings); the encoder part maps onto the MAE family's canonical ViT (same blocks), so
the two families share one ViT implementation. Every problem is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from engines.imaging.preprocessor_config import PreprocessorConfig
from engines.mae.loaders import CheckpointError, check_shapes, folder_preprocessing, hf_filter_fn, read_state_file
from engines.mae.network import MAEConfig
from engines.vit_classifier.layout import LAYOUT_FILE, HeadLayout, HeadLayoutError, read_layout

FORMAT = "hf-vit-multihead"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
#: google/vit-large-patch16-224's config.json (the sizes SKELEX's External_validation.py instantiates).
VIT_LARGE_PATCH16_224: dict[str, Any] = {
    "model_type": "vit",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "layer_norm_eps": 1e-12,
    "qkv_bias": True,
}


@dataclass
class ClassifierCheckpoint:
    """A loaded folder: canonical encoder tensors, the classifier layer, the layout and how to preprocess."""

    config: MAEConfig
    encoder_state: dict[str, Tensor]
    classifier_weight: Tensor  # [num_outputs, hidden]
    classifier_bias: Tensor  # [num_outputs]
    layout: HeadLayout
    preprocessing: PreprocessorConfig
    source: Path
    weights_file: Path
    name: str
    version: str | None = None
    notes: list[str] = field(default_factory=list)


def is_vit_classifier(path: str | Path) -> bool:
    """Whether ``path`` is a folder of this family (it declares a head layout)."""
    return Path(path).is_dir() and (Path(path) / LAYOUT_FILE).is_file()


def weights_file(folder: Path) -> Path:
    """The folder's weights file (see the module docstring); a clear error when there is none or several."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file() or (folder / f"{name}.index.json").is_file():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise CheckpointError(f"{folder}: several *.safetensors files ({', '.join(c.name for c in candidates)}) "
                              f"and no {' or '.join(WEIGHT_FILES)}: keep one, or name it model.safetensors")
    raise CheckpointError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)} or one *.safetensors) beside "
                          f"{LAYOUT_FILE}")


def _read_weights(path: Path) -> dict[str, Tensor]:
    index = path.with_name(path.name + ".index.json")
    files = [path]
    if not path.is_file() and index.is_file():
        try:
            files = [path.parent / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from None
    state: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: shard listed in {index.name} is missing")
        try:
            raw = read_state_file(file)
        except Exception as exc:  # truncated / corrupt files raise library-specific errors
            raise CheckpointError(f"{file}: unreadable weights ({type(exc).__name__}: {exc})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
            raise CheckpointError(f"{file}: not a flat state dict of tensors")
        state.update(raw)
    return state


def read_hf_config(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``config.json`` (checked to be a ViT), or ViT-L/16's sizes when the folder has none."""
    path = folder / "config.json"
    if not path.is_file():
        note = ("no config.json: ViT-L/16 at 224 px assumed (google/vit-large-patch16-224, as SKELEX's "
                "External_validation.py)")
        return dict(VIT_LARGE_PATCH16_224), [note]
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if config.get("model_type") not in ("vit", "vit_mae"):
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r}: a ViT classifier needs 'vit' "
                              "(or 'vit_mae' for a fine-tune of SKELEX's folder)")
    architectures = config.get("architectures") or []
    if config.get("model_type") == "vit" and architectures and "ViTForImageClassification" not in architectures:
        raise CheckpointError(f"{path}: architectures {architectures}: expected ViTForImageClassification")
    return config, []


def load_classifier_checkpoint(folder: str | Path) -> ClassifierCheckpoint:
    """Read and check a folder of this family (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a multi-head classifier is a folder with {LAYOUT_FILE})")
    try:
        layout = read_layout(folder)
    except HeadLayoutError as exc:
        raise CheckpointError(str(exc)) from None
    hf_config, notes = read_hf_config(folder)
    try:
        config = MAEConfig.from_hf_dict(hf_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: {exc}") from None
    labels = hf_config.get("id2label")
    if isinstance(labels, dict) and labels and len(labels) != layout.num_outputs:
        raise CheckpointError(f"{folder / 'config.json'}: id2label has {len(labels)} outputs, {LAYOUT_FILE} "
                              f"num_outputs says {layout.num_outputs}")
    path = weights_file(folder)
    config, state, weight, bias = split_state(_read_weights(path), config, layout, path)
    meta = hf_config if (folder / "config.json").is_file() else {}
    return ClassifierCheckpoint(
        config=config, encoder_state=state, classifier_weight=weight,
        classifier_bias=bias, layout=layout, preprocessing=folder_preprocessing(folder, config),
        source=folder, weights_file=path, name=str(meta.get("msknode_name", folder.name)),
        version=meta.get("msknode_version"), notes=notes,
    )


def split_state(
    raw: dict[str, Tensor], config: MAEConfig, layout: HeadLayout, source: Path
) -> tuple[MAEConfig, dict[str, Tensor], Tensor, Tensor]:
    """HF ``ViTForImageClassification`` tensors -> (config, canonical fp32 encoder tensors, classifier weight,
    bias), checked against the config and the layout; errors name ``source``."""
    raw = dict(raw)
    missing = [key for key in CLASSIFIER_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{source}: no {' / '.join(missing)}: an encoder without its classification layer "
                              "(e.g. SKELEX's MAE checkpoint) cannot be a multi-head classifier")
    weight, bias = raw.pop("classifier.weight").float(), raw.pop("classifier.bias").float()
    expected = (layout.num_outputs, config.hidden_size)
    if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
        raise CheckpointError(f"{source}: classifier.weight {tuple(weight.shape)} / classifier.bias "
                              f"{tuple(bias.shape)} do not fit {LAYOUT_FILE} ({layout.num_outputs} outputs) on a "
                              f"{config.hidden_size}-wide encoder")
    decoder = sorted(key for key in raw if key.startswith("decoder."))
    if decoder:
        raise CheckpointError(f"{source}: {len(decoder)} MAE decoder tensors (e.g. {decoder[0]}): this is a "
                              "pre-training checkpoint, not a fine-tuned classifier")
    try:
        state = hf_filter_fn(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    check_shapes(state, config, False, source)
    return config, state, weight.contiguous(), bias.contiguous()
