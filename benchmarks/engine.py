"""Engine benchmark: our CPU error map against SKELEX's reference procedure, same machine, same run.

ViT-L/16 shapes with random weights (throughput does not depend on the values). The reference is what
``zero_shot_heatmap.py`` does per image: transformers ``ViTMAEForPreTraining``, one extra masked forward plus
10 sequential masked forwards, each image alone. Ours: ``MAEModel.error_map`` with all passes of several images
in one batch, the patch projection once per image, fused qkv + SDPA, no extra pass.

Both runs use the same masks (the reference gets each pass's noise), so the maps are compared directly
(Pearson). Prints images/s for both and the ratio.

    .venv/bin/python benchmarks/engine.py                            # fp32 and int8, 2 rounds
    .venv/bin/python benchmarks/engine.py --precision fp32 bf16 int8  # also the bf16 CPU path
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.imaging.preprocessor_config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tests.engines.reference_models import random_vitl_pair  # noqa: E402


MEAN = torch.tensor(IMAGENET_MEAN).view(1, 1, 1, 3)
STD = torch.tensor(IMAGENET_STD).view(1, 1, 1, 3)


@torch.inference_mode()
def reference_map(hf, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """SKELEX compute_hotspot_map: one extra forward (x0), then one forward per pass, accumulated per pixel."""
    hf(pixel_values=image[None])  # the reference's extra pass that only yields the display image
    err = torch.zeros(1, 224, 224)
    hits = torch.zeros(1, 224, 224)
    for pass_noise in noise:
        out = hf(pixel_values=image[None], noise=pass_noise[None])
        rec = hf.unpatchify(out.logits).permute(0, 2, 3, 1)
        mask = hf.unpatchify(out.mask.unsqueeze(-1).repeat(1, 1, 768)).permute(0, 2, 3, 1)
        x = image[None].permute(0, 2, 3, 1)
        delta = ((rec * STD + MEAN).clamp(0, 1) - (x * STD + MEAN).clamp(0, 1)) * mask
        err += (delta**2).mean(dim=-1)
        hits += mask[..., 0]
    out_map = torch.zeros_like(err)
    out_map[hits > 0] = err[hits > 0] / hits[hits > 0]
    return out_map[0]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-images", type=int, default=2, help="images run through the reference procedure")
    parser.add_argument("--images", type=int, default=4, help="images per batch of ours")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (reference image, our batch)")
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "int8"], default=["fp32", "int8"],
                        help="CPU precisions of ours to time (fp32 is always the reference for agreement)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engines.backends.torch_backend import TorchBackend, cpu_supports_bf16
    from engines.mae.family import MAEModel
    from engines.mae.errormap import noise_from_seed

    print(f"machine: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"bf16 native: {cpu_supports_bf16()}")
    print(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
    hf, fp32 = random_vitl_pair(name="vit-l-random")
    ours = {"fp32": fp32}
    for precision in args.precision:
        if precision != "fp32":
            backend = TorchBackend(fp32.network, "cpu", precision)
            ours[precision] = MAEModel(fp32.network, name=f"vit-l-{precision}", backend=backend)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(max(args.images, args.ref_images), 3, 224, 224, generator=generator)
    noise = noise_from_seed(0, args.passes, 196)

    with torch.inference_mode():  # warm-up: first calls allocate
        hf(pixel_values=images[:1], noise=noise[:1])
    for encoder in ours.values():
        encoder.error_map(images[:1], noise=noise[:2])

    # Interleaved rounds, so both sides see the same (shared, noisy) machine load; medians reported.
    ref_times: list[float] = []
    our_times: dict[str, list[float]] = {p: [] for p in ours}
    reference_maps: dict[int, torch.Tensor] = {}
    our_maps: dict[str, torch.Tensor] = {}
    for round_index in range(args.rounds):
        for i in range(args.ref_images):
            if round_index > 0 and i > 0:
                break  # later rounds time one reference image each, to bound the runtime
            start = time.perf_counter()
            reference_maps[i] = reference_map(hf, images[i], noise)
            ref_times.append(time.perf_counter() - start)
        for precision, encoder in ours.items():
            start = time.perf_counter()
            our_maps[precision], _ = encoder.error_map(images[: args.images], noise=noise)
            our_times[precision].append((time.perf_counter() - start) / args.images)
        print(f"round {round_index + 1}: reference {ref_times[-1]:.2f} s/image; "
              + ", ".join(f"ours {p} {t[-1]:.2f} s/image" for p, t in our_times.items()))

    ref_ips = 1 / statistics.median(ref_times)
    print(f"reference (transformers ViTMAEForPreTraining, 1 + {args.passes} sequential passes per image): "
          f"{ref_ips:.3f} images/s (median of {len(ref_times)} images)")
    compared = sorted(reference_maps)
    for precision, times in our_times.items():
        ips = 1 / statistics.median(times)
        vs_reference = min(pearson(our_maps[precision][i], reference_maps[i]) for i in compared)
        max_diff = max(float((our_maps[precision][i] - reference_maps[i]).abs().max()) for i in compared)
        print(f"ours cpu {precision} ({args.passes} passes x {args.images} images per batch): {ips:.3f} images/s, "
              f"speed-up {ips / ref_ips:.2f}x, Pearson vs reference min {vs_reference:.5f}, max |diff| {max_diff:.2e}")
    print(f"map statistics (fp32, image 0): mean {our_maps['fp32'][0].mean():.4f}, std {our_maps['fp32'][0].std():.4f}")
    print(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
