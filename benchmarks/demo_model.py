"""Train and evaluate the embedded demo model (``models/demo-mae``) on synthetic phantoms. Seeded; CPU.

    .venv/bin/python benchmarks/demo_model.py                 # pool, MAE pre-training, heads, evaluation
    .venv/bin/python benchmarks/demo_model.py --eval-only     # re-evaluate the committed model
    .venv/bin/python benchmarks/demo_model.py --quick --out /tmp/demo   # a tiny smoke run (tests use it)

Phases (each prints what it measured; everything lands in ``<out>/training_report.json``):

1. a pool of normal phantoms (hand, knee, long bone; joint-space grades 0-4 allowed, no focal findings),
   converted exactly as ``engines.imaging.preprocess`` converts a DICOM of them (min-max to uint8, bilinear 224 px);
2. MAE pre-training of the demo config (192 wide, 6 layers, 6 heads; decoder 192 x 2; 75 % masking) for a fixed
   step count;
3. joint fine-tuning (:mod:`engines.training.joint`): the MAE loss on normal phantoms, now masking ``--mask-ratio``
   (0.5) of the patches as the saved model's error map will, plus the heads (``fracture``, ``lesion``,
   ``narrowing``: linear on the normed CLS token) on labelled phantoms; then temperature / Platt calibration of
   each head on other phantoms and its figures (AUROC, accuracy, grade error, ECE, reliability) on held-out ones,
   saved in format 3e under ``<out>/heads``;
4. evaluation on held-out seeds: pointing game / pixel AUROC / score AUROC for lytic, sclerotic and fracture
   findings, and the calibration of normal scores (``<out>/calibration.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from engines.training.evaluation import evaluate_localisation, head_metrics  # noqa: E402
from engines.training.phantoms import KINDS, generate  # noqa: E402
from engines.calibration import Calibration  # noqa: E402
from engines.training.inputs import normalise_uint8, to_uint8_224  # noqa: E402
from engines.training.joint import HeadTask, JointSettings, train_jointly  # noqa: E402
from engines.training.pretrain import DEMO_CONFIG, PretrainSettings, pretrain_mae  # noqa: E402
from engines.mae.network import MAEConfig, MaskedAutoencoderViT  # noqa: E402

log = logging.getLogger("demo_model")

# Seed ranges keep the three data sets apart: pre-training, head training, evaluation.
POOL_SEEDS = 0
HEAD_SEEDS = 1_000_000  # joint training of the heads
CALIBRATION_SEEDS = 1_500_000  # calibration of the heads' probabilities
EVAL_SEEDS = 2_000_000  # localisation
HEAD_TEST_SEEDS = 3_000_000  # the heads' held-out figures

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
    """Phantoms with findings for the heads: uint8 grey [N, 224, 224] (as the model sees them), labels, kinds.

    Each image has no focal finding (40 %) or one fracture, lytic or sclerotic lesion (20 % each); hands and knees
    a joint-space grade 0-4. ``narrowing`` is -1 off the knee (the head is only meaningful there)."""
    rng = np.random.default_rng(seed_base)
    images = np.empty((count, 224, 224), np.uint8)
    kinds: list[str] = []
    labels: dict[str, list[int]] = {"fracture": [], "lesion": [], "narrowing": []}
    with _progress() as bar:
        task = bar.add_task(f"labelled phantoms from seed {seed_base}", total=count, info="")
        for i in range(count):
            kind = KINDS[i % len(KINDS)]
            focal = [None, "fracture", "lytic", "sclerotic"][int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))]
            grade = int(rng.integers(0, 5)) if kind != "long_bone" else 0
            phantom = generate(kind, seed_base + i, findings=[focal] if focal else [], narrowing_grade=grade)
            found = phantom.labels
            images[i] = to_uint8_224(phantom.pixels)
            kinds.append(kind)
            labels["fracture"].append(found["fracture"])
            labels["lesion"].append(1 if found["lytic"] else 2 if found["sclerotic"] else 0)
            labels["narrowing"].append(found["narrowing"] if kind == "knee" else -1)
            bar.advance(task)
    return torch.from_numpy(images), {k: np.asarray(v) for k, v in labels.items()}, kinds


def cached_labelled_set(count: int, seed_base: int, cache: Path | None):
    """:func:`labelled_set`, kept in ``cache`` (an .npz named by seed and count) when a folder is given."""
    path = cache / f"labelled-{seed_base}-{count}.npz" if cache is not None else None
    if path is not None and path.is_file():
        data = np.load(path)
        return (torch.from_numpy(data["images"]), {k: data[k] for k in HEADS}, [str(k) for k in data["kinds"]])
    images, labels, kinds = labelled_set(count, seed_base)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=images.numpy(), kinds=np.array(kinds), **labels)
    return images, labels, kinds


HEADS = {
    # name: labels (one label = a sigmoid output)
    "fracture": ["fracture"],
    "lesion": ["none", "lytic", "sclerotic"],
    "narrowing": ["grade0", "grade1", "grade2", "grade3", "grade4"],
}
HEAD_SUBSETS = {"fracture": "all kinds", "lesion": "all kinds", "narrowing": "knees"}
# Heads saved with the model. ``narrowing`` is trained (its loss shapes the encoder) and reported, but not shipped:
# its grade error (1.37) is worse than always answering grade 2 (1.27); the demo grades knees with demo-dinov3.
SHIPPED_HEADS = ("fracture", "lesion")


def _embed(encoder, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder.embed(normalise_uint8(images[i : i + 64])) for i in range(0, len(images), 64)])


def _targets(name: str, labels: dict[str, np.ndarray]) -> np.ndarray:
    return labels[name]


def reliability(probabilities: np.ndarray, targets: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Top-label reliability diagram: per equal-width confidence bin, count, mean confidence and accuracy."""
    p = probabilities if probabilities.ndim == 2 else np.stack([1 - probabilities, probabilities], 1)
    confidence, predicted = p.max(1), p.argmax(1)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "count": int(members.sum()),
                         "confidence": float(confidence[members].mean()),
                         "accuracy": float((predicted[members] == targets[members]).mean())})
    return rows


