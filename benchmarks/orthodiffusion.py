"""CPU time and memory of one OrthoDiffusion study: three plane UNets at the real shape (64 base channels,
input 16 x 256 x 256), from assembled volumes to the fused embedding, the knee heads and (optionally) the
segmentation head. Not a test: it prints figures (JSON) for docs/engine.md.

    nice -n 10 .venv/bin/python benchmarks/orthodiffusion.py [--slices 24 --rows 384 --cols 384] [--segment]

Weights are random (PyTorch's default initialisation): time and memory do not depend on their values. Peak RSS is
the process's ``ru_maxrss`` (weights of three UNets, ~138 MB each in fp32, plus the activations of one pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import numpy as np
import torch

from engines.heads import LinearHead
from engines.orthodiffusion.family import (
    KNEE_LABELS,
    OrthoDiffusionConfig,
    OrthoDiffusionModel,
)
from engines.orthodiffusion.loaders import UNetCheckpoint
from engines.orthodiffusion.network import NoiseSchedule, SegHead3D, UNet3D, UNet3DConfig


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--cols", type=int, default=384)
    parser.add_argument("--segment", action="store_true", help="also run the segmentation head on one plane")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = OrthoDiffusionConfig.from_dict(
        {
            "name": "benchmark",
            "planes": [
                {"name": "sagittal", "weights": "-", "timestep": 200, "layer": "mid_0"},
                {"name": "coronal", "weights": "-", "timestep": 150, "layer": "mid_0"},
                {"name": "axial", "weights": "-", "timestep": 50, "layer": "mid_2"},
            ],
            "segmentation": {"plane": "sagittal", "weights": "-"} if args.segment else None,
        }
    )
    rss_start = peak_rss_mib()
    started = time.perf_counter()
    unet_config = UNet3DConfig()
    planes = {
        p.name: UNetCheckpoint(UNet3D(unet_config).eval(), NoiseSchedule(), "in-memory", "cosine")
        for p in config.planes
    }
    seg_head = SegHead3D(unet_config.feature_channels, 11) if args.segment else None
    model = OrthoDiffusionModel(config, planes, segmentation_head=seg_head)
    model.add_head(LinearHead("knee", model.embedding_dim, list(KNEE_LABELS), "sigmoid", model.encoder_hash))
    build_s = time.perf_counter() - started
    rss_model = peak_rss_mib()

    rng = np.random.default_rng(0)
    volumes = {
        name: rng.integers(0, 2000, size=(args.slices, args.rows, args.cols)).astype(np.uint16) for name in planes
    }
    started = time.perf_counter()
    embedding = model.embed(volumes)
    probabilities = model.predict(embedding=embedding)["knee"]
    embed_s = time.perf_counter() - started
    per_plane = {}
    for name in planes:  # each plane alone, for the split
        t0 = time.perf_counter()
        model.plane_features(name, volumes[name])
        per_plane[name] = round(time.perf_counter() - t0, 2)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "volume": [args.slices, args.rows, args.cols],
        "model_input": [1, 1, config.input.depth, config.input.size, config.input.size],
        "parameters_per_plane": sum(p.numel() for p in planes["sagittal"].unet.parameters()),
        "build_s": round(build_s, 2),
        "three_plane_embed_and_heads_s": round(embed_s, 2),
        "per_plane_s": per_plane,
        "embedding_dim": int(embedding.shape[1]),
        "probabilities_shape": list(probabilities.shape),
        "peak_rss_mib_start": round(rss_start, 1),
        "peak_rss_mib_after_build": round(rss_model, 1),
        "peak_rss_mib_after_embed": round(peak_rss_mib(), 1),
    }
    if args.segment:
        t0 = time.perf_counter()
        seg = model.segment(volumes["sagittal"])
        result["segment_s"] = round(time.perf_counter() - t0, 2)
        result["segment_labels_shape"] = list(seg.labels.shape)
        result["peak_rss_mib_after_segment"] = round(peak_rss_mib(), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
