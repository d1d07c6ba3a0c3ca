"""Train and evaluate the second demo model (``models/demo-dinov3``): a small DINOv3-architecture ViT that grades
knee phantoms by Kellgren-Lawrence grade. Seeded; CPU; **supervised** (no self-supervised pre-training).

    .venv/bin/python benchmarks/demo_dinov3.py                       # train, evaluate, write models/demo-dinov3
    .venv/bin/python benchmarks/demo_dinov3.py --eval-only           # re-evaluate the committed model
    .venv/bin/python benchmarks/demo_dinov3.py --quick --out /tmp/d3 # a tiny smoke run

Data: knee phantoms (``engines.training.phantoms.generate("knee", ...)``) whose ``narrowing_grade`` 0-4 is used as
the KL grade: the phantom narrows the medial joint space with the grade, adds marginal osteophytes from grade 2
and subchondral sclerosis from grade 3 — KL's own criteria (1: doubtful narrowing, possible osteophyte; 2: definite
osteophytes; 3: definite narrowing, some sclerosis; 4: marked narrowing, severe sclerosis). Images go through the
node's input path (min-max to uint8, bilinear 224 px, grey to RGB, ImageNet mean/std). Seed ranges keep the
training, validation-free and held-out sets apart.

Training: the DINOv3 ViT (CLS + 2 register tokens, RoPE on, LayerScale) with a linear layer on the pooled feature
(``--pooling``, default the mean of the normed patch tokens), end to end: cross-entropy plus an L1 term on the expected
grade (ordinal), plus a dense auxiliary cross-entropy on every patch token (target: the grade inside the medial
joint's neighbourhood, 0 elsewhere; a plain ViT trained from scratch on a few thousand images does not start
learning the image-level label alone within a CPU budget); AdamW, cosine schedule, random left-right flips. The linear layer becomes the ``kl_grade`` head (softmax, labels ``0``..``4``, the same pooling) in format 3e.
Evaluation on held-out seeds: accuracy, mean absolute error of the argmax grade, confusion matrix; written to
``<out>/training_report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.dinov3.loaders import save_hf_dinov3  # noqa: E402
from engines.dinov3.network import DINOv3Config, DINOv3ViT, count_parameters, encoder_sha256  # noqa: E402
from engines.heads import LinearHead, save_head  # noqa: E402
from engines.training.inputs import normalise_uint8, to_uint8_224  # noqa: E402
from engines.training.phantoms import generate  # noqa: E402

log = logging.getLogger("demo_dinov3")

TRAIN_SEEDS = 3_000_000
TEST_SEEDS = 4_000_000
GRADES = 5

# Patch 32 (49 patch tokens at 224 px): a quarter of patch 16's token cost, so a from-scratch ViT gets the thousands
# of steps it needs within a CPU budget; the linear patch embedding still sees every pixel of the 224-px input.
DEMO_CONFIG = DINOv3Config(
    hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384, patch_size=32,
    image_size=224, num_register_tokens=2, rope_theta=100.0, use_rope=True, layerscale_value=1e-1,
)
TINY_CONFIG = DINOv3Config(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=16,
    image_size=224, num_register_tokens=1,
)


def knee_pool(start: int, per_grade: int, grid: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [N, 224, 224] knee phantoms with ``per_grade`` of each KL grade 0..4, their grades, and per-patch
    targets [N, grid, grid] (0 outside the medial joint's neighbourhood or at grade 0, else the grade)."""
    images, grades, dense = [], [], []
    for i in range(per_grade * GRADES):
        grade = i % GRADES
        phantom = generate("knee", start + i, narrowing_grade=grade)
        images.append(torch.from_numpy(to_uint8_224(phantom.pixels)))
        grades.append(grade)
        target = torch.zeros(grid, grid, dtype=torch.long)
        for finding in phantom.findings:
            if finding.kind == "narrowing":
                mask = torch.from_numpy(finding.mask.astype(np.float32))[None, None]
                covered = F.adaptive_max_pool2d(mask, grid)[0, 0] > 0
                target[covered] = grade
        dense.append(target)
    return torch.stack(images), torch.tensor(grades), torch.stack(dense)


