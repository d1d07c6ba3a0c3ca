"""Checkpoint loaders: detect a format on disk and map its tensors onto our canonical (MAE / timm) layout.

Formats (``detect_format`` returns these names):

- ``hf-vitmae``: a Hugging Face ``ViTMAEForPreTraining`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), the SKELEX release format. Sizes and ``layer_norm_eps`` come from ``config.json``.
- ``hf-vit-classification``: a Hugging Face ``ViTForImageClassification`` folder (SKELEX's downstream
  fine-tunes): encoder only, plus a head from ``classifier.*`` named by ``id2label``.
- ``mae-pth``: the original MAE ``torch.save`` dict with a ``model`` key (fused qkv, ``blocks.i``,
  ``decoder_blocks.j``); the released ``mae_pretrain_*`` files are encoder only.
- ``timm``: a timm ``VisionTransformer`` state dict with MAE-style names (``.pth``/``.bin``/``.safetensors``,
  or a timm Hub folder with ``config.json`` holding ``architecture``).

Each loader is a *filter function* in the timm sense: foreign names in, canonical names out. Shapes are
checked against the config before anything is loaded, and mismatches are refused with a message that names
the first offending tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from engines.imaging.preprocessor_config import (
    PreprocessorConfig,
    PreprocessorConfigError,
    read_preprocessor_config,
    write_preprocessor_config,
)
from engines.mae.network import MAEConfig, MaskedAutoencoderViT, expected_shapes, is_encoder_key

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# MAE's published widths -> heads (head_dim 64 except ViT-H/14's 80); used when a .pth carries no config.
MAE_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
MAE_LAYER_NORM_EPS = 1e-6  # original MAE and timm; HF configs say 1e-12


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why."""


@dataclass
class LoadedCheckpoint:
    """What a loader produces before an :class:`~engines.mae.family.MAEModel` is built around it."""

    format: str
    config: MAEConfig
    state: dict[str, Tensor]  # canonical names, fp32
    has_decoder: bool
    source: Path
    classifier: dict[str, Any] | None = None  # HF classification head: weight, bias, labels, activation
    notes: list[str] = field(default_factory=list)
    preprocessing: PreprocessorConfig | None = None  # None: ImageNet at config.image_size (no preprocessor file)

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = PreprocessorConfig.square(self.config.image_size)


