"""ViT-MAE (masked autoencoder) encoder and decoder in plain torch, sized from an explicit config.

One readable module in the spirit of timm's ``vision_transformer.py``. Parameter names follow the original
MAE / timm layout (``blocks.i.attn.qkv`` fused, ``decoder_blocks.j``...), which is our *canonical* layout:
loaders map Hugging Face, MAE ``.pth`` and timm checkpoints onto it (see ``engines/mae/loaders.py``).

Semantics match Hugging Face ``ViTMAEForPreTraining`` exactly where it matters for parity:

- masking: ``noise`` [N, L] is argsorted ascending, the lowest ``int(L * (1 - mask_ratio))`` patches are kept,
  ``mask`` is 1 for removed patches, ``ids_restore`` unshuffles;
- position embeddings are fixed 2-D sin-cos tables (CLS row zero), stored in the checkpoint;
- ``patchify`` lays a patch out as (row, column, channel), ``unpatchify`` inverts it;
- LayerNorm eps comes from the config (HF uses 1e-12, the original MAE and timm 1e-6).

Unlike HF we can run the encoder on tokens gathered from a patch embedding computed once per image, so the K
masked passes of an error map share one patch projection (``forward_encoder_masked`` with ``x`` repeated).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MAEConfig:
    """Sizes of a ViT-MAE; defaults are ViT-L/16 with SKELEX's 512-wide, 8-layer decoder."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 16
    image_size: int = 224
    num_channels: int = 3
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError("decoder_hidden_size must be divisible by decoder_num_attention_heads")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values per reconstructed patch: p * p * channels (768 for 16 x 16 RGB)."""
        return self.patch_size**2 * self.num_channels

    @property
    def len_keep(self) -> int:
        """Visible patches per masked pass, as HF computes it (49 of 196 at ratio 0.75)."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> MAEConfig:
        """Build from a Hugging Face ``ViTMAEConfig`` / ``ViTConfig`` ``config.json`` dictionary.

        Missing decoder sizes (a ``ViTForImageClassification`` config has none) fall back to the defaults;
        unsupported activations are refused rather than silently computed wrongly.
        """
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"unsupported hidden_act {act!r}: only exact 'gelu' is implemented")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in names}
        for key in ("image_size", "patch_size"):  # HF allows [h, w]; we support square only
            value = kwargs.get(key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"non-square {key} {value} is not supported")
                kwargs[key] = int(value[0])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dictionary that transformers' ``ViTMAEConfig`` accepts."""
        out: dict[str, Any] = asdict(self)
        out.update(
            {
                "architectures": ["ViTMAEForPreTraining"],
                "model_type": "vit_mae",
                "hidden_act": "gelu",
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "initializer_range": 0.02,
            }
        )
        return out


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position table [1 (+1), grid*grid, D], exactly MAE's layout.

    MAE builds the grid with ``meshgrid(w, h)``, so each row is ``[sin(col) | cos(col) | sin(row) | cos(row)]``
    (HF rotates its own table to match). Computed in float64, returned as float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for 2-D sin-cos embeddings")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )
    col_angles = cols.flatten()[:, None] * omega[None, :]
    row_angles = rows.flatten()[:, None] * omega[None, :]
    table = torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)


