"""DINOv3 ViT (Meta's DINOv3; OrthoFoundation's backbone) in plain torch, sized from an explicit config.

One readable module, the counterpart of ``engines/mae/network.py``. Parameter names follow the authors' DINOv3
layout (``dinov3/models/vision_transformer.py``), which is our *canonical* layout for this family:
``cls_token``, ``storage_tokens`` (the register tokens), ``patch_embed.proj``, ``blocks.i.{norm1, attn.qkv (fused),
attn.proj, ls1.gamma, norm2, mlp.fc1 / mlp.fc2 (or mlp.w1 / w2 / w3 when gated), ls2.gamma}``, ``norm``. Loaders map
Hugging Face ``DINOv3ViTModel`` folders, the authors' / OrthoFoundation ``.pth`` and timm ``vit_*_dinov3`` state
dicts onto it (``engines/dinov3/loaders.py``).

The computation, as transformers' ``DINOv3ViTModel`` (the parity reference) and the authors' code do it:

- tokens = [CLS, R register tokens, patch tokens]; no absolute position embedding;
- 2-D RoPE on the patch tokens only (CLS and registers are not rotated): patch centres at ``(i + 0.5) / grid``
  mapped to [-1, 1] per axis, angle ``2 pi * coord / period`` with ``period_k = rope_theta ** (4k / head_dim)``
  for ``k < head_dim / 4``; the (row, column) angles fill half a head, tiled twice, rotated with
  ``x * cos + rotate_half(x) * sin`` (``rotate_half([a, b]) = [-b, a]``). Train-time coordinate shift / jitter
  / rescale do not apply at inference;
- ``config.use_rope = False`` runs the blocks without RoPE, as OrthoFoundation's released ``forward_vit`` does
  (it calls each block without the rope argument); transformers always applies it;
- qkv is one linear whose bias is multiplied by ``bias_mask`` (the authors' ``LinearKMaskedBias``): the key
  part is masked to zero unless ``key_bias``. The mask is applied to the bias once, when the weights are set
  (:meth:`DINOv3ViT.apply_bias_mask`, which the loaders call), so the forward is a plain ``nn.Linear`` that int8
  quantisation and the ONNX export see as one; LayerScale (``ls1``, ``ls2``) after attention and MLP;
- MLP: ``fc2(gelu(fc1(x)))``, or gated ``w3(act(w1(x)) * w2(x))`` (SwiGLU with ``hidden_act = "silu"``);
- the final LayerNorm over all tokens; outputs the normed CLS token and the normed patch tokens.

For speed on the CPU (benchmarks/dinov3.py): one fused qkv GEMM, RoPE applied to q and k in one broadcast
expression over the whole sequence (CLS / register rows carry cos = 1, sin = 0, so they pass unchanged, exactly),
``scaled_dot_product_attention``, and the RoPE tables computed once per image size, not per block.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class DINOv3Config:
    """Sizes and switches of a DINOv3 ViT; defaults are DINOv3 ViT-L/16 (OrthoFoundation's backbone)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    use_rope: bool = True  # False: blocks run without RoPE (OrthoFoundation's released forward)
    query_bias: bool = True
    key_bias: bool = False  # DINOv3's masked key bias: the k third of the qkv bias is multiplied by 0
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    use_gated_mlp: bool = False
    hidden_act: str = "gelu"  # "gelu" (exact) for the MLP, "silu" for SwiGLU
    layerscale: bool = True  # LayerScale gammas present (DINOv3 ViT-L: init 1e-5)
    layerscale_value: float = 1e-5  # initial value for a freshly built model only

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.head_dim % 4:
            raise ValueError(f"head size {self.head_dim} must be divisible by 4 for 2-D RoPE")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: one of {sorted(ACTIVATIONS)}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """CLS + register tokens (not rotated by RoPE, not patch tokens)."""
        return 1 + self.num_register_tokens

    @property
    def qkv_bias(self) -> bool:
        """The fused qkv linear has a bias (any of query / key / value biased)."""
        return self.query_bias or self.key_bias or self.value_bias

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> DINOv3Config:
        """From a Hugging Face ``DINOv3ViTConfig`` ``config.json`` (our optional ``use_rope`` key included)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs.pop("layerscale", None)  # HF's layer always has LayerScale
        if "layerscale_value" in kwargs:
            kwargs["layerscale_value"] = float(kwargs["layerscale_value"])
        for key in ("image_size", "patch_size"):  # HF allows [h, w]; we support square only
            value = kwargs.get(key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"non-square {key} {value} is not supported")
                kwargs[key] = int(value[0])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dictionary that transformers' ``DINOv3ViTConfig`` accepts (``use_rope`` is ours)."""
        out: dict[str, Any] = asdict(self)
        if not self.layerscale:
            raise ValueError("transformers' DINOv3ViTModel always has LayerScale; this model has none")
        del out["layerscale"]
        out.update(
            {
                "architectures": ["DINOv3ViTModel"],
                "model_type": "dinov3_vit",
                "attention_dropout": 0.0,
                "drop_path_rate": 0.0,
                "initializer_range": 0.02,
                "pos_embed_shift": None,
                "pos_embed_jitter": None,
                "pos_embed_rescale": 2.0,
            }
        )
        return out