def calibrate_and_test(heads, encoder, calibration_set, test_set) -> dict[str, dict]:
    """Fit temperature / Platt scaling on the calibration phantoms; every figure on the held-out test phantoms."""
    from engines.calibration import class_probabilities, expected_calibration_error, fit_logit_calibration

    cal_x, cal_labels, _ = calibration_set
    test_x, test_labels, _ = test_set
    cal_emb, test_emb = _embed(encoder, cal_x), _embed(encoder, test_x)
    results: dict[str, dict] = {}
    for name, head in heads.items():
        fit_rows = np.flatnonzero(_targets(name, cal_labels) >= 0)
        rows = np.flatnonzero(_targets(name, test_labels) >= 0)
        y_fit, y = _targets(name, cal_labels)[fit_rows], _targets(name, test_labels)[rows]
        with torch.no_grad():
            fit_logits, logits = head(cal_emb[fit_rows]).double(), head(test_emb[rows]).double()
        fitted = fit_logit_calibration(fit_logits, y_fit, head.activation)
        before = class_probabilities(logits, head.activation).numpy()
        after = class_probabilities(logits, head.activation, fitted).numpy()
        record = {"method": fitted.method, "scale": fitted.scale, "offset": fitted.offset,
                  "fitted_on": int(len(fit_rows)), "data": f"calibration phantoms, seeds {CALIBRATION_SEEDS}..",
                  "ece_bins": 15}
        if fitted.method == "temperature":
            record["temperature"] = fitted.temperature
        head.set_calibration(record)
        shown = after[:, 1] if head.activation == "sigmoid" else after
        metrics = {**head_metrics(shown, y), "test": int(len(rows)), "calibration": int(len(fit_rows)),
                   "ece_before": expected_calibration_error(torch.from_numpy(before), torch.from_numpy(y)),
                   "ece_after": expected_calibration_error(torch.from_numpy(after), torch.from_numpy(y)),
                   "reliability": reliability(after, y)}
        if name == "fracture":
            normal = y == 0
            metrics["normal_above_0.5"] = float(np.mean(shown[normal] > 0.5))
            for kind in KINDS:
                kind_rows = np.asarray(test_set[2])[rows] == kind
                if len(np.unique(y[kind_rows])) == 2:
                    metrics[f"auroc_{kind}"] = head_metrics(shown[kind_rows], y[kind_rows])["auroc"]
        results[name] = metrics
        print(f"head {name}: {({k: v for k, v in metrics.items() if k != 'reliability'})}", flush=True)
    return results


