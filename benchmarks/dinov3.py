"""DINOv3 benchmark: our ViT-L/16 embedding on the CPU against transformers' DINOv3ViTModel, same inputs, same run.

ViT-L/16 with OrthoFoundation's shapes (1024 wide, 24 blocks, 16 heads, 4 register tokens, RoPE base 100) and
random weights (throughput does not depend on the values); both models hold the same tensors. The reference is
``DINOv3ViTModel`` as transformers 5 runs it (SDPA attention, separate q/k/v projections), called under
``torch.inference_mode``; ours is :class:`engines.dinov3.family.DINOv3Model` as the worker runs it (TorchBackend, fp32,
fused qkv, RoPE tables once per size, SDPA). Rounds alternate which model runs first, so a noisy neighbour on a shared
machine hurts both alike; the ratio is of the medians (min-of-rounds also printed).

Also printed: the parity of the two on the same batch (CLS and patch tokens, max abs difference, fp32) and the
memory one forward of a batch adds on top of the weights (peak RSS, sampled every millisecond, in a fresh child
process per model and batch).

    .venv/bin/python benchmarks/dinov3.py                       # batches 1 and 8, 3 rounds, RoPE on, memory
    .venv/bin/python benchmarks/dinov3.py --rope off --rounds 5 --no-memory
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.dinov3.network import DINOv3ViT  # noqa: E402
from tests.engines.dinov3_reference import (  # noqa: E402
    VITL16,
    hf_rope_disabled,
    make_hf_dinov3,
    ours_from_hf,
)


def inputs(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 14, 14, generator=generator)
    return (torch.nn.functional.interpolate(base, size=(224, 224), mode="bilinear") - 0.45) / 0.226


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def child(kind: str, batch: int, rope: bool) -> None:
    """In a fresh process: build one model with random weights, then the peak RSS one forward adds."""
    config = replace(VITL16, use_rope=rope)
    if kind == "hf":
        model = make_hf_dinov3(config)
        run = lambda x: model(pixel_values=x)  # noqa: E731
    else:
        with torch.device("meta"):
            network = DINOv3ViT(config)
        network = network.to_empty(device="cpu")
        network.init_buffers("cpu")
        network.init_weights(seed=0).eval()
        run = network.features
    x = inputs(batch)
    gc.collect()
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # RSS every millisecond while the forward runs
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with torch.inference_mode(), (hf_rope_disabled() if (kind == "hf" and not rope) else _null()):
            run(x)
    finally:
        done.set()
        sampler.join()
    print(json.dumps({"weights_rss_mb": round(before), "forward_extra_mb": round(max(peak[0], rss_mb()) - before)}))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def memory(kind: str, batch: int, rope: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--batch", str(batch), "--rope", "on" if rope else "off"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rope", choices=("on", "off"), default="on")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", choices=("hf", "ours"))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    rope = args.rope == "on"
    if args.child:
        child(args.child, args.batch, rope)
        return

    import transformers

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; RoPE {args.rope}")
    started = time.perf_counter()
    hf = make_hf_dinov3(VITL16)
    ours = ours_from_hf(hf, VITL16, use_rope=rope, name="vit-l")
    print(f"built ViT-L/16 pair in {time.perf_counter() - started:.0f} s "
          f"(reference attention: {hf.config._attn_implementation})")
    context = _null if rope else hf_rope_disabled
    for batch in args.batches:
        x = inputs(batch, seed=batch)
        with torch.inference_mode(), context():
            reference = hf(pixel_values=x)  # warm-up, and the parity reference
        with torch.inference_mode():
            cls, patches = ours.network.forward_features(x)
        ours.embed(x)  # warm-up of the backend path
        cls_diff = float((reference.pooler_output - cls).abs().max())
        patch_diff = float((reference.last_hidden_state[:, 1 + VITL16.num_register_tokens :] - patches).abs().max())
        times: dict[str, list[float]] = {"hf": [], "ours": []}
        for round_ in range(args.rounds):
            order = ("hf", "ours") if round_ % 2 == 0 else ("ours", "hf")
            for kind in order:
                t0 = time.perf_counter()
                if kind == "hf":
                    with torch.inference_mode(), context():
                        hf(pixel_values=x)
                else:
                    ours.embed(x)
                times[kind].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        print(f"batch {batch}: transformers {med['hf']:.2f} s ({batch / med['hf']:.2f} img/s), "
              f"ours {med['ours']:.2f} s ({batch / med['ours']:.2f} img/s); ratio {med['hf'] / med['ours']:.2f}x "
              f"median, {low['hf'] / low['ours']:.2f}x min-of-{args.rounds}; parity: CLS {cls_diff:.2g}, "
              f"patch tokens {patch_diff:.2g}")
        if not args.no_memory:
            mem = {kind: memory(kind, batch, rope) for kind in ("hf", "ours")}
            print(f"batch {batch}: weights {mem['ours']['weights_rss_mb']} MB RSS (ours) / "
                  f"{mem['hf']['weights_rss_mb']} MB (transformers); one forward adds "
                  f"{mem['ours']['forward_extra_mb']} MB (ours) vs {mem['hf']['forward_extra_mb']} MB (transformers)")


if __name__ == "__main__":
    main()