# ----------------------------------------------------------------------------------------------- RoPE
def rope_periods(head_dim: int, theta: float) -> Tensor:
    """DINOv3's periods ``theta ** (4k / head_dim)``, k < head_dim / 4 (the authors' ``rope_embed.periods``)."""
    return theta ** (2 * torch.arange(head_dim // 4, dtype=torch.float32, device="cpu") / (head_dim // 2))


def rope_tables(grid_h: int, grid_w: int, periods: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """``cos`` and *signed* ``sin`` [prefix + H*W, head_dim] for :func:`apply_rope`, in float32.

    Patch centres ``(i + 0.5) / n`` per axis, shifted to [-1, 1] (DINOv3's "separate" normalisation, identical to
    "min" / "max" on a square grid); angles ``2 pi * coord / period`` for (row, column), flattened and tiled
    twice, exactly as transformers' ``DINOv3ViTRopePositionEmbedding``. Prefix rows are cos 1, sin 0 (no
    rotation). ``sin`` carries rotate_half's sign: its first half is negated (see :func:`apply_rope`).
    """
    inv_freq = 1.0 / periods.float().cpu()
    coords_h = torch.arange(0.5, grid_h, dtype=torch.float32, device="cpu") / grid_h
    coords_w = torch.arange(0.5, grid_w, dtype=torch.float32, device="cpu") / grid_w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0  # [HW, 2]
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)  # [HW, head_dim]
    cos, sin = torch.cos(angles), torch.sin(angles)
    half = sin.shape[-1] // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    head_dim = cos.shape[-1]
    cos = torch.cat([torch.ones(num_prefix, head_dim, device="cpu"), cos])
    sin = torch.cat([torch.zeros(num_prefix, head_dim, device="cpu"), sin])
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``, as ``[b, a] * [-sin, sin]``.

    ``x`` [..., N, ..., head_dim] with ``cos`` / ``signed_sin`` broadcastable to it.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)  # three kernels, not four


# ----------------------------------------------------------------------------------------------- layers
class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, D], patches row-major


