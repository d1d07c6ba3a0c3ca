"""Regenerate ``tests/engines/golden/orthodiffusion/*``: the authors' OrthoDiffusion code on tiny seeded configs.

The reference code is never committed; this script only reads a checkout of it::

    git clone https://github.com/lt-0123/OrthoDiffusion /tmp/orthodiffusion_ref     # golden files: commit 99d1518
    pip install --target /tmp/orthodiffusion_deps opencv-python-headless           # cv2, for their dataset's resize
    .venv/bin/python tests/engines/golden/make_orthodiffusion_golden.py /tmp/orthodiffusion_ref \\
        --deps /tmp/orthodiffusion_deps

What runs is theirs: ``diffusion_model/unet.py`` (``UNetModel``), ``diffusion_model/trainer.py``
(``GaussianDiffusion``: cosine schedule, ``q_sample``, ``get_feature``), ``dataset.py``
(``NiftiImageLabelDataset.__getitem__``: centre slices, ``cv2.resize`` per slice), ``finetune_segmentation.py``
(``SegHead3D``, ``ResBlock3D``) and ``linear_fusion.py`` (``LinearOrMLP``). Their scripts import packages that
the pieces used here never call (torchvision, nibabel, pandas, torchio, matplotlib, sklearn, einops,
tensorboard); where one is not installed an empty stand-in module satisfies the import. Their modified
``UNetModel.forward`` keeps the skip connections only when ``ret_out=True`` (a plain ``forward(x, t)`` fails with
``pop from empty list``), so the full noise prediction is taken with ``ret_out=True``. ``SegHead3D`` and
``LinearOrMLP`` are taken out of their training scripts with ``ast`` (the scripts start DDP at import).

Seeds make everything reproducible: every parameter is filled by :func:`fill_seeded` (the test applies the same
rule to our networks), and the q_sample noise of each call comes from ``torch.manual_seed(noise_seed)`` right
before their ``get_feature`` (``randn_like`` on the CPU generator), which is what our seeded noise reproduces.

Files written (all small): ``unet_a.npz`` (the real topology at 32 base channels: mult (1,1,2,2,4), attention at
ds 16, input [1,1,16,32,32]: features in_5 / mid_0 / mid_1 / mid_2, full noise prediction, the noise and the
schedule), ``unet_b.npz`` (a variant: mult (1,2,2), 2 res blocks, attention at ds 2 and 4, 2 heads, batch of 2
with different timesteps), ``planes.npz`` (three DICOM-layout volumes through their input path, three plane UNets
at t = 200/150/50 with mid_0/mid_0/mid_2 as in their README, mean pooling, simple_concat, ``LinearOrMLP`` +
sigmoid for 8 labels, and ``SegHead3D`` on plane 0's mid_2 at t = 100), ``reference_keys.json`` (names and
shapes of the real 64-channel ``GaussianDiffusion`` state dict).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "orthodiffusion"
LABELS = ["ACL", "PCL", "MM", "LM", "MCL", "LCL", "PD", "EFFU"]


def fill_seeded(module: nn.Module, seed: int) -> None:
    """Every tensor of ``module``'s state dict, in sorted-name order, from one generator: matrices and kernels
    ~ N(0, 1/fan_in), 1-D weights (norm scales) 1 + 0.1 N(0, 1), 1-D biases 0.1 N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    filled = {}
    for name in sorted(state):
        shape = tuple(state[name].shape)
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        if len(shape) >= 2:
            values = values / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            values = 1.0 + 0.1 * values
        else:
            values = 0.1 * values
        filled[name] = values
    module.load_state_dict(filled)


def stub_missing(names: list[str]) -> None:
    for name in names:
        try:
            __import__(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules:
                    sys.modules[sub] = types.ModuleType(sub)
    fillers = {
        "torchvision": ["transforms", "utils"],
        "torchvision.transforms": ["RandomCrop", "Compose", "ToPILImage", "Resize", "ToTensor", "Lambda"],
        "sklearn.preprocessing": ["MinMaxScaler"],
        "einops": ["rearrange"],
        "torch.utils.tensorboard": ["SummaryWriter"],
    }
    for module_name, attrs in fillers.items():
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and not hasattr(module, attr):
                setattr(module, attr, None)


def classes_from(path: Path, names: list[str]) -> dict[str, type]:
    """Execute only the named class definitions of a reference script (its top level starts training)."""
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in names]
    namespace: dict[str, object] = {"torch": torch, "nn": nn, "F": torch.nn.functional}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in names}  # type: ignore[misc]


