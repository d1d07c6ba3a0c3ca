"""The OrthoDiffusion family: three plane UNets, their features, fused linear heads and the 3-D segmentation head.

A model folder holds ``orthodiffusion.json`` (:class:`OrthoDiffusionConfig`) and the files it names::

    {"format": "msknode-orthodiffusion/1", "name": "orthodiffusion-knee", "version": "1",
     "unet": {"model_channels": 64, ...},                      # optional: UNet3DConfig, OrthoDiffusion's by default
     "input": {"depth": 16, "size": 256, "rot90_k": 3, "reverse_slices": false},
     "seed": 0,
     "planes": [{"name": "sagittal", "weights": "sagittal/model.pt", "timestep": 200, "layer": "mid_0"},
                {"name": "coronal",  "weights": "coronal/model.pt",  "timestep": 150, "layer": "mid_0"},
                {"name": "axial",    "weights": "axial/model.pt",    "timestep": 50,  "layer": "mid_2"}],
     "heads": [{"name": "knee", "file": "heads/knee.pt",
                "labels": ["ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU"]}],
     "segmentation": {"plane": "sagittal", "weights": "seg/seghead.pt", "unet": null,
                      "timestep": 100, "layer": "mid_2", "classes": 11, "class_names": null}}

Plane UNets are the authors' ``model.pt`` (``["ema"]``, ``denoise_fn.module.`` prefix) or plain state dicts
(:mod:`engines.orthodiffusion.loaders`). Heads sit on the fused embedding (below): files listed under ``heads`` are
the authors' fusion classifier state dicts (``LinearOrMLP``: ``net.weight``/``net.bias``; a per-plane
``LinearClassifier``: ``fc.*``) with the labels given here, and ``heads/*.json`` + ``.safetensors`` beside them are
our format 3e (:mod:`engines.heads`), tied to :attr:`OrthoDiffusionModel.encoder_hash`.

**Input path** (their ``dataset.py`` and transform), from an assembled volume [slices, rows, cols] in DICOM pixel
layout, slices in the order the volume assembly gives (along the slice normal): the centre ``depth`` slices
(``start = S // 2 - depth // 2``), each rotated by ``np.rot90(k=rot90_k)`` (k = 3: the orientation of the dcm2niix
NIfTI they trained on, which is why their PNG masks get ``rot90(k=3)``), resized to ``size`` x ``size`` bilinearly
with half-pixel centres (``cv2.resize`` INTER_LINEAR), then min-max over the whole cropped volume to [-1, 1].
Fewer slices than ``depth`` is refused (their classification dataset skips such volumes).

**Features**: ``q_sample`` noise at the plane's timestep, from a generator seeded with the plane's ``seed``
(default: the model seed + the plane's index), so a study gives the same numbers on every run; then the plane
UNet up to the configured layer (``mid_0`` / ``mid_1`` / ``mid_2`` / ``in_N``). **Fusion**: each plane's
feature map averaged over D, H, W, concatenated in config order (their ``simple_concat``): the *embedding*.

**Segmentation**: ``SegHead3D`` on one plane's features (their fine-tuning used t = 100, ``mid_2``), argmax over
the classes, which is a label volume on the model's input grid [depth, size, size]; :func:`labels_to_volume` maps it
back onto the assembled volume's slices, rows and columns (nearest neighbour; slices outside the centre window
are 0, background).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engines.heads import LinearHead, load_heads_dir
from engines.orthodiffusion.loaders import (
    CheckpointMismatch,
    UNetCheckpoint,
    check_and_load,
    load_tensor_file,
    read_state_dict,
    read_unet_checkpoint,
)
from engines.orthodiffusion.network import (
    NoiseSchedule,
    PlaneFeatures,
    SegHead3D,
    UNet3DConfig,
    layer_channels,
    seeded_noise,
    tensors_sha256,
)


FAMILY = "orthodiffusion"
CONFIG_FILE = "orthodiffusion.json"
CONFIG_FORMAT = "msknode-orthodiffusion/1"
KNEE_LABELS = ("ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU")  # their dataset.py order
SEGMENTATION_CLASSES = 11


class ConfigError(ValueError):
    """``orthodiffusion.json`` is missing, malformed, or names files that are not there."""


@dataclass(frozen=True)
class InputSpec:
    depth: int = 16
    size: int = 256
    rot90_k: int = 3
    reverse_slices: bool = False


@dataclass(frozen=True)
class PlaneSpec:
    name: str
    weights: str
    timestep: int = 100
    layer: str = "mid_2"
    seed: int = 0


@dataclass(frozen=True)
class HeadSpec:
    name: str
    file: str
    labels: tuple[str, ...] = KNEE_LABELS


@dataclass(frozen=True)
class SegmentationSpec:
    plane: str
    weights: str
    unet: str | None = None  # their fine-tuning also updates the UNet's input and middle blocks: its own weights
    timestep: int = 100
    layer: str = "mid_2"
    classes: int = SEGMENTATION_CLASSES
    class_names: tuple[str, ...] | None = None
    seed: int = 0


@dataclass(frozen=True)
class OrthoDiffusionConfig:
    name: str
    version: str
    unet: UNet3DConfig
    input: InputSpec
    planes: tuple[PlaneSpec, ...]
    heads: tuple[HeadSpec, ...] = ()
    segmentation: SegmentationSpec | None = None
    seed: int = 0

    @classmethod
    def read(cls, folder: str | Path) -> OrthoDiffusionConfig:
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{Path(folder)} has no {CONFIG_FILE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not JSON ({exc})") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = CONFIG_FILE) -> OrthoDiffusionConfig:
        def need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
            if key not in mapping:
                raise ConfigError(f"{source}: {where} needs {key!r}")
            return mapping[key]

        def pick(kind: type, raw: Mapping[str, Any], where: str, **defaults: Any) -> Any:
            allowed = set(kind.__dataclass_fields__)
            unknown = sorted(set(raw) - allowed)
            if unknown:
                raise ConfigError(f"{source}: {where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
            values = {**defaults, **raw}
            for key in ("labels", "class_names"):
                if values.get(key) is not None:
                    values[key] = tuple(str(v) for v in values[key])
            try:
                return kind(**values)
            except TypeError as exc:
                raise ConfigError(f"{source}: {where}: {exc}") from exc

        if data.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
            raise ConfigError(f"{source}: format {data.get('format')!r} is not {CONFIG_FORMAT!r}")
        seed = int(data.get("seed", 0))
        try:
            unet = UNet3DConfig.from_dict(data.get("unet", {}))
        except ValueError as exc:
            raise ConfigError(f"{source}: unet: {exc}") from exc
        planes_raw = need(data, "planes", "the model")
        if not planes_raw:
            raise ConfigError(f"{source}: planes is empty")
        planes = tuple(
            pick(PlaneSpec, p, f"planes[{i}]", seed=seed + i) for i, p in enumerate(planes_raw)
        )
        names = [p.name for p in planes]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: plane names repeat: {names}")
        heads = tuple(pick(HeadSpec, h, f"heads[{i}]") for i, h in enumerate(data.get("heads", [])))
        seg_raw = data.get("segmentation")
        segmentation = pick(SegmentationSpec, seg_raw, "segmentation", seed=seed + 100) if seg_raw else None
        if segmentation and segmentation.plane not in names:
            raise ConfigError(f"{source}: segmentation.plane {segmentation.plane!r} is not one of {names}")
        if segmentation and segmentation.class_names and len(segmentation.class_names) != segmentation.classes:
            raise ConfigError(f"{source}: segmentation has {segmentation.classes} classes but "
                              f"{len(segmentation.class_names)} class_names")
        config = cls(
            name=str(need(data, "name", "the model")),
            version=str(data.get("version", "")),
            unet=unet,
            input=pick(InputSpec, data.get("input", {}), "input"),
            planes=planes,
            heads=heads,
            segmentation=segmentation,
            seed=seed,
        )
        config.check()
        return config

    def check(self) -> None:
        factor = 2 ** self.unet.downsamplings
        if self.input.depth % factor or self.input.size % factor:
            raise ConfigError(
                f"input depth {self.input.depth} and size {self.input.size} must be multiples of {factor}"
            )
        layers = tuple(layer_channels(self.unet))
        for spec in [*self.planes, *([self.segmentation] if self.segmentation else [])]:
            if spec.layer not in layers:
                raise ConfigError(f"{spec}: layer {spec.layer!r} is not one of {', '.join(layers)}")
            if not 0 <= spec.timestep < self.unet.timesteps:
                raise ConfigError(f"{spec}: timestep {spec.timestep} outside 0..{self.unet.timesteps - 1}")


@dataclass(frozen=True)
class SliceWindow:
    """Which slices of the assembled volume the model saw: ``start:stop`` (in assembled order)."""

    start: int
    stop: int
    total: int


def centre_window(slices: int, depth: int) -> SliceWindow:
    """Their ``dataset.py`` crop: ``centre = S // 2``, ``start = centre - depth // 2``, ``depth`` slices."""
    if slices < depth:
        raise ValueError(f"the volume has {slices} slices; the model needs at least {depth}")
    start = max(0, slices // 2 - depth // 2)
    return SliceWindow(start, start + depth, slices)


def _as_volume(volume: np.ndarray | Tensor, plane: str) -> np.ndarray:
    array = volume.detach().cpu().numpy() if isinstance(volume, Tensor) else np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"{plane}: expected a volume [slices, rows, cols], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{plane}: volume must be real numbers, got {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{plane}: volume has NaN or infinite values")
    return array