def random_masking_ids(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """HF / MAE masking from noise [N, L]: returns ``ids_keep`` [N, keep], ``ids_restore`` [N, L], ``mask`` [N, L].

    The lowest-noise patches are kept; ``mask`` is 1 where a patch is removed, in original patch order.
    """
    num, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(num, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution (same weights as HF's and timm's projection)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, D]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and torch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm / MAE / HF ViT all share this structure)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """ViT-MAE encoder with an optional decoder (``with_decoder=False`` for embedding-only checkpoints)."""

    def __init__(self, config: MAEConfig, with_decoder: bool = True) -> None:
        super().__init__()
        self.config = config
        c = config
        dim = c.hidden_size
        # --- encoder -------------------------------------------------------------------------------------------
        self.patch_embed = PatchEmbed(c.patch_size, c.num_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim, c.num_attention_heads, c.intermediate_size, c.qkv_bias, c.layer_norm_eps)
            for _ in range(c.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        # --- decoder -------------------------------------------------------------------------------------------
        self.has_decoder = with_decoder
        if with_decoder:
            ddim = c.decoder_hidden_size
            self.decoder_embed = nn.Linear(dim, ddim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, ddim), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                Block(ddim, c.decoder_num_attention_heads, c.decoder_intermediate_size, c.qkv_bias, c.layer_norm_eps)
                for _ in range(c.decoder_num_hidden_layers)
            )
            self.decoder_norm = nn.LayerNorm(ddim, eps=c.layer_norm_eps)
            self.decoder_pred = nn.Linear(ddim, c.patch_dim)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- init
    def init_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos tables, xavier-uniform linears, N(0, 0.02) tokens."""
        c = self.config
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(c.hidden_size, c.grid_size))
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
            nn.init.normal_(self.cls_token, std=0.02)
            if self.has_decoder:
                self.decoder_pos_embed.copy_(sincos_pos_embed_2d(c.decoder_hidden_size, c.grid_size))
                nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------- encoder
    def patch_tokens(self, x: Tensor) -> Tensor:
        """Patch embeddings plus their position embeddings, no CLS: [B, L, D]."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}")
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def _encode(self, tokens: Tensor) -> Tensor:
        """Prepend CLS (with its position), run the blocks and the final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """All 197 tokens after the final norm: [B, 1 + L, D]."""
        return self._encode(self.patch_tokens(x))

    def embed(self, x: Tensor) -> Tensor:
        """The CLS feature after the final norm, from a full (unmasked) pass: [B, D]."""
        return self.forward_features(x)[:, 0]

    def forward_encoder_masked(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the visible patches ``ids_keep`` [N, keep]: latent [N, 1 + keep, D].

        ``x`` is [N, C, H, W], or [B, C, H, W] with N a multiple of B: then image b serves rows
        ``b * (N // B) ... (b + 1) * (N // B) - 1`` and its patch embedding is computed only once.
        """
        tokens = self.patch_tokens(x)
        num, batch = ids_keep.shape[0], tokens.shape[0]
        if num != batch:
            if num % batch:
                raise ValueError(f"ids_keep has {num} rows, not a multiple of the {batch} images")
            tokens = tokens.repeat_interleave(num // batch, dim=0)
        index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return self._encode(torch.gather(tokens, dim=1, index=index))

    # ----------------------------------------------------------------------------------------------- decoder
    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Reconstruct every patch from the visible latent: [N, L, p * p * C] in original patch order."""
        if not self.has_decoder:
            raise RuntimeError("this model was built without a decoder (encoder-only checkpoint)")
        x = self.decoder_embed(latent)
        num, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(num, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        patches = torch.gather(patches, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    # ----------------------------------------------------------------------------------------------- pixels
    def patchify(self, imgs: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, L, p * p * C], each patch laid out (row, column, channel) like HF and MAE."""
        p, c, g = self.config.patch_size, self.config.num_channels, self.config.grid_size
        x = imgs.reshape(imgs.shape[0], c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(imgs.shape[0], g * g, p * p * c)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of :meth:`patchify`: [N, L, p * p * C] -> [N, C, H, W]."""
        p, c, g = self.config.patch_size, self.config.num_channels, self.config.grid_size
        x = patches.reshape(patches.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(patches.shape[0], c, g * p, g * p)

    # ----------------------------------------------------------------------------------------------- training
    def random_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(batch, self.config.num_patches, generator=generator, device=self.pos_embed.device)

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MAE loss: per-patch MSE (optionally on per-patch normalised targets), averaged over masked patches."""
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: ``(loss, pred [N, L, p*p*C], mask [N, L])``, masks drawn from ``noise`` (HF semantics)."""
        if noise is None:
            noise = self.random_noise(imgs.shape[0])
        ids_keep, ids_restore, mask = random_masking_ids(noise, self.config.mask_ratio)
        latent = self.forward_encoder_masked(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ----------------------------------------------------------------------------------------------- helpers
    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's tensors only, in canonical names (what ``encoder_hash`` covers)."""
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}

    def num_parameters(self, encoder_only: bool = False) -> int:
        state = self.encoder_state_dict() if encoder_only else self.state_dict()
        return sum(t.numel() for t in state.values())


DECODER_PREFIXES = ("decoder_", "mask_token")


def is_encoder_key(name: str) -> bool:
    """Whether a canonical key belongs to the encoder (everything but ``decoder_*`` and ``mask_token``)."""
    return not name.startswith(DECODER_PREFIXES)


def encoder_sha256(model_or_state: nn.Module | dict[str, Tensor]) -> str:
    """sha256 over the encoder tensors: canonical names sorted, each name then its fp32 little-endian bytes.

    Decoder tensors are excluded, so the same encoder weights give the same hash from any format and with or
    without a decoder (heads depend on the encoder only).
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    digest = hashlib.sha256()
    for name in sorted(k for k in state if is_encoder_key(k)):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def expected_shapes(config: MAEConfig, with_decoder: bool = True) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for a config, without allocating a model (loaders check against it)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, dim: int, hidden: int) -> None:
        for norm in ("norm1", "norm2"):
            shapes[f"{prefix}.{norm}.weight"] = (dim,)
            shapes[f"{prefix}.{norm}.bias"] = (dim,)
        shapes[f"{prefix}.attn.qkv.weight"] = (3 * dim, dim)
        if config.qkv_bias:
            shapes[f"{prefix}.attn.qkv.bias"] = (3 * dim,)
        shapes[f"{prefix}.attn.proj.weight"] = (dim, dim)
        shapes[f"{prefix}.attn.proj.bias"] = (dim,)
        shapes[f"{prefix}.mlp.fc1.weight"] = (hidden, dim)
        shapes[f"{prefix}.mlp.fc1.bias"] = (hidden,)
        shapes[f"{prefix}.mlp.fc2.weight"] = (dim, hidden)
        shapes[f"{prefix}.mlp.fc2.bias"] = (dim,)

    c, d = config, config.hidden_size
    shapes["cls_token"] = (1, 1, d)
    shapes["pos_embed"] = (1, c.num_patches + 1, d)
    shapes["patch_embed.proj.weight"] = (d, c.num_channels, c.patch_size, c.patch_size)
    shapes["patch_embed.proj.bias"] = (d,)
    for i in range(c.num_hidden_layers):
        block(f"blocks.{i}", d, c.intermediate_size)
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    if with_decoder:
        dd = c.decoder_hidden_size
        shapes["mask_token"] = (1, 1, dd)
        shapes["decoder_embed.weight"] = (dd, d)
        shapes["decoder_embed.bias"] = (dd,)
        shapes["decoder_pos_embed"] = (1, c.num_patches + 1, dd)
        for j in range(c.decoder_num_hidden_layers):
            block(f"decoder_blocks.{j}", dd, c.decoder_intermediate_size)
        shapes["decoder_norm.weight"] = (dd,)
        shapes["decoder_norm.bias"] = (dd,)
        shapes["decoder_pred.weight"] = (c.patch_dim, dd)
        shapes["decoder_pred.bias"] = (c.patch_dim,)
    return shapes


def count_parameters(config: MAEConfig, with_decoder: bool = True) -> int:
    return sum(math.prod(s) for s in expected_shapes(config, with_decoder).values())