def reference_input(dataset_cls: type, volume_dicom: np.ndarray, size: int, depth: int) -> np.ndarray:
    """Their classification input path on a volume given as DICOM [slices, rows, cols]: the NIfTI array dcm2niix
    writes holds each slice as ``rot90(pixels, k=3)`` (the rotation their segmentation masks get to match it) and
    slices on the third axis; then ``__getitem__`` (centre crop, cv2 linear resize) and their transform."""
    nifti = np.stack([np.rot90(s, k=3) for s in volume_dicom.astype(np.float64)], axis=2)
    dataset = dataset_cls.__new__(dataset_cls)
    dataset.input_size, dataset.depth_size, dataset.transform = size, depth, None
    dataset.samples = [{"path": "volume", "label": torch.zeros(8), "id": "x"}]
    dataset.read_image = lambda _path: nifti
    img, _label, _id = dataset.__getitem__(0)
    # linear_classifier.py's transform, line by line
    t = torch.tensor(img).float()
    t = (t - t.min()) / (t.max() - t.min() + 1e-8)
    t = (t * 2) - 1
    t = t.permute(2, 0, 1)
    # contiguous, as their DataLoader's collate (torch.stack) hands it to get_feature: randn_like follows the
    # strides of its argument, so the permuted view itself would draw the same numbers in another order
    return np.ascontiguousarray(t.unsqueeze(0).numpy())  # [1, D, H, W]


