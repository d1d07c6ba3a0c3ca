"""OrthoDiffusion's networks in plain torch: the med-ddpm 3-D UNet, its noise schedule, and the segmentation head.

The UNet is the guided-diffusion UNet that med-ddpm made 3-D and OrthoDiffusion (github.com/lt-0123/OrthoDiffusion,
``diffusion_model/unet.py``, MIT) pre-trains per plane: 64 base channels, one residual block per level, channel
multipliers (1, 1, 2, 2, 4), attention at the 16x down-sampled level (their ``attention_resolutions="16"`` on a
256 px input) and always in the middle block, T = 1000 steps. Down-sampling is a stride-2 convolution in all three
axes, so a [1, 16, 256, 256] volume reaches the middle block as [256, 1, 16, 16]. Module names follow theirs one
for one (``input_blocks.N.M``, ``middle_block.{0,1,2}``, ``output_blocks.N.M``, ``time_embed.{0,2}``, ``out.{0,2}``),
so their state dict loads without renaming once the wrapper prefix is gone (``engines.orthodiffusion.loaders``).

OrthoDiffusion uses the network as a feature extractor: ``q_sample`` noises the input to step ``t`` and the
activations after ``middle_block[i]`` (``mid_i``; ``mid_0`` residual block, ``mid_1`` attention, ``mid_2`` residual
block) are the features. :meth:`UNet3D.features` stops there, as their ``forward(ret_mid=True)`` does.

The schedule is theirs: ``GaussianDiffusion`` is built without ``betas`` everywhere in the repository, so it is
the cosine schedule (Nichol & Dhariwal, s = 0.008) computed in float64 and stored as float32 buffers; ``q_sample``
is ``sqrt(abar_t) * x + sqrt(1 - abar_t) * noise``. A checkpoint's own schedule buffers win when it has them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32  # GroupNorm groups in every UNet normalisation (their ``normalization``): channels must divide by 32
MID_LAYERS = ("mid_0", "mid_1", "mid_2")


@dataclass(frozen=True)
class UNet3DConfig:
    """The UNet's shape; defaults are OrthoDiffusion's (``create_model(256, 64, 1)``)."""

    in_channels: int = 1
    out_channels: int = 1
    model_channels: int = 64
    num_res_blocks: int = 1
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    attention_resolutions: tuple[int, ...] = (16,)  # down-sampling factors (ds) that get attention
    num_heads: int = 1
    num_head_channels: int = -1  # > 0: heads = channels // num_head_channels (overrides num_heads)
    timesteps: int = 1000

    def __post_init__(self) -> None:
        for mult in self.channel_mult:
            if (self.model_channels * mult) % GROUPS:
                raise ValueError(
                    f"model_channels x channel_mult ({self.model_channels} x {mult}) must divide by {GROUPS}"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> UNet3DConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNet setting(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        for key in ("channel_mult", "attention_resolutions"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        data["attention_resolutions"] = list(self.attention_resolutions)
        return data

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def feature_channels(self) -> int:
        """Channels of the middle-block features (256 for OrthoDiffusion)."""
        return self.model_channels * self.channel_mult[-1]

    @property
    def downsamplings(self) -> int:
        return len(self.channel_mult) - 1


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [N, dim]: cosines then sines of t * exp(-ln(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv; 1x1x1 skip if widths differ."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv3d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over all voxels; heads split before q/k/v (guided-diffusion's "legacy" order)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1) -> None:
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # [B, 3C, T], laid out per head as (q, k, v) blocks of C / heads
        length = qkv.shape[-1]
        head_ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * head_ch, length).split(head_ch, dim=1)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = attended.transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3x3x3 convolution: halves depth, height and width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Trilinear x2 in all three axes (half-pixel centres), then a 3x3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        d, h, w = x.shape[2:]
        return self.conv(F.interpolate(x, (2 * d, 2 * h, 2 * w), mode="trilinear"))


class TimestepSequential(nn.Sequential):
    """A sequence whose residual blocks also get the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def layer_channels(config: UNet3DConfig) -> dict[str, int]:
    """Feature layer name -> channels: ``in_0`` .. ``in_N`` (after each input block) and ``mid_0`` .. ``mid_2``."""
    channels = {"in_0": config.channel_mult[0] * config.model_channels}
    index = 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            channels[f"in_{index}"] = mult * config.model_channels
            index += 1
        if level != len(config.channel_mult) - 1:
            channels[f"in_{index}"] = mult * config.model_channels
            index += 1
    channels.update({name: config.feature_channels for name in MID_LAYERS})
    return channels


