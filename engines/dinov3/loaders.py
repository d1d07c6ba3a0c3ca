"""DINOv3 checkpoint loaders: recognise a format on disk and map its tensors onto our canonical (authors') layout.

Formats (:func:`detect_format` returns these names):

- ``hf-dinov3``: a Hugging Face ``DINOv3ViTModel`` folder (``config.json`` with ``model_type: dinov3_vit`` +
  ``model.safetensors`` / ``pytorch_model.bin`` / a sharded index). Names as transformers saves them
  (``layer.N.attention.q_proj``) or as it holds them in memory (``model.layer.N...``); q/k/v fused into qkv with
  a zero key bias unless ``key_bias``.
- ``dinov3-pth``: the authors' ``torch.save`` state dict (Meta's DINOv3 releases, OrthoFoundation's
  ``OrthoFoudation-L.pth``): native names (``storage_tokens``, ``blocks.N.attn.qkv.{weight,bias,bias_mask}``,
  ``blocks.N.ls1.gamma``, ``rope_embed.periods``), with no prefix or under a wrapper prefix (``backbone.``,
  ``module.``, ``teacher.backbone.``...), possibly nested under ``model`` / ``teacher`` / ``state_dict``. Tensors
  outside the backbone (a DINO / iBOT head) are ignored and reported; ``mask_token`` (pre-training only) too.
- ``timm-dinov3``: a timm ``vit_*_patch16_dinov3*`` (``Eva``) state dict (``.pth`` / ``.bin`` / ``.safetensors``) or
  timm Hub folder: ``reg_token``, ``blocks.N.gamma_1``, ``attn.q_bias`` / ``attn.v_bias``; ``head.*`` dropped.

Sizes come from ``config.json`` (HF) or from tensor shapes; an optional sidecar ``<file>.json`` or ``config.json``
beside a state file overrides them with HF keys, ``use_rope`` included. Every tensor is checked against the
config's shapes before loading; missing, unexpected and mis-shaped tensors are refused by name, so nothing is ever
left at its random initialisation.

**RoPE on or off.** An HF or timm checkpoint runs with RoPE (what transformers and timm do) unless its config says
``"use_rope": false``. An authors' ``.pth`` saved under exactly the ``backbone.`` prefix is OrthoFoundation's
wrapper (``nets/dinov3_vit.ViT``), whose ``forward_vit`` calls the blocks without RoPE, so it runs with RoPE off;
any other ``.pth`` (Meta's releases) with RoPE on. A sidecar ``use_rope`` always wins, and ``model info`` says
which mode runs and why (:attr:`LoadedDINOv3.rope_source`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from engines.dinov3.network import DINOv3Config, DINOv3ViT, expected_shapes, rope_periods
from engines.imaging.preprocessor_config import (
    PreprocessorConfig,
    PreprocessorConfigError,
    read_preprocessor_config,
    write_preprocessor_config,
)

log = logging.getLogger(__name__)

FORMATS = ("hf-dinov3", "dinov3-pth", "timm-dinov3")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# DINOv3's published widths -> heads (head size 64, 128 for the 7B); used when a file has no rope_embed.periods.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 20, 1536: 24, 4096: 32}
# Where a training checkpoint nests its state dict, most useful first (the teacher is DINO's evaluated model).
NESTED_KEYS = ("teacher", "model_ema", "model", "state_dict", "module", "student")
ORTHOFOUNDATION_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A DINOv3 checkpoint that cannot be loaded as asked; the message says why and names the tensors."""


@dataclass
class LoadedDINOv3:
    """What a loader produces before a :class:`~engines.dinov3.family.DINOv3Model` is built around it."""

    format: str
    config: DINOv3Config
    state: dict[str, Tensor]  # canonical names, fp32, qkv bias already multiplied by its mask
    source: Path
    rope_source: str  # why RoPE is on / off, for `model info`
    notes: list[str] = field(default_factory=list)
    preprocessing: PreprocessorConfig | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # msknode_name / msknode_version from a config
    rope_periods: Tensor | None = None  # the file's rope_embed.periods (authors' layout); None: from rope_theta

    def __post_init__(self) -> None:
        if self.preprocessing is None:
            self.preprocessing = PreprocessorConfig.square(self.config.image_size)