class Attention(nn.Module):
    """Fused qkv (its bias already times ``bias_mask``), RoPE on q and k, SDPA, output projection."""

    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=config.proj_bias)
        mask = [float(config.query_bias), float(config.key_bias), float(config.value_bias)]
        self.register_buffer("bias_mask", torch.tensor(mask).repeat_interleave(dim), persistent=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        if rope is not None:
            cos, sin = rope  # [N, hd] -> broadcast over [B, N, 2, H, hd]
            qk = apply_rope(qkv[:, :, :2], cos[:, None, None, :], sin[:, None, None, :])
            q, k = qk.unbind(2)
        else:
            q, k = qkv[:, :, 0], qkv[:, :, 1]
        v = qkv[:, :, 2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Module):
    """``w3(act(w1(x)) * w2(x))``: the authors' SwiGLUFFN names (HF gate_proj = w1, up_proj = w2, down_proj = w3)."""

    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]()
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.act(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(config)
        self.ls1 = LayerScale(dim, config.layerscale_value) if config.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GatedMlp(config) if config.use_gated_mlp else Mlp(config)
        self.ls2 = LayerScale(dim, config.layerscale_value) if config.layerscale else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = residual(x, self.attn(self.norm1(x), rope), self.ls1)
        return residual(x, self.mlp(self.norm2(x)), self.ls2)


def residual(x: Tensor, branch: Tensor, layer_scale: nn.Module) -> Tensor:
    """``x + gamma * branch`` as one ``addcmul`` kernel (LayerScale and the residual add fused), else ``x + branch``.

    On a small, busy CPU every kernel costs a thread hand-over, so fewer kernels per block is measurably faster.
    """
    if isinstance(layer_scale, LayerScale):
        return torch.addcmul(x, branch, layer_scale.gamma)
    return x + branch


# ----------------------------------------------------------------------------------------------- model
class DINOv3ViT(nn.Module):
    """The DINOv3 encoder: ``forward_features(x)`` -> (normed CLS [B, D], normed patch tokens [B, L, D]).

    ``has_decoder`` is False: a DINOv3 model gives embeddings and heads, no reconstruction (no error map).
    """

    has_decoder = False

    def __init__(self, config: DINOv3Config) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.num_register_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        else:
            self.storage_tokens = None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None, periods: Tensor | None = None) -> None:
        """(Re)compute the fixed, non-persistent buffers: ``bias_mask`` per block, RoPE periods and tables.

        ``periods``: the authors' ``rope_embed.periods`` as a checkpoint holds them (Meta's files store them in
        bf16, so they differ from ``rope_theta``'s by up to 0.4 %; the authors' model computes with the stored
        values); default: from ``rope_theta``. A model built on the meta device and filled by assignment calls this
        once its weights are real.
        """
        c = self.config
        device = device if device is not None else self.norm.weight.device
        mask = torch.tensor(
            [float(c.query_bias), float(c.key_bias), float(c.value_bias)], device="cpu"
        ).repeat_interleave(c.hidden_size)
        for block in self.blocks:
            block.attn.bias_mask = mask.to(device)
        if periods is None:
            periods = rope_periods(c.head_dim, c.rope_theta)
        elif periods.numel() != c.head_dim // 4:
            raise ValueError(f"{periods.numel()} RoPE periods for a head of {c.head_dim} (needs {c.head_dim // 4})")
        periods = periods.detach().to("cpu", torch.float32).flatten()
        cos, sin = rope_tables(c.grid_size, c.grid_size, periods, c.num_prefix_tokens)
        self.register_buffer("rope_periods", periods.to(device), persistent=False)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @torch.no_grad()
    def apply_bias_mask(self) -> DINOv3ViT:
        """Multiply each qkv bias by its ``bias_mask`` (the masked key bias): call after setting weights."""
        for block in self.blocks:
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias.mul_(block.attn.bias_mask.to(block.attn.qkv.bias))
        return self

    def init_weights(self, seed: int | None = None) -> DINOv3ViT:
        """DINOv3's initialisation (trunc-normal 0.02 linears, zero biases, tokens N(0, 0.02)); for tests/training."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("gamma"):
                    param.fill_(self.config.layerscale_value)
                elif "norm" in name:
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator).clamp_(-2, 2))
        return self.apply_bias_mask()

    # ------------------------------------------------------------------------------------------ forward
    def rope(self, grid_h: int, grid_w: int) -> tuple[Tensor, Tensor] | None:
        """The RoPE tables for a grid (cached for the config's image size); None when RoPE is off."""
        if not self.config.use_rope:
            return None
        if grid_h == grid_w == self.config.grid_size:
            return self.rope_cos, self.rope_sin
        cos, sin = rope_tables(grid_h, grid_w, self.rope_periods.float().cpu(), self.config.num_prefix_tokens)
        return cos.to(self.rope_cos), sin.to(self.rope_sin)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """[CLS, registers, patch tokens]: [B, 1 + R + L, D]."""
        x = x.to(self.patch_embed.proj.weight.dtype)
        patches = self.patch_embed(x)
        batch = patches.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(batch, -1, -1))
        return torch.cat([*prefix, patches], dim=1)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """All tokens after the blocks and the final norm: [B, 1 + R + L, D]."""
        p = self.config.patch_size
        tokens = self.prepare_tokens(x)
        rope = self.rope(x.shape[-2] // p, x.shape[-1] // p)
        if rope is not None:
            rope = (rope[0].to(tokens.dtype), rope[1].to(tokens.dtype))
        for block in self.blocks:
            tokens = block(tokens, rope)
        return self.norm(tokens)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(normed CLS [B, D], normed patch tokens [B, L, D]) - HF's ``pooler_output`` and
        ``last_hidden_state[:, 1 + R:]``; the authors' ``x_norm_clstoken`` / ``x_norm_patchtokens``."""
        tokens = self.forward_tokens(x)
        return tokens[:, 0], tokens[:, self.config.num_prefix_tokens :]

    def embed(self, x: Tensor) -> Tensor:
        """The normed CLS token [B, D] (OrthoFoundation's feature)."""
        return self.forward_features(x)[0]

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """What heads read: ``cls`` [B, D] and ``patch_mean`` (mean of the normed patch tokens) [B, D]."""
        cls, patches = self.forward_features(x)
        return {"cls": cls, "patch_mean": patches.mean(dim=1)}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_features(x)


# ----------------------------------------------------------------------------------------------- shapes, hash
def expected_shapes(config: DINOv3Config) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for a config, without allocating a model (loaders check against it)."""
    dim, hidden = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "patch_embed.proj.weight": (dim, config.num_channels, config.patch_size, config.patch_size),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if config.num_register_tokens:
        shapes["storage_tokens"] = (1, config.num_register_tokens, dim)
    for i in range(config.num_hidden_layers):
        prefix = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{prefix}.{norm}.weight"] = (dim,)
            shapes[f"{prefix}.{norm}.bias"] = (dim,)
        shapes[f"{prefix}.attn.qkv.weight"] = (3 * dim, dim)
        if config.qkv_bias:
            shapes[f"{prefix}.attn.qkv.bias"] = (3 * dim,)
        shapes[f"{prefix}.attn.proj.weight"] = (dim, dim)
        if config.proj_bias:
            shapes[f"{prefix}.attn.proj.bias"] = (dim,)
        layers = (("w1", hidden, dim), ("w2", hidden, dim), ("w3", dim, hidden)) if config.use_gated_mlp else (
            ("fc1", hidden, dim), ("fc2", dim, hidden)
        )
        for name, out_features, in_features in layers:
            shapes[f"{prefix}.mlp.{name}.weight"] = (out_features, in_features)
            if config.mlp_bias:
                shapes[f"{prefix}.mlp.{name}.bias"] = (out_features,)
        if config.layerscale:
            shapes[f"{prefix}.ls1.gamma"] = (dim,)
            shapes[f"{prefix}.ls2.gamma"] = (dim,)
    return shapes


def count_parameters(config: DINOv3Config) -> int:
    return sum(math.prod(s) for s in expected_shapes(config).values())


def encoder_sha256(model: DINOv3ViT) -> str:
    """sha256 over the weights as they compute: canonical names sorted, each name, shape and fp32 LE bytes.

    The qkv bias enters multiplied by its mask (so a masked key bias hashes the same whatever the file held),
    and the RoPE mode and periods are hashed too: heads fitted with RoPE on are not valid with it off.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        key = f"blocks.{i}.attn.qkv.bias"
        if key in state:
            state[key] = state[key] * block.attn.bias_mask.to(state[key].device, state[key].dtype)
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    if model.config.use_rope:
        digest.update(b"rope:" + model.rope_periods.to("cpu", torch.float32).numpy().astype("<f4").tobytes())
    else:
        digest.update(b"rope:off")
    return digest.hexdigest()
