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

``--precisions fp32 bf16`` also times our opt-in bf16 backend (``precision="bf16"``: a bf16 copy of the weights; on a
CPU with AMX / AVX-512 BF16 oneDNN runs its GEMMs natively) against the same fp32 reference. **bf16 is not at parity**:
its line gives the max abs difference and the lowest cosine similarity of its CLS / patch tokens to our fp32 ones.
The default is fp32, plus bf16 where the CPU has native bf16 (``cpu_supports_bf16``). ``--profile`` adds, per model
and batch, where one forward's time goes: the share of GEMM kernels (addmm / mm / bmm / linear / matmul) against the
rest (torch.profiler, self CPU time).

    .venv/bin/python benchmarks/dinov3.py                       # batches 1 and 8, 3 rounds, RoPE on, memory
    .venv/bin/python benchmarks/dinov3.py --rope off --rounds 5 --no-memory
    .venv/bin/python benchmarks/dinov3.py --precisions fp32 bf16 --profile --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

from engines.backends.torch_backend import TorchBackend, cpu_supports_bf16  # noqa: E402
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


GEMM_KERNELS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn", "aten::baddbmm")


def gemm_share(run, x: torch.Tensor) -> str:
    """One profiled forward: GEMM share of the self CPU time and the three biggest other kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in GEMM_KERNELS)
               and "convolution" not in e.key)
    rest = sorted((e for e in events if not any(k in e.key for k in GEMM_KERNELS)),
                  key=lambda e: -e.self_cpu_time_total)[:3]
    others = ", ".join(f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f} %" for e in rest)
    return f"GEMM {100 * gemm / total:.0f} % of {total / 1e6:.2f} s profiled (then {others})"


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min())


def child(kind: str, batch: int, rope: bool, precision: str = "fp32") -> None:
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
        run = TorchBackend(network, precision=precision).features  # fp32 shares the weights; bf16 holds a copy
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def memory(kind: str, batch: int, rope: bool, precision: str = "fp32") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--batch", str(batch), "--rope", "on" if rope else "off",
         "--precisions", precision],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rope", choices=("on", "off"), default="on")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                        default=["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"])
    parser.add_argument("--profile", action="store_true", help="GEMM share of one profiled forward per model")
    parser.add_argument("--child", choices=("hf", "ours"))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    rope = args.rope == "on"
    if args.child:
        child(args.child, args.batch, rope, args.precisions[0])
        return

    import transformers

    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, native bf16: {cpu_supports_bf16()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; RoPE {args.rope}; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    started = time.perf_counter()
    hf = make_hf_dinov3(VITL16)
    ours = ours_from_hf(hf, VITL16, use_rope=rope, name="vit-l")
    print(f"built ViT-L/16 pair in {time.perf_counter() - started:.0f} s "
          f"(reference attention: {hf.config._attn_implementation})")
    context = _null if rope else hf_rope_disabled
    backends = {"fp32": ours.backend}
    if "bf16" in args.precisions:
        backends["bf16"] = TorchBackend(ours.network, precision="bf16")
    kinds = ["hf"] + [f"ours-{p}" for p in args.precisions]

    def run(kind: str, x: torch.Tensor):
        if kind == "hf":
            with torch.inference_mode(), context():
                return hf(pixel_values=x)
        return backends[kind.removeprefix("ours-")].embed(x)

    for batch in args.batches:
        x = inputs(batch, seed=batch)
        with torch.inference_mode(), context():
            reference = hf(pixel_values=x)  # warm-up, and the parity reference
        with torch.inference_mode():
            cls, patches = ours.network.forward_features(x)
        ours.embed(x)  # warm-up of the backend path
        ref_patches = reference.last_hidden_state[:, 1 + VITL16.num_register_tokens :]
        cls_diff = float((reference.pooler_output - cls).abs().max())
        patch_diff = float((ref_patches - patches).abs().max())
        low_precision = {}
        for precision in (p for p in args.precisions if p != "fp32"):
            features = backends[precision].features(x)  # also its warm-up
            with torch.inference_mode():
                tokens = backends[precision].model.forward_tokens(x.to(torch.bfloat16)).float()
            low_patches = tokens[:, VITL16.num_prefix_tokens :]
            low_precision[precision] = (
                float((features["cls"] - cls).abs().max()), cosine_min(features["cls"], cls),
                float((low_patches - patches).abs().max()),
                cosine_min(low_patches.reshape(-1, patches.shape[-1]), patches.reshape(-1, patches.shape[-1])),
            )
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for round_ in range(args.rounds):
            order = kinds if round_ % 2 == 0 else kinds[::-1]
            for kind in order:
                t0 = time.perf_counter()
                run(kind, x)
                times[kind].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        print(f"batch {batch}: transformers fp32 {med['hf']:.2f} s ({batch / med['hf']:.2f} img/s)")
        for precision in args.precisions:
            kind = f"ours-{precision}"
            note = (f"parity with transformers: CLS {cls_diff:.2g}, patch tokens {patch_diff:.2g}" if precision == "fp32"
                    else "NOT at parity - vs our fp32: CLS max abs {:.2g} (cosine >= {:.6f}), patch tokens max abs "
                         "{:.2g} (cosine >= {:.6f})".format(*low_precision[precision]))
            print(f"batch {batch}: ours {precision} {med[kind]:.2f} s ({batch / med[kind]:.2f} img/s); ratio "
                  f"{med['hf'] / med[kind]:.2f}x median, {low['hf'] / low[kind]:.2f}x min-of-{args.rounds}; {note}")
        if args.profile:
            print(f"batch {batch}: profile transformers fp32: {gemm_share(lambda t: run('hf', t), x)}")
            for precision in args.precisions:
                network = backends[precision].model
                dtype = next(network.parameters()).dtype
                print(f"batch {batch}: profile ours {precision}: "
                      f"{gemm_share(lambda t: network.features(t.to(dtype)), x)}")
        if not args.no_memory:
            mem = {kind: memory(kind, batch, rope) for kind in ("hf", "ours")}
            print(f"batch {batch}: weights {mem['ours']['weights_rss_mb']} MB RSS (ours) / "
                  f"{mem['hf']['weights_rss_mb']} MB (transformers); one forward adds "
                  f"{mem['ours']['forward_extra_mb']} MB (ours) vs {mem['hf']['forward_extra_mb']} MB (transformers)")
            for precision in args.precisions:
                if precision != "fp32":
                    extra = memory("ours", batch, rope, precision)
                    print(f"batch {batch}: ours {precision}: weights {extra['weights_rss_mb']} MB RSS (fp32 + the "
                          f"{precision} copy), one forward adds {extra['forward_extra_mb']} MB")

if __name__ == "__main__":
    main()