class UNet3D(nn.Module):
    """The med-ddpm / OrthoDiffusion 3-D UNet (noise predictor), with feature taps at the input and middle blocks."""

    def __init__(self, config: UNet3DConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or UNet3DConfig()
        emb_dim = cfg.time_embed_dim
        attn = dict(num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels)
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        ch = cfg.channel_mult[0] * cfg.model_channels
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv3d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, **attn))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(ResBlock(ch, emb_dim), AttentionBlock(ch, **attn), ResBlock(ch, emb_dim))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, **attn))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, ch), nn.SiLU(), nn.Conv3d(ch, cfg.out_channels, 3, padding=1)
        )

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """Names :meth:`features` accepts: ``in_0`` .. ``in_N``, ``mid_0`` .. ``mid_2`` (their get_feature names)."""
        return tuple(layer_channels(self.config))

    def check_input(self, x: Tensor) -> None:
        """Depth, height and width must halve cleanly at every down-sampling (16 x 256 x 256 does)."""
        factor = 2 ** self.config.downsamplings
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected [B, {self.config.in_channels}, D, H, W], got {list(x.shape)}")
        if any(size % factor for size in x.shape[2:]):
            raise ValueError(f"D, H, W must be multiples of {factor}, got {list(x.shape[2:])}")

    def embed_time(self, timesteps: Tensor) -> Tensor:
        return self.time_embed(timestep_embedding(timesteps, self.config.model_channels))

    def features(self, x: Tensor, timesteps: Tensor, layer: str) -> Tensor:
        """The activation named ``layer`` for an (already noised) input; runs only as far as it needs."""
        if layer not in self.feature_layers:
            raise ValueError(f"unknown feature layer {layer!r}; this UNet offers {', '.join(self.feature_layers)}")
        self.check_input(x)
        emb = self.embed_time(timesteps)
        h = x
        kind, index = layer.split("_")
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb)
            if kind == "in" and i == int(index):
                return h
        for i, block in enumerate(self.middle_block):
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            if i == int(index):
                return h
        raise AssertionError("unreachable: layer names are checked above")

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Predicted noise, same shape as ``x`` (what the diffusion model was trained to output)."""
        self.check_input(x)
        emb = self.embed_time(timesteps)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def cosine_betas(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule in float64, clipped to [0, 0.999] (their ``cosine_beta_schedule``)."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas_cumprod = np.cos(((x / steps) + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return np.clip(betas, a_min=0, a_max=0.999)


class NoiseSchedule(nn.Module):
    """What ``q_sample`` needs: sqrt(abar_t) and sqrt(1 - abar_t) per step, float32 as the authors store them."""

    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor

    def __init__(self, betas: np.ndarray | None = None, timesteps: int = 1000) -> None:
        super().__init__()
        betas = cosine_betas(timesteps) if betas is None else np.asarray(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32))
        self.register_buffer("sqrt_alphas_cumprod", torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32))
        self.register_buffer(
            "sqrt_one_minus_alphas_cumprod", torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32)
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, with per-sample ``t`` [B]."""
        if int(t.min()) < 0 or int(t.max()) >= self.num_timesteps:
            raise ValueError(f"timestep {t.tolist()} outside 0..{self.num_timesteps - 1}")
        shape = (t.shape[0],) + (1,) * (x_start.dim() - 1)
        a = self.sqrt_alphas_cumprod.gather(-1, t).reshape(shape)
        b = self.sqrt_one_minus_alphas_cumprod.gather(-1, t).reshape(shape)
        return a * x_start + b * noise


def seeded_noise(shape: Iterable[int], seed: int) -> Tensor:
    """Standard normal noise from its own CPU generator: the numbers ``torch.manual_seed(seed); randn(shape)`` gives.

    The authors' ``q_sample`` draws ``randn_like(x)`` from the global generator; on the contiguous batches their
    DataLoader makes, that is this draw after ``torch.manual_seed(seed)``."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


class SegResBlock3D(nn.Module):
    """conv-GN-ReLU-conv-GN plus the input, then ReLU (their ``ResBlock3D`` in ``finetune_segmentation.py``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(),
            nn.Conv3d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.block(x))


class SegHead3D(nn.Module):
    """Four stride-2 transposed convolutions (x2 in D, H and W each) from mid features to per-voxel class logits.

    On OrthoDiffusion's [256, 1, 16, 16] middle-block features this gives [classes, 16, 256, 256]: the input grid.
    """

    def __init__(self, in_channels: int, num_classes: int = 11) -> None:
        super().__init__()
        if in_channels % 16 or (in_channels // 4) % 8:
            raise ValueError(f"SegHead3D needs in_channels divisible by 32 (got {in_channels})")
        c = in_channels
        self.in_channels, self.num_classes = in_channels, num_classes
        self.net = nn.Sequential(
            nn.ConvTranspose3d(c, c // 2, 4, 2, 1),
            nn.ReLU(),
            SegResBlock3D(c // 2),
            nn.ConvTranspose3d(c // 2, c // 4, 4, 2, 1),
            nn.ReLU(),
            SegResBlock3D(c // 4),
            nn.ConvTranspose3d(c // 4, c // 8, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose3d(c // 8, c // 16, 4, 2, 1),
            nn.ReLU(),
            nn.Conv3d(c // 16, num_classes, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        """Logits [B, classes, 16 D', 16 H', 16 W'] for features [B, C, D', H', W']."""
        return self.net(features)


def tensors_sha256(named: Iterable[tuple[str, Tensor]], extra: Mapping[str, object] | None = None) -> str:
    """sha256 over (name, shape, fp32 little-endian bytes) in the given order, plus sorted ``extra`` settings."""
    digest = hashlib.sha256()
    for name, tensor in named:
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().astype("<f4").tobytes())
    for key in sorted(extra or {}):
        digest.update(f"{key}={(extra or {})[key]!r}".encode())
    return digest.hexdigest()


@dataclass
class PlaneFeatures:
    """One plane's features and what reproduces them."""

    plane: str
    features: Tensor  # [B, C, D', H', W']
    timestep: int
    layer: str
    seed: int
    noise: Tensor = field(repr=False)  # [B, 1, D, H, W]