# ------------------------------------------------------------------------------------------- raw reading
def read_state_file(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A state file without executing pickled code (``weights_only``; argparse namespaces allowed)."""
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format


def read_folder_weights(folder: Path) -> dict[str, Tensor]:
    """A HF / timm Hub folder's tensors: one file or a sharded ``*.index.json``."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            state: dict[str, Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(read_state_file(folder / shard))
            return state
    raise CheckpointError(f"{folder}: no {' or '.join(WEIGHT_FILES)} found")


def _unwrap(raw: dict[str, Any]) -> tuple[dict[str, Tensor], str | None]:
    """The flat tensor dict of a checkpoint, and the key it was nested under (None at the top level)."""
    if any(isinstance(v, Tensor) for v in raw.values()):
        return {k: v for k, v in raw.items() if isinstance(v, Tensor)}, None
    for key in NESTED_KEYS:
        if isinstance(raw.get(key), dict):
            inner, _ = _unwrap(raw[key])
            return inner, key
    return {}, None


def _backbone_prefix(keys: list[str]) -> str | None:
    """The prefix under which the authors' backbone lies ("" for none), or None if there is none."""
    candidates = []
    for key in keys:
        if key.endswith("cls_token"):
            prefix = key[: -len("cls_token")]
            if (prefix == "" or prefix.endswith(".")) and f"{prefix}patch_embed.proj.weight" in keys:
                candidates.append(prefix)
    if not candidates:
        return None
    # a training checkpoint holding teacher and student: the teacher is the model DINO evaluates
    return sorted(candidates, key=lambda p: ("teacher" not in p, len(p)))[0]


def _is_authors_layout(state: dict[str, Tensor], prefix: str) -> bool:
    marks = ("storage_tokens", "rope_embed.periods", "blocks.0.ls1.gamma", "blocks.0.attn.qkv.bias_mask")
    return any(f"{prefix}{m}" in state for m in marks) and f"{prefix}pos_embed" not in state


def _is_timm_dinov3(state: dict[str, Tensor]) -> bool:
    return "blocks.0.gamma_1" in state and "pos_embed" not in state and "cls_token" in state


def _peek_keys(path: Path) -> dict[str, Tensor] | None:
    """Tensors of a state file, cheaply (safetensors lazily, .pth memory-mapped); None if unreadable."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                return {k: torch.empty(0) for k in handle.keys()}
        raw = read_state_file(path, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to judge: another family's loader will say what is wrong
        return None
    return _unwrap(raw)[0] if isinstance(raw, dict) else None


def detect_format(path: str | Path) -> str | None:
    """``hf-dinov3``, ``dinov3-pth`` or ``timm-dinov3`` for a DINOv3 checkpoint at ``path``; None if it is not one."""
    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            return None
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            return None
        if config.get("model_type") == "dinov3_vit":
            return "hf-dinov3"
        if "dinov3" in str(config.get("architecture", "")) and "model_type" not in config:
            return "timm-dinov3"
        return None
    if path.is_file() and path.suffix in STATE_FILE_SUFFIXES:
        state = _peek_keys(path)
        if not state:
            return None
        prefix = _backbone_prefix(list(state))
        if prefix is not None and _is_authors_layout(state, prefix):
            return "dinov3-pth"
        if _is_timm_dinov3(state):
            return "timm-dinov3"
    return None


# ------------------------------------------------------------------------------------------- filters
def _fuse_qkv(
    parts: dict[str, dict[str, Tensor]], config: DINOv3Config, weights: dict[str, dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Per block q/k/v weights (and the biases the config declares) -> fused ``qkv.weight`` / ``qkv.bias``."""
    out: dict[str, Tensor] = {}
    flags = {"q": config.query_bias, "k": config.key_bias, "v": config.value_bias}
    for block, w in weights.items():
        if set(w) != {"q", "k", "v"}:
            raise CheckpointError(f"{block}: query/key/value weights incomplete (have {sorted(w)})")
        out[f"{block}.attn.qkv.weight"] = torch.cat([w["q"], w["k"], w["v"]], dim=0)
        biases = parts.get(block, {})
        unexpected = sorted(p for p in biases if not flags[p])
        missing = sorted(p for p, on in flags.items() if on and p not in biases)
        if unexpected or missing:
            raise CheckpointError(
                f"{block}: qkv biases do not fit the config (query/key/value_bias = "
                f"{config.query_bias}/{config.key_bias}/{config.value_bias}): "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
            )
        if config.qkv_bias:
            dim = w["q"].shape[0]
            out[f"{block}.attn.qkv.bias"] = torch.cat([biases.get(p, torch.zeros(dim)) for p in "qkv"])
    return out


_HF_DIRECT = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_IGNORED = ("embeddings.mask_token",)
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")


def hf_filter_fn(state: dict[str, Tensor], config: DINOv3Config) -> dict[str, Tensor]:
    """HF ``DINOv3ViTModel`` names (as saved, or in memory with ``model.``) -> canonical names, qkv fused."""
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if config.use_gated_mlp else {
        "up_proj": "fc1", "down_proj": "fc2"
    }
    renames = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "layer_scale1": "ls1",
               "layer_scale2": "ls2", **{f"mlp.{k}": f"mlp.{v}" for k, v in mlp.items()}}
    out: dict[str, Tensor] = {}
    weights: dict[str, dict[str, Tensor]] = {}
    biases: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key in _HF_DIRECT:
            if key == "embeddings.register_tokens" and tensor.shape[1] == 0:
                continue  # transformers keeps a [1, 0, D] parameter when there are no registers
            out[_HF_DIRECT[key]] = tensor
            continue
        if key.startswith(_HF_IGNORED):
            continue
        match = _HF_LAYER.match(key)
        if not match:
            unknown.append(key)
            continue
        block, rest = f"blocks.{match.group(1)}", match.group(2)
        qkv = re.match(r"^attention\.([qkv])_proj\.(weight|bias)$", rest)
        if qkv:
            (weights if qkv.group(2) == "weight" else biases).setdefault(block, {})[qkv.group(1)] = tensor
            continue
        module, _, kind = rest.rpartition(".")
        if module in renames:
            name = renames[module]
            out[f"{block}.{name}.{'gamma' if kind == 'lambda1' else kind}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised Hugging Face DINOv3 tensors: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    out.update(_fuse_qkv(biases, config, weights))
    return out


def to_hf_state_dict(state: dict[str, Tensor], config: DINOv3Config) -> dict[str, Tensor]:
    """Canonical -> HF ``DINOv3ViTModel`` names as transformers saves them (``layer.N...``); qkv split."""
    inverse = {v: k for k, v in _HF_DIRECT.items()}
    mlp = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj", "fc1": "up_proj", "fc2": "down_proj"}
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key in inverse:
            out[inverse[key]] = tensor
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if not match:
            raise CheckpointError(f"no Hugging Face name for canonical tensor {key!r}")
        index, module, kind = match.groups()
        prefix = f"layer.{index}"
        if module == "attn.qkv":
            for part, chunk, keep in zip("qkv", tensor.chunk(3, dim=0), (config.query_bias, config.key_bias,
                                                                          config.value_bias)):
                if kind == "weight" or keep:
                    out[f"{prefix}.attention.{part}_proj.{kind}"] = chunk.clone()
        elif module == "attn.proj":
            out[f"{prefix}.attention.o_proj.{kind}"] = tensor
        elif module in ("ls1", "ls2"):
            out[f"{prefix}.layer_scale{module[-1]}.lambda1"] = tensor
        elif module.startswith("mlp."):
            out[f"{prefix}.mlp.{mlp[module[4:]]}.{kind}"] = tensor
        else:
            out[f"{prefix}.{module}.{kind}"] = tensor
    out["embeddings.mask_token"] = torch.zeros(1, 1, config.hidden_size)
    out.setdefault("embeddings.register_tokens", torch.zeros(1, 0, config.hidden_size))
    return out


_AUTHORS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_AUTHORS_BLOCK_MODULES = ("norm1.", "norm2.", "attn.qkv.", "attn.proj.", "ls1.", "ls2.", "mlp.fc1.", "mlp.fc2.",
                          "mlp.w1.", "mlp.w2.", "mlp.w3.")
_AUTHORS_TOP = ("cls_token", "storage_tokens", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias")


def authors_filter_fn(backbone: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """The authors' native names (prefix removed) -> (canonical tensors, extras, notes).

    ``extras`` holds ``rope_embed.periods`` and each block's ``bias_mask`` (checked, then applied, by the loader).
    Unknown tensors are refused; ``mask_token`` and ``local_cls_norm`` (pre-training only) are dropped.
    """
    out: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    notes: list[str] = []
    unknown: list[str] = []
    dropped: list[str] = []
    for key, tensor in backbone.items():
        if key in _AUTHORS_TOP:
            out[key] = tensor
        elif key == "rope_embed.periods" or key.endswith(".attn.qkv.bias_mask"):
            extras[key] = tensor
        elif key == "mask_token" or key.startswith("local_cls_norm."):
            dropped.append(key)
        elif key.startswith("cls_norm."):
            raise CheckpointError(
                "this DINOv3 model unties its CLS and patch norms (cls_norm): not supported, the CLS embedding "
                "would use another norm than the patch tokens"
            )
        else:
            match = _AUTHORS_BLOCK.match(key)
            if match and match.group(2).startswith(_AUTHORS_BLOCK_MODULES):
                out[key] = tensor
            else:
                unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} unexpected tensors in the DINOv3 backbone, e.g. {unknown[:5]} (not the authors' "
            "DinoVisionTransformer layout)"
        )
    if dropped:
        notes.append(f"ignored pre-training-only tensors: {', '.join(sorted(dropped)[:3])}")
    return out, extras, notes


def to_authors_state_dict(state: dict[str, Tensor], config: DINOv3Config, prefix: str = "") -> dict[str, Tensor]:
    """Canonical -> the authors' layout (``bias_mask`` per block, ``rope_embed.periods``, ``mask_token``)."""
    out = {f"{prefix}{k}": v for k, v in state.items()}
    mask = torch.tensor([float(config.query_bias), float(config.key_bias), float(config.value_bias)])
    for i in range(config.num_hidden_layers):
        if config.qkv_bias:
            out[f"{prefix}blocks.{i}.attn.qkv.bias_mask"] = mask.repeat_interleave(config.hidden_size)
    out[f"{prefix}rope_embed.periods"] = rope_periods(config.head_dim, config.rope_theta)
    out[f"{prefix}mask_token"] = torch.zeros(1, config.hidden_size)
    return out


def timm_filter_fn(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """timm ``Eva`` DINOv3 names -> canonical; q/v biases joined with a zero key bias; ``head.*`` dropped."""
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    qv: dict[str, dict[str, Tensor]] = {}
    direct = {"cls_token": "cls_token", "reg_token": "storage_tokens", "norm.weight": "norm.weight",
              "norm.bias": "norm.bias", "patch_embed.proj.weight": "patch_embed.proj.weight",
              "patch_embed.proj.bias": "patch_embed.proj.bias"}
    block_renames = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.qkv.weight": "attn.qkv.weight",
                     "attn.proj.": "attn.proj.", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma",
                     "mlp.fc1_g.": "mlp.w1.", "mlp.fc1_x.": "mlp.w2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    gated = any(".mlp.fc1_g." in k for k in state)
    if gated:
        block_renames["mlp.fc2."] = "mlp.w3."
    for key, tensor in state.items():
        if key in direct:
            out[direct[key]] = tensor
            continue
        if key.startswith(("head.", "fc_norm.", "rope.", "head_drop.")):
            dropped.append(key)
            continue
        match = _AUTHORS_BLOCK.match(key)
        if match:
            block, rest = f"blocks.{match.group(1)}", match.group(2)
            bias = re.match(r"^attn\.([qv])_bias$", rest)
            if bias:
                qv.setdefault(block, {})[bias.group(1)] = tensor
                continue
            for old, new in block_renames.items():
                if rest.startswith(old):
                    out[f"{block}.{new}{rest[len(old):]}"] = tensor
                    break
            else:
                unknown.append(key)
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised timm DINOv3 tensors: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    for block, parts in qv.items():
        if set(parts) != {"q", "v"}:
            raise CheckpointError(f"{block}: timm q_bias / v_bias incomplete (have {sorted(parts)})")
        out[f"{block}.attn.qkv.bias"] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
    notes = [f"dropped {len(dropped)} timm tensors outside the encoder ({', '.join(sorted(dropped)[:3])})"] if dropped else []
    return out, notes


# ------------------------------------------------------------------------------------------- config
def infer_config(state: dict[str, Tensor], periods: Tensor | None = None, **overrides: Any) -> DINOv3Config:
    """Sizes from canonical tensor shapes; heads from the RoPE periods (head size = 4 x their count) or the width."""
    try:
        dim = state["cls_token"].shape[-1]
        proj = state["patch_embed.proj.weight"]
    except KeyError as exc:
        raise CheckpointError(f"missing backbone tensor {exc.args[0]!r}") from None
    blocks = [int(k.split(".")[1]) for k in state if k.startswith("blocks.")]
    if not blocks:
        raise CheckpointError("no transformer blocks (blocks.N.*) in the checkpoint")
    gated = "blocks.0.mlp.w1.weight" in state
    fc1 = state["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"]
    if periods is not None:
        head_dim = 4 * periods.numel()
        heads = dim // head_dim if head_dim and dim % head_dim == 0 else HEADS_BY_WIDTH.get(dim, max(1, dim // 64))
    else:
        heads = HEADS_BY_WIDTH.get(dim, max(1, dim // 64))
    kwargs: dict[str, Any] = dict(
        hidden_size=dim,
        num_hidden_layers=1 + max(blocks),
        num_attention_heads=heads,
        intermediate_size=fc1.shape[0],
        patch_size=proj.shape[-1],
        num_channels=proj.shape[1],
        num_register_tokens=state["storage_tokens"].shape[1] if "storage_tokens" in state else 0,
        proj_bias="blocks.0.attn.proj.bias" in state,
        mlp_bias=("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias") in state,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        layerscale="blocks.0.ls1.gamma" in state,
    )
    if "blocks.0.attn.qkv.bias" not in state:
        kwargs.update(query_bias=False, key_bias=False, value_bias=False)
    kwargs.update(overrides)
    try:
        return DINOv3Config(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build a DINOv3 config: {exc}") from None


def theta_from_periods(periods: Tensor, head_dim: int) -> float:
    """The RoPE base that gives these periods (``period_k = theta ** (4k / head_dim)``); refuses any other form.

    Meta's files hold the periods in bf16 (8 significant bits), so the match is checked to 1 %, not exactly.
    """
    periods = periods.double().flatten()
    if periods.numel() != head_dim // 4:
        raise CheckpointError(f"rope_embed.periods has {periods.numel()} values, a head of {head_dim} needs {head_dim // 4}")
    if periods.numel() < 2:
        return 100.0
    theta = float(periods[-1] ** (head_dim / (4.0 * (periods.numel() - 1))))
    expected = rope_periods(head_dim, theta).double()
    if abs(float(periods[0]) - 1.0) > 1e-6 or not torch.allclose(periods, expected, rtol=1e-2):
        raise CheckpointError(
            "rope_embed.periods do not follow a base (theta ** (4k / head_dim)): a min/max-period RoPE is not "
            "supported (transformers' DINOv3ViTModel cannot express it either)"
        )
    if abs(theta - round(theta)) < 0.01 * theta:
        return float(round(theta))  # bf16 periods of base 100 give 99.6...; the base is a round number
    return round(theta, 6)


def _mask_flags(extras: dict[str, Tensor]) -> dict[str, bool] | None:
    """query/key/value_bias from the blocks' ``bias_mask`` (each third all ones or all zeros); None without masks."""
    masks = [v for k, v in extras.items() if k.endswith("bias_mask")]
    if not masks:
        return None
    if any(torch.isnan(mask.float()).any() for mask in masks):
        raise CheckpointError("qkv bias_mask holds NaN: the mask was never initialised (a model saved before init)")
    first = masks[0].flatten()
    for mask in masks:
        if not torch.equal(mask.flatten(), first):
            raise CheckpointError("the blocks' qkv bias_mask differ: not supported (one mask for every block)")
    flags = {}
    for name, third in zip(("query_bias", "key_bias", "value_bias"), first.float().chunk(3)):
        if torch.all(third == 1):
            flags[name] = True
        elif torch.all(third == 0):
            flags[name] = False
        else:
            raise CheckpointError(f"qkv bias_mask: the {name.split('_')[0]} third is neither all ones nor all zeros")
    return flags


def _sidecar(path: Path) -> dict[str, Any]:
    """An optional ``<file>.json``, ``<stem>.json`` or ``config.json`` next to a state file (HF keys)."""
    for candidate in (path.with_suffix(path.suffix + ".json"), path.with_suffix(".json"), path.parent / "config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except ValueError as exc:
                raise CheckpointError(f"{candidate}: not JSON ({exc})") from None
            if isinstance(data, dict) and data.get("model_type") in (None, "dinov3_vit"):
                return data
    return {}


_SIDECAR_KEYS = ("num_attention_heads", "layer_norm_eps", "rope_theta", "use_rope", "image_size", "hidden_act")


def _apply_sidecar(config: DINOv3Config, sidecar: dict[str, Any]) -> DINOv3Config:
    changes = {k: sidecar[k] for k in _SIDECAR_KEYS if k in sidecar}
    if not changes:
        return config
    try:
        return replace(config, **changes)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"sidecar config: {exc}") from None


# ------------------------------------------------------------------------------------------- checks
def check_shapes(state: dict[str, Tensor], config: DINOv3Config, source: Path) -> None:
    """Refuse a state whose tensors do not match the config, naming the missing / unexpected / mis-shaped ones."""
    expected = expected_shapes(config)
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
        raise CheckpointError(f"{source}: checkpoint does not fit its DINOv3 config ({', '.join(problems)})")


def _fp32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _preprocessing(folder: Path, config: DINOv3Config) -> PreprocessorConfig:
    """The folder's ``preprocessor_config.json`` (ImageNet at the config's size if absent), sized in whole patches."""
    try:
        preprocessing = read_preprocessor_config(folder, default=PreprocessorConfig.square(config.image_size))
    except PreprocessorConfigError as exc:
        raise CheckpointError(str(exc)) from None
    p = config.patch_size
    if preprocessing.height % p or preprocessing.width % p:
        raise CheckpointError(
            f"{folder}: preprocessor_config.json resizes to {preprocessing.height} x {preprocessing.width}, "
            f"not a multiple of the patch size {p}"
        )
    return preprocessing


# ------------------------------------------------------------------------------------------- loaders
def load_hf(folder: Path) -> LoadedDINOv3:
    hf = json.loads((folder / "config.json").read_text())
    try:
        config = DINOv3Config.from_hf_dict(hf)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: config.json: {exc}") from None
    state = _fp32(hf_filter_fn(read_folder_weights(folder), config))
    check_shapes(state, config, folder)
    rope_source = "config.json use_rope" if "use_rope" in hf else "Hugging Face DINOv3ViTModel applies RoPE"
    meta = {k: hf[k] for k in ("msknode_name", "msknode_version") if k in hf}
    preprocessing = _preprocessing(folder, config)
    config = replace(config, image_size=preprocessing.height) if preprocessing.height == preprocessing.width else config
    return LoadedDINOv3("hf-dinov3", config, state, folder, rope_source, preprocessing=preprocessing, meta=meta)


def load_authors_pth(path: Path) -> LoadedDINOv3:
    raw = read_state_file(path)
    flat, nested = _unwrap(raw) if isinstance(raw, dict) else ({}, None)
    prefix = _backbone_prefix(list(flat))
    if prefix is None:
        raise CheckpointError(f"{path}: no DINOv3 backbone (cls_token + patch_embed.proj.weight) found")
    notes = [f"state dict nested under {nested!r}"] if nested else []
    backbone = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    outside = sorted(k for k in flat if not k.startswith(prefix))
    if outside:
        heads = [k for k in outside if re.search(r"(^|\.)(head|dino_head|ibot_head)\.", k)]
        kind = "a DINO head" if heads else "not the backbone"
        notes.append(f"ignored {len(outside)} tensors outside the backbone ({kind}: {', '.join(outside[:3])}"
                     f"{' ...' if len(outside) > 3 else ''})")
    state, extras, filter_notes = authors_filter_fn(backbone)
    notes += filter_notes
    periods = extras.get("rope_embed.periods")
    flags = _mask_flags(extras)
    if flags is None and any(k.endswith(".attn.qkv.bias") for k in state):
        flags = {"query_bias": True, "key_bias": True, "value_bias": True}  # a plain linear: its k bias counts
    overrides: dict[str, Any] = dict(flags or {})
    config = infer_config(state, periods, **overrides)
    if periods is not None:
        config = replace(config, rope_theta=theta_from_periods(periods, config.head_dim))
        deviation = float(((periods.double() - rope_periods(config.head_dim, config.rope_theta).double()).abs()
                           / periods.double()).max())
        if deviation > 1e-6:
            notes.append(f"RoPE periods taken from the file (rope_embed.periods, {periods.dtype}): up to "
                         f"{deviation:.1e} relative from theta {config.rope_theta:g}'s, as the authors' model computes")
    sidecar = _sidecar(path)
    if prefix == ORTHOFOUNDATION_PREFIX:
        config = replace(config, use_rope=False)
        rope_source = ("OrthoFoundation layout (backbone. prefix): their forward_vit calls the blocks without RoPE; "
                       "a sidecar {\"use_rope\": true} turns it on")
    else:
        rope_source = "the authors' DINOv3 applies RoPE in every block"
    if "use_rope" in sidecar:
        rope_source = "sidecar config use_rope"
    config = _apply_sidecar(config, sidecar)
    # the masked key bias as it computes: bias * bias_mask (a masked third enters as zeros)
    if config.qkv_bias:
        mask = torch.tensor([float(config.query_bias), float(config.key_bias), float(config.value_bias)])
        for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
            state[key] = state[key] * mask.repeat_interleave(config.hidden_size).to(state[key].dtype)
    state = _fp32(state)
    check_shapes(state, config, path)
    meta = {k: sidecar[k] for k in ("msknode_name", "msknode_version") if k in sidecar}
    preprocessing = _preprocessing(path.parent, config) if (path.parent / "preprocessor_config.json").is_file() else None
    return LoadedDINOv3("dinov3-pth", config, state, path, rope_source, notes=notes, preprocessing=preprocessing,
                        meta=meta, rope_periods=periods.float() if periods is not None else None)


def load_timm(path: Path) -> LoadedDINOv3:
    if path.is_dir():
        raw: dict[str, Any] = read_folder_weights(path)
        sidecar = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k in _SIDECAR_KEYS}
    else:
        raw = read_state_file(path)
        sidecar = _sidecar(path)
    flat, _ = _unwrap(raw)
    state, notes = timm_filter_fn(flat)
    overrides: dict[str, Any] = {}
    if "blocks.0.attn.qkv.bias" in state:
        overrides.update(query_bias=True, key_bias=False, value_bias=True)
    config = _apply_sidecar(infer_config(state, **overrides), sidecar)
    state = _fp32(state)
    check_shapes(state, config, path)
    rope_source = "sidecar config use_rope" if "use_rope" in sidecar else "timm's DINOv3 applies RoPE"
    preprocessing = _preprocessing(path, config) if path.is_dir() else None
    meta = {k: sidecar[k] for k in ("msknode_name", "msknode_version") if k in sidecar}
    return LoadedDINOv3("timm-dinov3", config, state, path, rope_source, notes=notes, preprocessing=preprocessing,
                        meta=meta)


def load_checkpoint(path: str | Path) -> LoadedDINOv3:
    """Detect the DINOv3 format at ``path`` and return canonical fp32 tensors with their config."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf-dinov3":
        return load_hf(path)
    if fmt == "dinov3-pth":
        return load_authors_pth(path)
    if fmt == "timm-dinov3":
        return load_timm(path)
    raise CheckpointError(f"{path}: not a DINOv3 checkpoint (HF dinov3_vit folder, the authors' .pth, timm dinov3)")


def build_model(checkpoint: LoadedDINOv3) -> DINOv3ViT:
    """Allocate the network for a loaded checkpoint and fill it (strict; built on the meta device, no random init)."""
    with torch.device("meta"):
        model = DINOv3ViT(checkpoint.config)
    model.load_state_dict(checkpoint.state, strict=True, assign=True)
    model.init_buffers("cpu", periods=checkpoint.rope_periods)
    return model.apply_bias_mask().eval()


# ------------------------------------------------------------------------------------------- writing
def save_hf_dinov3(model: DINOv3ViT, folder: str | Path, preprocessing: PreprocessorConfig | None = None,
                   extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a HF ``DINOv3ViTModel`` folder (``config.json`` keeps ``use_rope``).

    ``preprocessor_config.json`` gets ``preprocessing`` (default: ImageNet, bilinear, at the model's size).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(to_hf_state_dict(state, model.config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {**model.config.to_hf_dict(), **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_preprocessor_config(folder, preprocessing or PreprocessorConfig.square(model.config.image_size))
    return folder


def describe_rope(config: DINOv3Config) -> str:
    """``"on (theta 100)"`` or ``"off"``."""
    return f"on (theta {config.rope_theta:g})" if config.use_rope else "off"


def parameter_count(state: dict[str, Tensor]) -> int:
    return sum(math.prod(v.shape) for v in state.values())