# ------------------------------------------------------------------------------------------- raw reading
def read_state_file(path: Path) -> dict[str, Any]:
    """Read a state file without executing pickled code (``weights_only``; argparse args allowed for MAE)."""
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def read_folder_weights(folder: Path) -> dict[str, Tensor]:
    """A HF folder's tensors: single file or a sharded ``*.index.json``."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(read_state_file(folder / shard))
            return state
    raise CheckpointError(f"{folder}: no {' or '.join(WEIGHT_FILES)} found")


def detect_format(path: str | Path) -> str:
    """Name the checkpoint format at ``path`` from what is on disk (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: a model folder needs a config.json")
        config = json.loads(config_path.read_text())
        if "architecture" in config and "model_type" not in config:
            return "timm"
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type == "vit_mae":
            return "hf-vitmae"
        if model_type == "vit":
            if architectures and "ViTForImageClassification" not in architectures:
                raise CheckpointError(f"{path}: ViT architecture {architectures} is not supported")
            return "hf-vit-classification"
        raise CheckpointError(f"{path}: unsupported model_type {model_type!r} in config.json")
    if path.is_file() and path.suffix in STATE_FILE_SUFFIXES:
        raw = read_state_file(path)
        if isinstance(raw.get("model"), dict):
            return "mae-pth"
        keys = [k for k in raw if isinstance(raw[k], Tensor)]
        if any(k.startswith("blocks.") for k in keys):
            return "timm"
        if any(k.startswith("vit.") for k in keys):
            raise CheckpointError(f"{path}: Hugging Face tensors without their folder; load the folder instead")
        raise CheckpointError(f"{path}: no MAE / timm / HF ViT tensors recognised")
    raise CheckpointError(f"{path}: not a model folder or a state file ({', '.join(STATE_FILE_SUFFIXES)})")


# ------------------------------------------------------------------------------------------- HF filters
_HF_BLOCK_RENAMES = (  # order matters: "attention.output.dense" before "output.dense"
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.attention.query.", "attn.q."),
    ("attention.attention.key.", "attn.k."),
    ("attention.attention.value.", "attn.v."),
    ("attention.q_proj.", "attn.q."),
    ("attention.k_proj.", "attn.k."),
    ("attention.v_proj.", "attn.v."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
# transformers 4.x writes decoder.decoder_layers.j; 5.x writes decoder.decoder_encoder.layer.j when saving
# and names them decoder.decoder_layers.j in memory; the encoder is vit.encoder.layer.i (4.x) or vit.layers.i.
_HF_BLOCK_PATTERNS = (
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\.(.+)$"), "blocks"),
    (re.compile(r"^vit\.layers\.(\d+)\.(.+)$"), "blocks"),
    (re.compile(r"^decoder\.decoder_layers\.(\d+)\.(.+)$"), "decoder_blocks"),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\.(.+)$"), "decoder_blocks"),
)
_HF_DIRECT = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
}
_HF_DECODER_DIRECT = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_norm", "decoder_pred")
_HF_IGNORED = ("vit.pooler.", "classifier.", "vit.embeddings.mask_token")


def hf_filter_fn(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ViTMAE / ViT names (transformers 4.x or 5.x) -> canonical names, with q/k/v fused into qkv."""
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key in _HF_DIRECT:
            out[_HF_DIRECT[key]] = tensor
            continue
        if key.startswith(_HF_IGNORED):
            continue
        if key.startswith("decoder.") and key[len("decoder.") :].startswith(_HF_DECODER_DIRECT):
            out[key[len("decoder.") :]] = tensor
            continue
        for pattern, prefix in _HF_BLOCK_PATTERNS:
            match = pattern.match(key)
            if match:
                rest = match.group(2)
                for old, new in _HF_BLOCK_RENAMES:
                    if rest.startswith(old):
                        rest = new + rest[len(old) :]
                        break
                else:
                    unknown.append(key)
                    break
                name = f"{prefix}.{match.group(1)}.{rest}"
                qkv = re.match(r"^(.+\.attn)\.([qkv])\.(weight|bias)$", name)
                if qkv:
                    parts.setdefault(f"{qkv.group(1)}.qkv.{qkv.group(3)}", {})[qkv.group(2)] = tensor
                else:
                    out[name] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised Hugging Face tensors: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for name, qkv_parts in parts.items():
        if set(qkv_parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{name}: query/key/value incomplete ({sorted(qkv_parts)})")
        out[name] = torch.cat([qkv_parts["q"], qkv_parts["k"], qkv_parts["v"]], dim=0)
    return out


def to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical -> HF ``ViTMAEForPreTraining`` names as transformers 4.x saved them (SKELEX's file layout)."""
    block_renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    inverse_direct = {v: k for k, v in _HF_DIRECT.items()}
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key in inverse_direct:
            out[inverse_direct[key]] = tensor
            continue
        match = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match:
            group, index, module, kind = match.groups()
            prefix = f"vit.encoder.layer.{index}" if group == "blocks" else f"decoder.decoder_layers.{index}"
            if module == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                    out[f"{prefix}.attention.attention.{part}.{kind}"] = chunk.clone()
            else:
                out[f"{prefix}.{block_renames[module]}.{kind}"] = tensor
            continue
        if key.startswith(_HF_DECODER_DIRECT):
            out[f"decoder.{key}"] = tensor
            continue
        raise CheckpointError(f"no Hugging Face name for canonical tensor {key!r}")
    return out


# ------------------------------------------------------------------------------------------- MAE / timm filters
_TIMM_IGNORED = ("head.", "head_drop.", "fc_norm.")


def mae_filter_fn(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """MAE / timm names are already canonical: drop classifier heads; refuse avg-pool models without ``norm``."""
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise CheckpointError(
            "this timm/MAE model uses global average pooling (fc_norm, no final norm): it has no "
            "'CLS after the final norm' embedding"
        )
    return {k: v for k, v in state.items() if not k.startswith(_TIMM_IGNORED) and isinstance(v, Tensor)}


def infer_config_from_state(state: dict[str, Tensor], eps: float = MAE_LAYER_NORM_EPS) -> MAEConfig:
    """Sizes from tensor shapes (MAE/timm files carry no config); heads from MAE's published widths."""
    try:
        dim = state["cls_token"].shape[-1]
        proj = state["patch_embed.proj.weight"]
    except KeyError as exc:
        raise CheckpointError(f"missing encoder tensor {exc.args[0]!r}") from None
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    num_patches = state["pos_embed"].shape[1] - 1
    grid = int(round(num_patches**0.5))
    kwargs: dict[str, Any] = dict(
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=MAE_HEADS_BY_WIDTH.get(dim, max(1, dim // 64)),
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=proj.shape[-1],
        image_size=grid * proj.shape[-1],
        num_channels=proj.shape[1],
        layer_norm_eps=eps,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )
    if "decoder_embed.weight" in state:
        ddim = state["decoder_embed.weight"].shape[0]
        kwargs.update(
            decoder_hidden_size=ddim,
            decoder_num_hidden_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
            decoder_num_attention_heads=16 if ddim % 16 == 0 else max(1, ddim // 64),
            decoder_intermediate_size=state["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        )
    return MAEConfig(**kwargs)


def _sidecar_config(path: Path) -> dict[str, Any] | None:
    """An optional ``<file>.json`` or ``config.json`` next to a state file overrides inferred sizes."""
    for candidate in (path.with_suffix(path.suffix + ".json"), path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


# ------------------------------------------------------------------------------------------- checks
def check_shapes(state: dict[str, Tensor], config: MAEConfig, has_decoder: bool, source: Path) -> None:
    """Refuse a state whose tensors do not match the config, naming the offending tensors."""
    expected = expected_shapes(config, with_decoder=has_decoder)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:4]) + (" ..." if len(mismatched) > 4 else ""))
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit its config ({', '.join(problems)})")


def _split_decoder(state: dict[str, Tensor]) -> bool:
    decoder_keys = [k for k in state if not is_encoder_key(k)]
    return bool(decoder_keys)


def _fp32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def folder_preprocessing(folder: Path, config: MAEConfig) -> PreprocessorConfig:
    """The folder's ``preprocessor_config.json`` (ImageNet at the model's size if absent); it must fit the model."""
    try:
        preprocessing = read_preprocessor_config(folder, default=PreprocessorConfig.square(config.image_size))
    except PreprocessorConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if (preprocessing.height, preprocessing.width) != (config.image_size, config.image_size):
        raise CheckpointError(
            f"{folder}: preprocessor_config.json resizes to {preprocessing.height} x {preprocessing.width}, "
            f"the model takes {config.image_size} x {config.image_size}"
        )
    return preprocessing


# ------------------------------------------------------------------------------------------- loaders
def load_hf_vitmae(folder: Path) -> LoadedCheckpoint:
    config = MAEConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    state = _fp32(hf_filter_fn(read_folder_weights(folder)))
    has_decoder = _split_decoder(state)
    check_shapes(state, config, has_decoder, folder)
    return LoadedCheckpoint(
        "hf-vitmae", config, state, has_decoder, folder, preprocessing=folder_preprocessing(folder, config)
    )


def classifier_activation(hf_config: dict[str, Any], num_labels: int) -> str:
    """``problem_type`` decides: multi-label -> sigmoid, single-label -> softmax, regression -> identity.

    Unset: one output is a binary logit (SKELEX trains binary tasks with 1 logit + BCE) -> sigmoid, else softmax.
    """
    problem = hf_config.get("problem_type")
    if problem == "multi_label_classification":
        return "sigmoid"
    if problem == "single_label_classification":
        return "softmax"
    if problem == "regression":
        return "identity"
    return "sigmoid" if num_labels == 1 else "softmax"


def load_hf_vit_classification(folder: Path) -> LoadedCheckpoint:
    hf_config = json.loads((folder / "config.json").read_text())
    config = MAEConfig.from_hf_dict(hf_config)
    raw = read_folder_weights(folder)
    state = _fp32(hf_filter_fn(raw))
    check_shapes(state, config, False, folder)
    classifier = None
    if "classifier.weight" in raw:
        weight = raw["classifier.weight"].float()
        id2label = hf_config.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(weight.shape[0])]
        classifier = {
            "name": hf_config.get("finetuning_task") or folder.name,
            "weight": weight,
            "bias": raw.get("classifier.bias", torch.zeros(weight.shape[0])).float(),
            "labels": labels,
            "activation": classifier_activation(hf_config, weight.shape[0]),
        }
    return LoadedCheckpoint(
        "hf-vit-classification", config, state, False, folder, classifier=classifier,
        preprocessing=folder_preprocessing(folder, config),
    )


def load_mae_or_timm(path: Path, fmt: str) -> LoadedCheckpoint:
    if path.is_dir():  # timm Hub folder: config.json with "architecture" + model.safetensors / pytorch_model.bin
        raw: dict[str, Any] = read_folder_weights(path)
        sidecar = None
    else:
        raw = read_state_file(path)
        sidecar = _sidecar_config(path)
    if fmt == "mae-pth":
        raw = raw["model"]
    state = _fp32(mae_filter_fn(raw))
    config = infer_config_from_state(state)
    has_decoder = _split_decoder(state)
    if sidecar and any(k in sidecar for k in ("hidden_size", "num_attention_heads", "layer_norm_eps")):
        if not has_decoder:  # decoder sizes are meaningless without decoder tensors
            sidecar = {k: v for k, v in sidecar.items() if not k.startswith("decoder_")}
        config = MAEConfig.from_hf_dict({**config.to_hf_dict(), **sidecar})
    check_shapes(state, config, has_decoder, path)
    notes = [] if has_decoder else ["encoder only: embeddings work, error maps need a decoder"]
    preprocessing = folder_preprocessing(path, config) if path.is_dir() else None
    return LoadedCheckpoint(fmt, config, state, has_decoder, path, notes=notes, preprocessing=preprocessing)


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Detect the format at ``path`` and return canonical fp32 tensors with their config."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf-vitmae":
        return load_hf_vitmae(path)
    if fmt == "hf-vit-classification":
        return load_hf_vit_classification(path)
    return load_mae_or_timm(path, fmt)


def build_model(checkpoint: LoadedCheckpoint) -> MaskedAutoencoderViT:
    """Allocate the model for a loaded checkpoint and copy its tensors in (strict)."""
    # Built on the meta device and filled by assignment: random initialisation of ViT-L costs ~15 s on a
    # small CPU and would be overwritten anyway.
    with torch.device("meta"):
        model = MaskedAutoencoderViT(checkpoint.config, with_decoder=checkpoint.has_decoder)
    model.load_state_dict(checkpoint.state, strict=True, assign=True)
    for name, param in model.named_parameters():
        param.requires_grad_("pos_embed" not in name)  # fixed sin-cos tables stay frozen
    return model.eval()


# ------------------------------------------------------------------------------------------- writing
def save_hf_vitmae(
    model: MaskedAutoencoderViT, folder: str | Path, preprocessing: PreprocessorConfig | None = None
) -> Path:
    """Write ``model`` as a HF ``ViTMAEForPreTraining`` folder (transformers 4.x tensor names, like SKELEX).

    ``preprocessor_config.json`` gets ``preprocessing`` (default: ImageNet, bilinear, at the model's size).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict({k: v.detach().float().contiguous() for k, v in model.state_dict().items()})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_hf_dict()
    if not model.has_decoder:
        config["architectures"] = ["ViTMAEModel"]
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_preprocessor_config(folder, preprocessing or PreprocessorConfig.square(model.config.image_size))
    return folder