def train_heads(model, pool: torch.Tensor, args, out: Path) -> tuple[dict, dict]:
    """Joint fine-tuning of the encoder with the heads (:mod:`engines.training.joint`); returns its record and
    the trained linear layers (on the normed CLS token)."""
    labelled_x, labels, _ = cached_labelled_set(args.head_images, HEAD_SEEDS, args.labelled_cache)
    # From here on the MAE loss, and the error map of the saved model (config.json), mask --mask-ratio of the patches.
    model.config = dataclasses.replace(model.config, mask_ratio=args.mask_ratio)
    tasks = [HeadTask(name, names, _targets(name, labels)) for name, names in HEADS.items()]
    settings = JointSettings(
        steps=args.joint_steps, seed=args.seed, threads=args.threads, device=args.device,
        warmup_steps=max(1, args.joint_steps // 15),
    )
    with _progress() as bar:
        task = bar.add_task("joint fine-tuning", total=settings.steps, info="")
        t0 = time.perf_counter()

        def tick(step: int, loss: float) -> None:
            bar.update(task, advance=1, info=f"loss {loss:.4f}")
            if not bar.console.is_terminal and step % 25 == 0:
                print(f"joint step {step} loss {loss:.4f} {time.perf_counter() - t0:.0f} s", flush=True)

        result = train_jointly(model, pool, labelled_x, tasks, settings, progress=tick)
    record = {
        "steps": settings.steps, "batch_size": settings.batch_size, "mae_batch_size": settings.mae_batch_size,
        "lr": settings.lr, "head_lr": settings.head_lr, "mae_weight": settings.mae_weight,
        "mask_ratio": args.mask_ratio,
        "labelled": args.head_images, "seconds": result.seconds,
        "final_loss": float(np.mean(result.losses[-max(1, len(result.losses) // 20):])),
        "final_mae_loss": float(np.mean(result.mae_losses[-max(1, len(result.mae_losses) // 20):])),
        "loss_curve": [float(np.mean(result.losses[i : i + 50])) for i in range(0, len(result.losses), 50)],
    }
    print(f"joint fine-tuning: {settings.steps} steps in {result.seconds:.0f} s, loss {record['final_loss']:.4f}, "
          f"MAE loss {record['final_mae_loss']:.4f}", flush=True)
    return record, result.heads


def save_heads(layers: dict, encoder, args, out: Path) -> dict[str, dict]:
    """Format 3e heads from the jointly trained layers, calibrated, tested on held-out phantoms, saved."""
    from engines.heads import LinearHead, save_head

    heads = {}
    for name, layer in layers.items():
        head = LinearHead(
            name, layer.in_features, HEADS[name], "sigmoid" if len(HEADS[name]) == 1 else "softmax",
            encoder_sha256=encoder.encoder_hash,
            provenance={
                "trainer": "engines.training.joint.train_jointly (encoder fine-tuned with the heads)",
                "data": f"synthetic phantoms (engines.training.phantoms), seeds {HEAD_SEEDS}.."
                        f"{HEAD_SEEDS + args.head_images - 1}, {HEAD_SUBSETS[name]}",
                "script": "benchmarks/demo_model.py",
                "note": "synthetic demo head, not for clinical use",
            },
        )
        with torch.no_grad():
            head.linear.weight.copy_(layer.weight)
            head.linear.bias.copy_(layer.bias)
        heads[name] = head.eval()
    calibration_set = cached_labelled_set(args.calibration_images, CALIBRATION_SEEDS, args.labelled_cache)
    test_set = cached_labelled_set(args.test_images, HEAD_TEST_SEEDS, args.labelled_cache)
    metrics = calibrate_and_test(heads, encoder, calibration_set, test_set)
    for name, head in heads.items():
        metrics[name]["shipped"] = name in SHIPPED_HEADS
        if name in SHIPPED_HEADS:
            head.provenance["held_out_metrics"] = {k: v for k, v in metrics[name].items() if k != "reliability"}
            save_head(head, out / "heads")
        else:  # a head an earlier run of this script saved into the same folder
            for stale in (out / "heads").glob(f"{name}.*"):
                stale.unlink()
    return metrics


def evaluate(encoder, eval_seeds: int, out: Path, passes: int = 10, seed: int = 0) -> dict[str, object]:
    """Localisation on held-out phantoms; calibration from their normal twins (``passes`` masked passes each)."""
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
    reports["passes"] = passes
    reports["eval_seconds"] = time.perf_counter() - start
    return reports


def markdown(report: dict) -> str:
    """The report's figures as the Markdown tables used in docs/benchmarks.md and models/README.md."""
    pre = report["pretrain"]
    lines = []
    if "steps" in pre:
        threads = report["threads"]
        lines.append(
            f"Pre-training: {pre['steps']} steps x {pre['batch_size']} images ({pre['steps'] * pre['batch_size']} samples "
            f"from a pool of {report['pool']} normal phantoms), {pre['seconds'] / 60:.1f} min on {threads} "
            f"thread{'s' if threads != 1 else ''}; loss {pre['first_loss']:.3f} (first 5 %) -> {pre['final_loss']:.3f} "
            "(last 5 %)."
        )
    joint = report.get("joint")
    if joint:
        lines.append(
            f"Joint fine-tuning (MAE on normals + heads on {joint['labelled']} labelled phantoms): {joint['steps']} steps "
            f"x ({joint['batch_size']} labelled + {joint['mae_batch_size']} normal), {joint['seconds'] / 60:.1f} min; "
            f"final loss {joint['final_loss']:.3f}, of which MAE {joint['final_mae_loss']:.3f}."
        )
    lines += [
        "",
        f"Error maps: {report['evaluation'].get('passes', 10)} masked passes, mask ratio "
        + f"{report['config']['mask_ratio']}, seed 0.",
        "",
        "| finding | n | pointing game (dilation 0 / **8** / 16 px) | pixel AUROC | score AUROC vs normal twin |",
        "| --- | --- | --- | --- | --- |",
    ]
    for finding in ("lytic", "sclerotic", "fracture"):
        r = report["evaluation"][finding]
        pg = r["pointing_game"]
        lines.append(
            f"| {finding} | {r['count']} | {pg['0']:.2f} / **{pg['8']:.2f}** / {pg['16']:.2f} | {r['pixel_auroc']:.3f} "
            f"| {r['score_auroc']:.3f} |"
        )
    lines += ["", "| finding | " + " | ".join(f"pointing game @8, {k}" for k in KINDS) + " |",
              "| --- |" + " --- |" * len(KINDS)]
    for finding in ("lytic", "sclerotic", "fracture"):
        per = report["evaluation"][finding]["per_kind"]
        cells = [f"{per[k]['pointing_game@8']:.2f} (n={per[k]['count']})" if k in per else "-" for k in KINDS]
        lines.append(f"| {finding} | " + " | ".join(cells) + " |")
    lines += ["", "| head | held-out n | AUROC | accuracy | mean abs. grade error | ECE before -> after calibration | other |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in report["heads"].items():
        au = m.get("auroc", m.get("auroc_macro_ovr"))
        kind = "macro one-vs-rest" if "auroc_macro_ovr" in m else ""
        grade = f"{m['mean_abs_error']:.2f}" if name == "narrowing" else "-"
        ece = f"{m['ece_before']:.3f} -> {m['ece_after']:.3f}" if "ece_after" in m else "-"
        other = [kind] if kind else []
        if not m.get("shipped", True):
            other.append("**not shipped** (trained as an auxiliary task only)")
        if "normal_above_0.5" in m:
            other.append(f"no-fracture images above 0.5: {m['normal_above_0.5']:.1%}")
            other += [f"{k} {m['auroc_' + k]:.3f}" for k in KINDS if f"auroc_{k}" in m]
        lines.append(f"| {name} | {m['test']} | {au:.3f} | {m['accuracy']:.3f} | {grade} | {ece} | {'; '.join(other)} |")
    cal = report["evaluation"]["calibration"]
    lines += ["", f"Calibration (normal twins, n={cal['n']}): median score {cal['p50']:.5f}, p95 {cal['p95']:.5f}, "
              f"p99 {cal['p99']:.5f}."]
    return "\n".join(lines)


def pretrain(args, config: MAEConfig, pool: torch.Tensor, out: Path) -> tuple[MaskedAutoencoderViT, dict]:
    """MAE pre-training on the normal pool (or the model given by ``--pretrained``) and its record."""
    if args.pretrained is not None:
        from engines.mae.loaders import load_checkpoint

        if args.pretrained.is_dir():
            model = MaskedAutoencoderViT(config)
            model.load_state_dict(load_checkpoint(args.pretrained).state)
            previous = args.pretrained / "training_report.json"
            record = json.loads(previous.read_text())["pretrain"] if previous.is_file() else {}
        else:
            model = MaskedAutoencoderViT(config)
            model.load_state_dict(torch.load(args.pretrained, map_location="cpu"))
            record = {}
        print(f"pre-training skipped: starting from {args.pretrained}", flush=True)
        return model, {**record, "from": str(args.pretrained)}
    torch.manual_seed(args.seed)
    model = MaskedAutoencoderViT(config)
    settings = PretrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, args.steps // 16), seed=args.seed,
        threads=args.threads, device=args.device,
    )
    with _progress() as bar:
        task = bar.add_task("MAE pre-training", total=settings.steps, info="")
        t_train = time.perf_counter()

        def tick(step: int, loss: float) -> None:
            bar.update(task, advance=1, info=f"loss {loss:.4f}")
            if args.checkpoint_every and step and step % args.checkpoint_every == 0:
                (out / "checkpoints").mkdir(exist_ok=True)
                torch.save(model.state_dict(), out / "checkpoints" / f"step{step:06d}.pt")
            if not bar.console.is_terminal and step % 25 == 0:
                print(f"step {step} loss {loss:.4f} {time.perf_counter() - t_train:.0f} s", flush=True)

        result = pretrain_mae(model, pool, settings, progress=tick)
    print(f"pre-training: {result.steps} steps x {settings.batch_size} in {result.seconds:.0f} s, final loss {result.final_loss:.4f}")
    if args.checkpoint_every:
        torch.save(model.state_dict(), out / "checkpoints" / "pretrained.pt")
    return model, {
        "steps": result.steps,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "first_loss": float(np.mean(result.losses[: max(1, len(result.losses) // 20)])),
        "loss_curve": [float(np.mean(result.losses[i : i + 50])) for i in range(0, len(result.losses), 50)],
    }


def save_model(model: MaskedAutoencoderViT, out: Path) -> None:
    """The Hugging Face ViT-MAE folder, its ``config.json`` stamped with the demo model's name and version."""
    from engines.mae.loaders import save_hf_vitmae

    save_hf_vitmae(model, out)
    meta = {**json.loads((out / "config.json").read_text()), "msknode_name": "demo-mae", "msknode_version": "phantom-2"}
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "demo-mae")
    parser.add_argument("--pool", type=int, default=6000, help="normal phantoms for pre-training")
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument(
        "--kind-weights", default="1,1,1",
        help="pool share of hand, knee, long_bone phantoms as integers (1,1,1: in turn; 2,1,1: half hands)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--head-images", type=int, default=4800, help="labelled phantoms for the joint fine-tuning")
    parser.add_argument("--calibration-images", type=int, default=900, help="labelled phantoms to calibrate the heads")
    parser.add_argument("--test-images", type=int, default=900, help="held-out labelled phantoms for the heads' figures")
    parser.add_argument(
        "--mask-ratio", type=float, default=0.5,
        help="mask ratio of the joint phase and of the saved model's error map (pre-training masks 0.75, as MAE)",
    )
    parser.add_argument("--joint-steps", type=int, default=1200, help="steps of joint fine-tuning (MAE + heads)")
    parser.add_argument(
        "--pretrained", type=Path, default=None,
        help="skip pre-training: start the joint phase from this MAE (a folder, or a --checkpoint-every .pt file)",
    )
    parser.add_argument("--labelled-cache", type=Path, default=None, help="folder to keep / reuse the labelled sets")
    parser.add_argument("--eval-seeds", type=int, default=30, help="held-out seeds per kind and finding")
    parser.add_argument(
        "--passes", type=int, default=10,
        help="error-map passes of the evaluation and calibration ([engine] passes; 10 as SKELEX and the node's default)",
    )
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
    parser.add_argument(
        "--checkpoint-every", type=int, default=0,
        help="also save the encoder-decoder every N steps to <out>/checkpoints (to watch a long run; not the model)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio {args.mask_ratio}: must be in [0, 1)")
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
        args.calibration_images, args.test_images, args.joint_steps = 48, 48, 3

    import engines

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
        model, pretrain_record = pretrain(args, config, pool, out)
        save_model(model, out)  # the pre-trained MAE: --pretrained OUT resumes here if the joint phase is cut off
        report.update(
            {
                "pool": args.pool,
                "kind_weights": list(weights),
                "pool_seconds": pool_seconds,
                "pretrain": pretrain_record,
                "threads": args.threads,
                "device": f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device),
                "torch": torch.__version__,
            }
        )
        t0 = time.perf_counter()
        report["joint"], layers = train_heads(model, pool, args, out)
        report["config"] = model.config.to_hf_dict()  # with the joint phase's mask ratio, as config.json
        save_model(model, out)
        encoder = engines.load(out, load_heads=False)
        report["heads"] = save_heads(layers, encoder, args, out)
        report["heads_seconds"] = time.perf_counter() - t0
        report_path.write_text(json.dumps(report, indent=2) + "\n")

    encoder = engines.load(out)
    report["encoder_sha256"] = encoder.encoder_hash
    report["evaluation"] = evaluate(encoder, args.eval_seeds, out, passes=args.passes)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    size = (out / "model.safetensors").stat().st_size
    print(f"model.safetensors: {size / 1e6:.1f} MB; report: {report_path}")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