def features(diffusion: nn.Module, x: torch.Tensor, t: list[int], name: str, noise_seed: int) -> np.ndarray:
    torch.manual_seed(noise_seed)
    with torch.no_grad():
        return diffusion.get_feature(x, torch.tensor(t, dtype=torch.long), name=name).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="checkout of github.com/lt-0123/OrthoDiffusion")
    parser.add_argument("--deps", type=Path, help="folder with opencv-python-headless (pip --target)")
    args = parser.parse_args()
    if args.deps:
        sys.path.append(str(args.deps))  # after the venv: its numpy wins
    sys.path.insert(0, str(args.reference))
    stub_missing(
        ["torchvision", "torchvision.transforms", "nibabel", "einops", "torch.utils.tensorboard", "pandas", "torchio",
         "matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.preprocessing"]
    )
    from dataset import NiftiImageLabelDataset  # noqa: E402  (reference code)
    from diffusion_model.trainer import GaussianDiffusion  # noqa: E402
    from diffusion_model.unet import UNetModel, create_model  # noqa: E402

    seg_classes = classes_from(args.reference / "finetune_segmentation.py", ["ResBlock3D", "SegHead3D"])
    head_classes = classes_from(args.reference / "linear_fusion.py", ["LinearOrMLP"])
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)

    def diffusion_for(unet: nn.Module, size: int, depth: int) -> nn.Module:
        return GaussianDiffusion(unet, image_size=size, depth_size=depth, timesteps=1000, loss_type="l2").eval()

    # --- A: the real topology, narrower --------------------------------------------------------------------
    config_a = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 1, 2, 2, 4), attention_resolutions=(16,),
                    num_heads=1)
    unet_a = UNetModel(image_size=32, in_channels=1, out_channels=1, dims=3, **config_a)
    fill_seeded(unet_a, 11)
    diff_a = diffusion_for(unet_a, 32, 16)
    gen = torch.Generator().manual_seed(5)
    x_a = torch.rand((1, 1, 16, 32, 32), generator=gen) * 2 - 1
    out_a = {"x": x_a.numpy(), "t": np.array([100]), "noise_seed": np.array(7), "weight_seed": np.array(11)}
    for name in ("in_5", "mid_0", "mid_1", "mid_2"):
        out_a[name] = features(diff_a, x_a, [100], name, 7)
    torch.manual_seed(7)
    out_a["noise"] = torch.randn_like(x_a).numpy()
    with torch.no_grad():
        out_a["noise_prediction"] = unet_a(x_a, torch.tensor([100]), ret_out=True)[0].numpy()
    for buffer in ("betas", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        out_a[buffer] = getattr(diff_a, buffer).numpy()
    np.savez_compressed(OUT / "unet_a.npz", config=json.dumps(config_a), **out_a)

    # --- B: a variant, to check the generality of the port -------------------------------------------------
    config_b = dict(model_channels=32, num_res_blocks=2, channel_mult=(1, 2, 2), attention_resolutions=(2, 4),
                    num_heads=2)
    unet_b = UNetModel(image_size=16, in_channels=1, out_channels=1, dims=3, **config_b)
    fill_seeded(unet_b, 12)
    diff_b = diffusion_for(unet_b, 16, 8)
    x_b = torch.rand((2, 1, 8, 16, 16), generator=gen) * 2 - 1
    out_b = {"x": x_b.numpy(), "t": np.array([3, 777]), "noise_seed": np.array(8), "weight_seed": np.array(12)}
    for name in ("mid_0", "mid_1", "mid_2"):
        out_b[name] = features(diff_b, x_b, [3, 777], name, 8)
    with torch.no_grad():
        out_b["noise_prediction"] = unet_b(x_b, torch.tensor([3, 777]), ret_out=True)[0].numpy()
    np.savez_compressed(OUT / "unet_b.npz", config=json.dumps(config_b), **out_b)

    # --- three planes through their input path, pooled, concatenated, linear head; seg head ------------------
    rng = np.random.default_rng(3)
    shapes = [(21, 40, 36), (18, 28, 44), (16, 32, 32)]  # odd / even slice counts, non-square, down- and up-sizing
    planes = {"timesteps": np.array([200, 150, 50]), "layers": np.array(["mid_0", "mid_0", "mid_2"]),
              "noise_seeds": np.array([101, 102, 103]), "weight_seeds": np.array([21, 22, 23])}
    pooled = []
    for i, shape in enumerate(shapes):
        raw = rng.integers(0, 1200, size=shape).astype(np.uint16)
        raw[:, : shape[1] // 3] //= 4  # some structure, so min-max and resizing matter
        planes[f"raw_{i}"] = raw
        x = reference_input(NiftiImageLabelDataset, raw, 32, 16)
        planes[f"input_{i}"] = x
        unet = UNetModel(image_size=32, in_channels=1, out_channels=1, dims=3, **config_a)
        fill_seeded(unet, int(planes["weight_seeds"][i]))
        diffusion = diffusion_for(unet, 32, 16)
        feat = features(diffusion, torch.from_numpy(x)[None], [int(planes["timesteps"][i])], str(planes["layers"][i]),
                        int(planes["noise_seeds"][i]))
        planes[f"features_{i}"] = feat
        pooled.append(torch.from_numpy(feat).mean(dim=(2, 3, 4)))  # their pooling without attn_pool
        if i == 0:
            seg_feat = torch.from_numpy(features(diffusion, torch.from_numpy(x)[None], [100], "mid_2", 104))
    fused = torch.cat(pooled, dim=-1)  # linear_fusion.fuse_triplets, simple_concat
    head = head_classes["LinearOrMLP"](fused.shape[1], len(LABELS), use_mlp=False)
    fill_seeded(head, 31)
    seg = seg_classes["SegHead3D"](seg_feat.shape[1], 11)
    fill_seeded(seg, 41)
    with torch.no_grad():
        logits = head(fused)
        seg_logits = seg(seg_feat)
    planes.update(
        pooled=fused.numpy(), logits=logits.numpy(), probabilities=torch.sigmoid(logits).numpy(),
        head_seed=np.array(31),
        seg_features=seg_feat.numpy(), seg_noise_seed=np.array(104), seg_seed=np.array(41),
        seg_logits_strided=seg_logits[:, :, ::4, ::4, ::4].numpy(),
        seg_labels=seg_logits.argmax(dim=1).numpy().astype(np.uint8),
        seg_margin=(seg_logits.topk(2, dim=1).values[:, 0] - seg_logits.topk(2, dim=1).values[:, 1]).numpy()
        .astype(np.float16),
    )
    np.savez_compressed(OUT / "planes.npz", config=json.dumps(config_a), labels=np.array(LABELS), **planes)

    # --- the real model's checkpoint layout --------------------------------------------------------------
    real = GaussianDiffusion(create_model(256, 64, 1, in_channels=1, out_channels=1), image_size=256, depth_size=16,
                             timesteps=1000, loss_type="l2")
    keys = {name: list(tensor.shape) for name, tensor in real.state_dict().items()}
    (OUT / "reference_keys.json").write_text(json.dumps(keys, indent=0) + "\n")
    params = sum(p.numel() for p in real.denoise_fn.parameters())
    print(f"wrote {OUT}: real UNet has {params} parameters, {len(keys)} state-dict entries")


if __name__ == "__main__":
    main()