def flip(batch: torch.Tensor, dense: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flips (a knee of the other side), images and patch targets alike."""
    chosen = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch, dense = batch.clone(), dense.clone()
    batch[chosen] = batch[chosen].flip(-1)
    dense[chosen] = dense[chosen].flip(-1)
    return batch, dense


class Grader(torch.nn.Module):
    """The backbone and a linear layer on its ``pooling`` feature (``cls`` or ``patch_mean``, as heads read them)."""

    def __init__(self, config: DINOv3Config, seed: int, pooling: str = "cls") -> None:
        super().__init__()
        self.backbone = DINOv3ViT(config).init_weights(seed)
        self.classifier = torch.nn.Linear(config.hidden_size, GRADES)
        self.patch_classifier = torch.nn.Linear(config.hidden_size, GRADES)  # training only (dense supervision)
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone.features(x)[self.pooling])

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logits [B, 5], patch logits [B, L, 5])."""
        cls, patches = self.backbone.forward_features(x)
        pooled = cls if self.pooling == "cls" else patches.mean(dim=1)
        return self.classifier(pooled), self.patch_classifier(patches)


def train(config: DINOv3Config, images: torch.Tensor, grades: torch.Tensor, dense: torch.Tensor, *, epochs: int,
          batch_size: int,
          lr: float, seed: int, pooling: str = "cls") -> tuple[Grader, list[dict[str, float]]]:
    torch.manual_seed(seed)
    model = Grader(config, seed, pooling)
    model.backbone.init_buffers("cpu")
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / batch_size)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(GRADES, dtype=torch.float32)
    history = []
    for epoch in range(epochs):
        model.train()
        started, total, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            batch, targets = flip(images[index], dense[index], generator)
            x = normalise_uint8(batch)
            y = grades[index]
            logits, patch_logits = model.both(x)
            expected = (logits.softmax(-1) * ranks).sum(-1)
            loss = (F.cross_entropy(logits, y) + 0.2 * (expected - y.float()).abs().mean()
                    + F.cross_entropy(patch_logits.reshape(-1, GRADES), targets.reshape(-1)))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
            correct += int((logits.argmax(-1) == y).sum())
        row = {"epoch": epoch + 1, "loss": total / len(images), "train_accuracy": correct / len(images),
               "seconds": time.perf_counter() - started}
        history.append(row)
        log.info("epoch %d: loss %.3f, train accuracy %.3f, %.0f s", row["epoch"], row["loss"],
                 row["train_accuracy"], row["seconds"])
    # A key bias never changes attention (softmax is shift-invariant per query); zero it as DINOv3's mask does,
    # so the saved weights are exactly what the loader builds (same encoder hash).
    # (+ 0.0 turns the -0.0 that masking a negative bias leaves into +0.0, as the loader holds it: the encoder
    # hash reads bytes, and -0.0 and +0.0 differ there.)
    model.backbone.apply_bias_mask()
    with torch.no_grad():
        for block in model.backbone.blocks:
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias.add_(0.0)
    return model.eval(), history


@torch.no_grad()
def evaluate(predict, images: torch.Tensor, grades: torch.Tensor, batch_size: int = 64) -> dict[str, object]:
    """Accuracy, MAE of the argmax grade and the confusion matrix (rows: true grade, columns: predicted)."""
    predicted = []
    for start in range(0, len(images), batch_size):
        predicted.append(predict(normalise_uint8(images[start : start + batch_size])).argmax(-1))
    pred = torch.cat(predicted)
    confusion = np.zeros((GRADES, GRADES), dtype=int)
    for t, p in zip(grades.tolist(), pred.tolist()):
        confusion[t, p] += 1
    return {
        "accuracy": float((pred == grades).float().mean()),
        "mean_abs_error": float((pred - grades).abs().float().mean()),
        "within_one": float(((pred - grades).abs() <= 1).float().mean()),
        "confusion_matrix": confusion.tolist(),
        "test": len(grades),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "demo-dinov3")
    parser.add_argument("--train-per-grade", type=int, default=300)
    parser.add_argument("--test-per-grade", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooling", choices=("cls", "patch_mean"), default="patch_mean")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny config, few images, 1 epoch (smoke test)")
    parser.add_argument("--eval-only", action="store_true", help="re-evaluate the model in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    config = DEMO_CONFIG
    if args.quick:
        config, args.train_per_grade, args.test_per_grade, args.epochs = TINY_CONFIG, 4, 2, 1

    test_images, test_grades, _ = knee_pool(TEST_SEEDS, args.test_per_grade, config.grid_size)
    if args.eval_only:
        import engines

        model = engines.load(args.out)
        report = evaluate(lambda x: model.predict(x)["kl_grade"], test_images, test_grades)
        print(json.dumps(report, indent=2))
        return 0

    started = time.perf_counter()
    images, grades, dense = knee_pool(TRAIN_SEEDS, args.train_per_grade, config.grid_size)
    pool_seconds = time.perf_counter() - started
    log.info("pool: %d training, %d held-out phantoms in %.0f s", len(images), len(test_images), pool_seconds)
    grader, history = train(config, images, grades, dense, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, pooling=args.pooling)
    train_seconds = time.perf_counter() - started - pool_seconds
    held_out = evaluate(grader, test_images, test_grades)
    log.info("held out: accuracy %.3f, MAE %.3f, confusion %s", held_out["accuracy"], held_out["mean_abs_error"],
             held_out["confusion_matrix"])

    out: Path = args.out
    backbone = grader.backbone
    save_hf_dinov3(backbone, out, extra_config={"msknode_name": "demo-dinov3", "msknode_version": "1"})
    digest = encoder_sha256(backbone)
    head = LinearHead("kl_grade", config.hidden_size, [str(g) for g in range(GRADES)], "softmax",
                      encoder_sha256=digest, pooling=args.pooling, provenance={
                          "trainer": f"benchmarks/demo_dinov3.py (end-to-end supervised, linear on {args.pooling})",
                          "train_size": len(images), "test_size": len(test_images),
                          "held_out_metrics": {k: held_out[k] for k in ("accuracy", "mean_abs_error", "within_one")},
                          "data": f"knee phantoms, KL grade = narrowing_grade, seeds {TRAIN_SEEDS}..",
                          "script": "benchmarks/demo_dinov3.py",
                          "note": "synthetic demo head, not for clinical use",
                      })
    with torch.no_grad():
        head.linear.weight.copy_(grader.classifier.weight)
        head.linear.bias.copy_(grader.classifier.bias)
    save_head(head.eval(), out / "heads")
    report = {
        "supervision": "supervised (KL grade labels), end to end; no self-supervised pre-training",
        "config": {k: v for k, v in config.to_hf_dict().items() if not isinstance(v, (list, dict))},
        "parameters": count_parameters(config),
        "train": len(images), "pooling": args.pooling, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "history": history, "pool_seconds": pool_seconds, "train_seconds": train_seconds,
        "held_out": held_out, "encoder_sha256": digest, "threads": args.threads, "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread(s)".strip(),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"held_out": held_out, "train_seconds": round(train_seconds), "out": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
