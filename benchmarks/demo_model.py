"""Train and evaluate the embedded demo model (``models/demo-mae``) on synthetic phantoms. Seeded; CPU.

    .venv/bin/python benchmarks/demo_model.py                 # pool, MAE pre-training, heads, evaluation
    .venv/bin/python benchmarks/demo_model.py --eval-only     # re-evaluate the committed model
    .venv/bin/python benchmarks/demo_model.py --quick --out /tmp/demo   # a tiny smoke run (tests use it)

Phases (each prints what it measured; everything lands in ``<out>/training_report.json``):

1. a pool of normal phantoms (hand, knee, long bone; joint-space grades 0-4 allowed, no focal findings),
   converted exactly as ``engines.imaging.preprocess`` converts a DICOM of them (min-max to uint8, bilinear 224 px);
2. MAE pre-training of the demo config (128 wide, 6 layers, 4 heads; decoder 96 x 2) for a fixed step count;
3. linear-probe heads (``fracture``, ``lesion``, ``narrowing``) on frozen CLS embeddings of labelled phantoms,
   with a held-out split, saved in format 3e under ``<out>/heads``;
4. evaluation on held-out seeds: pointing game / pixel AUROC / score AUROC for lytic, sclerotic and fracture
   findings, and the calibration of normal scores (``<out>/calibration.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.training.evaluation import evaluate_localisation, phantom_input  # noqa: E402
from engines.training.phantoms import KINDS, generate  # noqa: E402
from engines.calibration import Calibration  # noqa: E402
from engines.training.inputs import to_uint8_224  # noqa: E402
from engines.training.pretrain import DEMO_CONFIG, PretrainSettings, pretrain_mae  # noqa: E402
from engines.training.probes import fit_linear_probe, probe_to_head  # noqa: E402
from engines.mae.network import MAEConfig, MaskedAutoencoderViT  # noqa: E402

log = logging.getLogger("demo_model")

# Seed ranges keep the three data sets apart: pre-training, head training, evaluation.
POOL_SEEDS = 0
HEAD_SEEDS = 1_000_000
EVAL_SEEDS = 2_000_000

TINY_CONFIG = MAEConfig(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=64,
    layer_norm_eps=1e-6,
)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))


def kind_cycle(weights: tuple[int, ...] = (1, 1, 1)) -> list[str]:
    """One cycle of pool kinds with ``weights`` (hand, knee, long_bone), spread evenly: (1, 1, 1) gives hand,
    knee, long_bone; (2, 1, 1) gives hand, knee, long_bone, hand."""
    if len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) == 0:
        raise ValueError(f"kind weights: {len(KINDS)} non-negative integers ({', '.join(KINDS)})")
    total, taken, cycle = sum(weights), [0] * len(KINDS), []
    for i in range(total):
        k = max(range(len(KINDS)), key=lambda j: (weights[j] * (i + 1) / total - taken[j], -j))
        taken[k] += 1
        cycle.append(KINDS[k])
    return cycle


def _cache_matches(cached: "np.lib.npyio.NpzFile", count: int, weights: tuple[int, ...]) -> bool:
    """A --pool-cache file serves only a pool of the same size and kind weights (older caches: 1,1,1)."""
    stored = tuple(int(w) for w in cached["kind_weights"]) if "kind_weights" in cached else (1, 1, 1)
    return cached["images"].shape[0] == count and stored == weights


def build_pool(count: int, seed_base: int = POOL_SEEDS, weights: tuple[int, ...] = (1, 1, 1)) -> torch.Tensor:
    """Normal phantoms (no focal finding), cycling through the kinds by ``weights``; uint8 [N, 224, 224]."""
    rng = np.random.default_rng(seed_base)
    images = np.empty((count, 224, 224), np.uint8)
    cycle = kind_cycle(weights)
    with _progress() as bar:
        task = bar.add_task("phantom pool", total=count, info="")
        for i in range(count):
            kind = cycle[i % len(cycle)]
            grade = int(rng.integers(0, 5)) if kind != "long_bone" else 0
            images[i] = to_uint8_224(generate(kind, seed_base + i, narrowing_grade=grade).pixels)
            bar.advance(task)
    return torch.from_numpy(images)


def labelled_set(count: int, seed_base: int = HEAD_SEEDS) -> tuple[torch.Tensor, dict[str, np.ndarray], list[str]]:
    """Phantoms with findings for the heads: inputs [N, 3, 224, 224], label arrays, kinds."""
    rng = np.random.default_rng(seed_base)
    inputs, kinds = [], []
    labels: dict[str, list[int]] = {"fracture": [], "lesion": [], "narrowing": []}
    with _progress() as bar:
        task = bar.add_task("labelled phantoms", total=count, info="")
        for i in range(count):
            kind = KINDS[i % len(KINDS)]
            focal = [None, "fracture", "lytic", "sclerotic"][int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))]
            grade = int(rng.integers(0, 5)) if kind != "long_bone" else 0
            phantom = generate(kind, seed_base + i, findings=[focal] if focal else [], narrowing_grade=grade)
            found = phantom.labels
            inputs.append(phantom_input(phantom))
            kinds.append(kind)
            labels["fracture"].append(found["fracture"])
            labels["lesion"].append(1 if found["lytic"] else 2 if found["sclerotic"] else 0)
            labels["narrowing"].append(found["narrowing"])
            bar.advance(task)
    return torch.stack(inputs), {k: np.asarray(v) for k, v in labels.items()}, kinds


HEADS = {
    # name: (labels, which images train it)
    "fracture": (["fracture"], "all"),
    "lesion": (["none", "lytic", "sclerotic"], "all"),
    "narrowing": (["grade0", "grade1", "grade2", "grade3", "grade4"], "knee"),
}


def train_heads(encoder, count: int, out: Path, seed: int) -> dict[str, dict[str, float]]:
    from engines.heads import save_head

    x, labels, kinds = labelled_set(count)
    with torch.no_grad():
        embeddings = torch.cat([encoder.embed(x[i : i + 64]) for i in range(0, len(x), 64)])
    results: dict[str, dict[str, float]] = {}
    for name, (names, subset) in HEADS.items():
        keep = np.arange(len(kinds)) if subset == "all" else np.flatnonzero(np.asarray(kinds) == subset)
        fit = fit_linear_probe(embeddings[keep], labels[name][keep], names, seed=seed)
        head = probe_to_head(
            fit,
            name,
            encoder.encoder_hash,
            provenance={
                "data": f"synthetic phantoms (engines.training.phantoms), seeds {HEAD_SEEDS}..{HEAD_SEEDS + count - 1}, {subset}",
                "script": "benchmarks/demo_model.py",
                "note": "synthetic demo head, not for clinical use",
            },
        )
        save_head(head, out / "heads")
        results[name] = {**fit.metrics, "train": fit.train_size, "test": fit.test_size}
        print(f"head {name}: held-out {fit.metrics} (train {fit.train_size}, test {fit.test_size})")
    return results


def evaluate(encoder, eval_seeds: int, out: Path, passes: int = 10, seed: int = 0) -> dict[str, object]:
    """Localisation on held-out phantoms; calibration from their normal twins."""
    seeds = list(range(EVAL_SEEDS, EVAL_SEEDS + eval_seeds))
    reports: dict[str, object] = {}
    normal_scores: list[float] = []

    def error_map(x: torch.Tensor):
        return encoder.error_map(x, seed=seed, passes=passes)

    start = time.perf_counter()
    for finding in ("lytic", "sclerotic", "fracture"):
        with _progress() as bar:
            task = bar.add_task(f"evaluate {finding}", total=len(seeds) * len(KINDS), info="")
            report, normals = evaluate_localisation(error_map, finding, seeds, progress=lambda n: bar.advance(task, n))
        reports[finding] = report.as_dict()
        if finding == "lytic":
            normal_scores = normals
        print(f"{finding}: pointing game {report.pointing} pixel AUROC {report.pixel_auroc:.3f} score AUROC {report.score_auroc:.3f} (n={report.count})")
        print(f"   per kind: {report.per_kind}")
    calibration = Calibration.from_scores(
        normal_scores, encoder_sha256=encoder.encoder_hash, passes=passes, seed=seed, source=f"normal phantoms, seeds {seeds[0]}..{seeds[-1]}",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    calibration.save(out)
    reports["calibration"] = calibration.summary()
    reports["eval_seconds"] = time.perf_counter() - start
    return reports


def markdown(report: dict) -> str:
    """The report's figures as the Markdown tables used in docs/benchmarks.md and models/README.md."""
    pre = report["pretrain"]
    lines = [
        f"Pre-training: {pre['steps']} steps x {pre['batch_size']} images ({pre['steps'] * pre['batch_size']} samples from a pool of "
        f"{report['pool']} normal phantoms), {pre['seconds'] / 60:.1f} min on {report['threads']} thread{'s' if report['threads'] != 1 else ''}; "
        f"loss {pre['first_loss']:.3f} (first 5 %) -> {pre['final_loss']:.3f} (last 5 %).",
        "",
        "| finding | n | pointing game (dilation 0 / **8** / 16 px) | pixel AUROC | score AUROC vs normal twin |",
        "| --- | --- | --- | --- | --- |",
    ]
    for finding in ("lytic", "sclerotic", "fracture"):
        r = report["evaluation"][finding]
        pg = r["pointing_game"]
        lines.append(
            f"| {finding} | {r['count']} | {pg['0']:.2f} / **{pg['8']:.2f}** / {pg['16']:.2f} | {r['pixel_auroc']:.3f} | {r['score_auroc']:.3f} |"
        )
    lines += ["", "| finding | " + " | ".join(f"pointing game @8, {k}" for k in KINDS) + " |", "| --- |" + " --- |" * len(KINDS)]
    for finding in ("lytic", "sclerotic", "fracture"):
        per = report["evaluation"][finding]["per_kind"]
        lines.append(f"| {finding} | " + " | ".join(f"{per[k]['pointing_game@8']:.2f} (n={per[k]['count']})" if k in per else "-" for k in KINDS) + " |")
    lines += ["", "| head | held-out n | AUROC | accuracy | other |", "| --- | --- | --- | --- | --- |"]
    for name, m in report["heads"].items():
        au = m.get("auroc", m.get("auroc_macro_ovr"))
        other = f"mean abs. grade error {m['mean_abs_error']:.2f}" if name == "narrowing" else ("macro one-vs-rest AUROC" if "auroc_macro_ovr" in m else "")
        lines.append(f"| {name} | {m['test']} | {au:.3f} | {m['accuracy']:.3f} | {other} |")
    cal = report["evaluation"]["calibration"]
    lines += ["", f"Calibration (normal twins, n={cal['n']}): median score {cal['p50']:.5f}, p95 {cal['p95']:.5f}, p99 {cal['p99']:.5f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "demo-mae")
    parser.add_argument("--pool", type=int, default=2400, help="normal phantoms for pre-training")
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument(
        "--kind-weights", default="1,1,1",
        help="pool share of hand, knee, long_bone phantoms as integers (1,1,1: in turn; 2,1,1: half hands)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--head-images", type=int, default=900)
    parser.add_argument("--eval-seeds", type=int, default=30, help="held-out seeds per kind and finding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=2,
        help="torch threads; on a CPU shared with other work 1 is faster (2 threads spin-wait on each other)",
    )
    parser.add_argument(
        "--device", default="cpu",
        help="where to pre-train: cpu (the default) or cuda on a lent GPU; heads and evaluation run on the CPU",
    )
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the tables of an existing report and stop")
    parser.add_argument("--pool-cache", type=Path, default=None, help="reuse / store the pre-training pool (.npz)")
    parser.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run in seconds")
    args = parser.parse_args(argv)
    try:  # a name torch does not know, or a device this build or machine lacks (cuda without CUDA, ...)
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        parser.error(f"--device {args.device!r}: not usable here ({str(exc).splitlines()[0]})")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "training_report.json"
    report: dict[str, object] = json.loads(report_path.read_text()) if (args.eval_only and report_path.is_file()) else {}

    if args.markdown:
        print(markdown(json.loads(report_path.read_text())))
        return 0
    if args.quick:
        args.pool, args.steps, args.batch_size, args.head_images, args.eval_seeds = 24, 3, 8, 48, 2

    import engines
    from engines.mae.loaders import save_hf_vitmae

    if not args.eval_only:
        config = TINY_CONFIG if args.quick else DEMO_CONFIG
        t0 = time.perf_counter()
        cache = args.pool_cache
        try:
            weights = tuple(int(w) for w in args.kind_weights.split(","))
            kind_cycle(weights)
        except ValueError as exc:
            parser.error(f"--kind-weights {args.kind_weights!r}: {exc}")
        cached = np.load(cache) if cache is not None and cache.is_file() else None
        if cached is not None and _cache_matches(cached, args.pool, weights):
            pool = torch.from_numpy(cached["images"])
        else:
            pool = build_pool(args.pool, weights=weights)
            if cache is not None:
                np.savez(cache, images=pool.numpy(), kind_weights=np.array(weights))
        pool_seconds = time.perf_counter() - t0
        print(f"pool: {args.pool} phantoms in {pool_seconds:.0f} s", flush=True)
        torch.manual_seed(args.seed)
        model = MaskedAutoencoderViT(config)
        settings = PretrainSettings(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, args.steps // 16), seed=args.seed,
            threads=args.threads, device=args.device,
        )
        with _progress() as bar:
            task = bar.add_task("MAE pre-training", total=settings.steps, info="")

            def tick(step: int, loss: float) -> None:
                bar.update(task, advance=1, info=f"loss {loss:.4f}")
                if not bar.console.is_terminal and step % 25 == 0:
                    print(f"step {step} loss {loss:.4f} {time.perf_counter() - t_train:.0f} s", flush=True)

            t_train = time.perf_counter()

            result = pretrain_mae(model, pool, settings, progress=tick)
        print(f"pre-training: {result.steps} steps x {settings.batch_size} in {result.seconds:.0f} s, final loss {result.final_loss:.4f}")
        save_hf_vitmae(model, out)
        meta = json.loads((out / "config.json").read_text())
        meta.update({"msknode_name": "demo-mae", "msknode_version": "phantom-1"})
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        report.update(
            {
                "config": config.to_hf_dict(),
                "pool": args.pool,
                "kind_weights": list(weights),
                "pool_seconds": pool_seconds,
                "pretrain": {
                    "steps": result.steps,
                    "batch_size": settings.batch_size,
                    "lr": settings.lr,
                    "seconds": result.seconds,
                    "final_loss": result.final_loss,
                    "first_loss": float(np.mean(result.losses[: max(1, len(result.losses) // 20)])),
                    "loss_curve": [float(np.mean(result.losses[i : i + 50])) for i in range(0, len(result.losses), 50)],
                },
                "threads": args.threads,
                "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device),
                "torch": torch.__version__,
            }
        )
        encoder = engines.load(out, load_heads=False)
        t0 = time.perf_counter()
        report["heads"] = train_heads(encoder, args.head_images, out, args.seed)
        report["heads_seconds"] = time.perf_counter() - t0
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    encoder = engines.load(out)
    report["encoder_sha256"] = encoder.encoder_hash
    report["evaluation"] = evaluate(encoder, args.eval_seeds, out)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    print(f"model.safetensors: {size / 1e6:.1f} MB; report: {report_path}")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