def prepare_volume(
    volume: np.ndarray | Tensor, spec: InputSpec = InputSpec(), plane: str = "volume"
) -> tuple[Tensor, SliceWindow]:
    """Model input [1, 1, depth, size, size] in [-1, 1] and the slice window it came from (see the module doc)."""
    array = _as_volume(volume, plane)
    if spec.reverse_slices:
        array = array[::-1]
    window = centre_window(array.shape[0], spec.depth)
    crop = np.rot90(array[window.start : window.stop], k=spec.rot90_k, axes=(1, 2))
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float64))[:, None]
    if tuple(t.shape[-2:]) != (spec.size, spec.size):
        t = F.interpolate(t, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    t = t[:, 0].float()
    t = (t - t.min()) / (t.max() - t.min() + 1e-8)
    return (t * 2 - 1)[None, None], window


def labels_to_volume(
    labels: np.ndarray | Tensor, window: SliceWindow, volume_shape: Sequence[int], spec: InputSpec = InputSpec()
) -> np.ndarray:
    """A label volume on the model grid [depth, size, size] -> the assembled volume's grid [slices, rows, cols].

    Undoes the input path: in-plane nearest-neighbour resize (half-pixel centres) to the rotated slice size, the
    inverse rotation, and placement at the window's slices; all other slices are 0 (background).
    """
    grid = labels.detach().cpu() if isinstance(labels, Tensor) else torch.from_numpy(np.asarray(labels))
    slices, rows, cols = (int(v) for v in volume_shape)
    if grid.dim() != 3 or grid.shape[0] != window.stop - window.start:
        raise ValueError(f"labels {tuple(grid.shape)} do not match the {window.stop - window.start}-slice window")
    if window.total != slices:
        raise ValueError(f"window is for {window.total} slices, the volume has {slices}")
    rotated = (cols, rows) if spec.rot90_k % 2 else (rows, cols)
    resized = F.interpolate(grid[:, None].float(), size=rotated, mode="nearest-exact")[:, 0]
    back = np.rot90(resized.numpy().astype(np.uint8), k=-spec.rot90_k, axes=(1, 2))
    out = np.zeros((slices, rows, cols), dtype=np.uint8)
    out[window.start : window.stop] = back
    return out[::-1].copy() if spec.reverse_slices else out


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [slices, rows, cols] uint8 on the assembled volume's grid
    model_grid: np.ndarray  # [depth, size, size] uint8, what the head produced
    window: SliceWindow
    plane: str
    class_names: tuple[str, ...] | None
    seed: int


@dataclass
class _Plane:
    spec: PlaneSpec
    checkpoint: UNetCheckpoint


def head_from_state_dict(path: Path, spec: HeadSpec, in_features: int, encoder_hash: str) -> LinearHead:
    """The authors' fusion / probe classifier as a sigmoid head: ``net.*`` (``LinearOrMLP``) or ``fc.*``
    (``LinearClassifier``)."""
    head = LinearHead(spec.name, in_features, list(spec.labels), "sigmoid", encoder_sha256=encoder_hash,
                      provenance={"source": str(path.name), "format": "orthodiffusion-linear"})
    raw = load_tensor_file(path)
    state = raw["state_dict"] if isinstance(raw.get("state_dict"), Mapping) else raw
    for prefix in ("net.", "fc.", "linear.", "module.net.", "module.fc."):
        if f"{prefix}weight" in state:
            mapped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            extra = sorted(k for k in state if not k.startswith(prefix))
            if extra:
                raise CheckpointMismatch(f"{path.name}: unexpected tensors {extra[:6]} (an attention-pooling or MLP "
                                         "head; only linear heads on mean-pooled features are supported)")
            break
    else:
        raise CheckpointMismatch(
            f"{path.name}: no linear head (net.weight / fc.weight) in {sorted(state)[:6]}; an MLP head "
            "(net.0.weight ...) is not supported"
        )
    check_and_load(head.linear, mapped, path.name)
    return head.eval()


class OrthoDiffusionModel:
    """A loaded OrthoDiffusion model: plane UNets + schedule, heads on the fused embedding, optional segmentation.

    Implements :class:`engines.family.VolumeModelFamily` (volumes per plane in, not 2-D image batches).
    """

    family = FAMILY
    supports_error_map = False
    backend_name = "cpu"
    precision = "fp32"

    def __init__(
        self,
        config: OrthoDiffusionConfig,
        planes: Mapping[str, UNetCheckpoint],
        *,
        folder: Path | None = None,
        segmentation_head: SegHead3D | None = None,
        segmentation_unet: UNetCheckpoint | None = None,
        device: str = "cpu",
    ) -> None:
        missing = [p.name for p in config.planes if p.name not in planes]
        if missing:
            raise ValueError(f"no UNet for plane(s) {missing}")
        self.config = config
        self.name = config.name
        self.folder = folder
        self._device = torch.device(device)
        self.planes: dict[str, _Plane] = {
            p.name: _Plane(p, planes[p.name]) for p in config.planes
        }
        for plane in self.planes.values():
            plane.checkpoint.unet.to(self._device).eval()
            plane.checkpoint.schedule.to(self._device)
        self.format = ",".join(sorted({p.checkpoint.format for p in self.planes.values()}))
        self.encoder_hash = tensors_sha256(
            [(f"{n}.{k}", v) for n, p in self.planes.items() for k, v in p.checkpoint.unet.state_dict().items()]
            + [
                (f"{n}.schedule.{k}", v)
                for n, p in self.planes.items()
                for k, v in p.checkpoint.schedule.state_dict().items()
            ],
            {**{f"{p.name}": (p.timestep, p.layer, p.seed) for p in config.planes}, "input": config.input},
        )
        self.version = config.version or self.encoder_hash[:12]
        self.segmentation_head = segmentation_head.to(self._device).eval() if segmentation_head else None
        self.segmentation_unet = segmentation_unet
        if segmentation_unet is not None:
            segmentation_unet.unet.to(self._device).eval()
            segmentation_unet.schedule.to(self._device)
        self.heads: dict[str, LinearHead] = {}
        self._last: tuple[Tensor, dict[str, PlaneFeatures]] | None = None

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def plane_names(self) -> tuple[str, ...]:
        return tuple(self.planes)

    @property
    def embedding_dim(self) -> int:
        """Width of the fused embedding: the sum of each plane's feature channels (3 x 256 for mid layers)."""
        channels = layer_channels(self.config.unet)
        return sum(channels[p.layer] for p in self.config.planes)

    def add_head(self, head: LinearHead) -> None:
        head.check_encoder(self.encoder_hash)
        if head.in_features != self.embedding_dim:
            raise ValueError(
                f"head {head.name!r} reads {head.in_features} features; the fused embedding has {self.embedding_dim}"
            )
        self.heads[head.name] = head.to(self._device).eval()

    # -- features -------------------------------------------------------------------------------------------
    def prepare(self, volume: np.ndarray | Tensor, plane: str) -> tuple[Tensor, SliceWindow]:
        return prepare_volume(volume, self.config.input, plane)

    @torch.inference_mode()
    def _features(
        self, checkpoint: UNetCheckpoint, x: Tensor, plane: str, timestep: int, layer: str, seed: int
    ) -> PlaneFeatures:
        x = x.to(self._device, torch.float32)
        noise = seeded_noise(x.shape, seed)
        t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=self._device)
        noisy = checkpoint.schedule.q_sample(x, t, noise.to(self._device))
        feats = checkpoint.unet.features(noisy, t, layer)
        return PlaneFeatures(plane, feats.float(), timestep, layer, seed, noise)

    def plane_features(self, plane: str, volume: np.ndarray | Tensor) -> PlaneFeatures:
        """The plane UNet's features for one assembled volume (input path, seeded q_sample, UNet to the layer)."""
        if plane not in self.planes:
            raise ValueError(f"unknown plane {plane!r}; this model has {', '.join(self.planes)}")
        spec = self.planes[plane].spec
        x, _window = self.prepare(volume, plane)
        return self._features(self.planes[plane].checkpoint, x, plane, spec.timestep, spec.layer, spec.seed)

    def embed(self, volumes: Mapping[str, np.ndarray | Tensor]) -> Tensor:
        """Fused embedding [1, D]: each plane's features averaged over D, H, W, concatenated in config order."""
        missing = [p for p in self.planes if p not in volumes]
        if missing:
            raise ValueError(f"missing volume(s) for plane(s) {missing}; this model needs {', '.join(self.planes)}")
        extra = sorted(set(volumes) - set(self.planes))
        if extra:
            raise ValueError(f"volume(s) for unknown plane(s) {extra}; this model has {', '.join(self.planes)}")
        per_plane = {p: self.plane_features(p, volumes[p]) for p in self.planes}
        embedding = torch.cat([f.features.mean(dim=(2, 3, 4)) for f in per_plane.values()], dim=-1).cpu()
        self._last = (embedding, per_plane)
        return embedding

    def last_features(self) -> dict[str, PlaneFeatures]:
        """The per-plane features of the last :meth:`embed` (for inspection and tests)."""
        if self._last is None:
            raise RuntimeError("no embedding computed yet")
        return self._last[1]

    @torch.inference_mode()
    def predict(
        self, volumes: Mapping[str, np.ndarray | Tensor] | None = None, embedding: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Every head (sigmoid for the authors' heads) on one fused embedding: head name -> probabilities [1, K]."""
        if embedding is None:
            if volumes is None:
                raise ValueError("predict needs the volumes or their embedding")
            embedding = self.embed(volumes)
        emb = embedding.to(self._device)
        return {name: head.predict(emb).float().cpu() for name, head in self.heads.items()}

    # -- segmentation ---------------------------------------------------------------------------------------
    @property
    def supports_segmentation(self) -> bool:
        return self.segmentation_head is not None

    @torch.inference_mode()
    def segment(self, volume: np.ndarray | Tensor) -> SegmentationResult:
        """Class labels for the segmentation plane's volume, on the model grid and on the volume's own grid."""
        spec = self.config.segmentation
        if spec is None or self.segmentation_head is None:
            raise RuntimeError(f"model {self.name!r} has no segmentation head")
        array = _as_volume(volume, spec.plane)
        x, window = self.prepare(array, spec.plane)
        checkpoint = self.segmentation_unet or self.planes[spec.plane].checkpoint
        feats = self._features(checkpoint, x, spec.plane, spec.timestep, spec.layer, spec.seed)
        logits = self.segmentation_head(feats.features)
        if tuple(logits.shape[2:]) != tuple(x.shape[2:]):
            raise RuntimeError(
                f"segmentation logits {tuple(logits.shape[2:])} are not on the input grid {tuple(x.shape[2:])}"
            )
        grid = logits.argmax(dim=1)[0].to(torch.uint8).cpu()
        labels = labels_to_volume(grid, window, array.shape, self.config.input)
        return SegmentationResult(labels, grid.numpy(), window, spec.plane, spec.class_names, spec.seed)

    # -- description ----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "encoder_hash": self.encoder_hash,
            "backend": self.backend_name,
            "precision": self.precision,
            "device": self.device,
            "planes": {n: {"timestep": p.spec.timestep, "layer": p.spec.layer, "seed": p.spec.seed}
                       for n, p in self.planes.items()},
            "heads": {n: h.labels for n, h in self.heads.items()},
            "segmentation": None if not self.config.segmentation else {
                "plane": self.config.segmentation.plane, "classes": self.config.segmentation.classes},
        }

    def inspect(self) -> dict[str, Any]:
        info = self.describe()
        info["unet"] = self.config.unet.to_dict()
        info["input"] = vars(self.config.input).copy()
        info["parameters_per_plane"] = {
            n: sum(t.numel() for t in p.checkpoint.unet.parameters()) for n, p in self.planes.items()}
        info["schedule"] = {n: p.checkpoint.schedule_source for n, p in self.planes.items()}
        info["notes"] = [note for p in self.planes.values() for note in p.checkpoint.notes]
        info["embedding_dim"] = self.embedding_dim
        return info


def load_orthodiffusion(path: str | Path, device: str = "cpu", load_heads: bool = True) -> OrthoDiffusionModel:
    """Load a model folder (``orthodiffusion.json`` and the files it names); every missing file is named."""
    folder = Path(path)
    config = OrthoDiffusionConfig.read(folder)

    def existing(rel: str, what: str) -> Path:
        file = folder / rel
        if not file.is_file():
            raise ConfigError(f"{folder / CONFIG_FILE}: {what} file {rel!r} does not exist")
        return file

    planes = {
        p.name: read_unet_checkpoint(existing(p.weights, f"plane {p.name!r}"), config.unet) for p in config.planes
    }
    seg_head = seg_unet = None
    if config.segmentation is not None:
        spec = config.segmentation
        seg_head = SegHead3D(layer_channels(config.unet)[spec.layer], spec.classes)
        read_state_dict(existing(spec.weights, "segmentation"), seg_head)
        if spec.unet:
            seg_unet = read_unet_checkpoint(existing(spec.unet, "segmentation UNet"), config.unet)
    model = OrthoDiffusionModel(config, planes, folder=folder, segmentation_head=seg_head, segmentation_unet=seg_unet,
                                device=device)
    if load_heads:
        for spec in config.heads:
            model.add_head(head_from_state_dict(existing(spec.file, f"head {spec.name!r}"), spec,
                                                model.embedding_dim, model.encoder_hash))
        heads_dir = folder / "heads"
        if heads_dir.is_dir():
            for head in load_heads_dir(heads_dir, model.encoder_hash).values():
                model.add_head(head)
    return model


__all__ = [
    "CONFIG_FILE",
    "FAMILY",
    "KNEE_LABELS",
    "ConfigError",
    "HeadSpec",
    "InputSpec",
    "NoiseSchedule",
    "OrthoDiffusionConfig",
    "OrthoDiffusionModel",
    "PlaneSpec",
    "SegmentationResult",
    "SegmentationSpec",
    "SliceWindow",
    "centre_window",
    "labels_to_volume",
    "load_orthodiffusion",
    "prepare_volume",
]
