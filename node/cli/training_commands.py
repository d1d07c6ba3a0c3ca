"""CLI: ``msknode heads train``, ``msknode model calibrate``, ``msknode infer`` and ``msknode phantoms``.

These are a site's tools around its weights, without a PACS: fit a linear-probe head on labelled DICOM files,
record the abnormality scores of its normal studies (so results can say "98th percentile"), and run the whole
engine on a few files to see what the node would send (PNG overlays plus JSON).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import typer

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo-mae"

heads_app = typer.Typer(help="Train linear-probe heads on frozen embeddings.", no_args_is_help=True)


def register(app: typer.Typer, model_app: typer.Typer) -> None:
    """Attach the commands that live outside the heads sub-app."""
    app.command("infer")(infer)
    app.command("phantoms")(phantoms)
    model_app.command("calibrate")(calibrate)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, and every file under the given folders (sorted); non-DICOM files are skipped later."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in (".csv", ".json", ".png", ".txt")))
        elif path.is_file():
            found.append(path)
        else:
            raise typer.BadParameter(f"{path} does not exist")
    return found


def _load_model(model: Path, load_heads: bool = True):
    """The checkpoint as a loaded model (``engines.family.ModelFamily``), or exit 2 with the reason."""
    import engines  # here, not at the top: torch stays out of the CLI's start-up

    try:
        return engines.load(model, load_heads=load_heads)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a usage error here
        typer.echo(f"cannot load model {model}: {exc}", err=True)
        raise typer.Exit(code=2) from exc


def _read_labels(labels: Path, column: str) -> tuple[list[dict[str, str]], list[int]]:
    """Rows of a labels CSV (a 'file' column and the label column) and their integer labels, or exit 2."""
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "file" not in rows[0] or column not in rows[0]:
        typer.echo(f"{labels}: needs columns 'file' and {column!r}", err=True)
        raise typer.Exit(code=2)
    try:
        targets = [int(float(r[column])) for r in rows]
    except ValueError as exc:
        typer.echo(f"{labels}: column {column!r} must hold integer labels ({exc})", err=True)
        raise typer.Exit(code=2) from exc
    return rows, targets


def _labelled_embeddings(loaded: Any, data: Path, rows: list[dict[str, str]], targets: list[int], pooling: str):
    """(embeddings [N, D], their labels) of the readable files among ``rows``; unreadable files are skipped."""
    import torch

    from engines.training.inputs import dicom_inputs

    embeddings: list[torch.Tensor] = []
    kept: list[int] = []
    with _progress() as bar:
        task = bar.add_task("embedding", total=len(rows))
        for row, target in zip(rows, targets):
            try:
                x, _, _ = dicom_inputs(data / row["file"], loaded.preprocessing)
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the fit
                log.warning("skipping %s: %s", row["file"], exc)
                bar.advance(task)
                continue
            embeddings.append(loaded.embed(x[:1]) if pooling == "cls" else loaded.embed(x[:1], pooling=pooling))
            kept.append(target)
            bar.advance(task)
    return (torch.cat(embeddings) if embeddings else torch.empty(0)), kept


# ---------------------------------------------------------------------------------------------------------
# heads train
# ---------------------------------------------------------------------------------------------------------


@heads_app.command("train")
def heads_train(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", help="checkpoint (folder or file) whose encoder stays frozen"),
    data: Path = typer.Option(..., "--data", help="folder of the DICOM files named in the labels CSV"),
    labels: Path = typer.Option(..., "--labels", help="CSV with a 'file' column (relative to --data) and the label column"),
    name: str = typer.Option(..., "--name", help="head name, e.g. fracture; also the default label column"),
    column: Optional[str] = typer.Option(None, "--column", help="label column (default: the head name)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class names for integer labels 0..K-1 (softmax); default: one sigmoid label for 0/1"),
    test_fraction: float = typer.Option(0.25, "--test-fraction", min=0.05, max=0.9),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="heads folder (default: <model>/heads)"),
    pooling: str = typer.Option("cls", "--pooling", help="feature the head reads: cls (every family) or patch_mean "
                                                         "(mean of the patch tokens; families that offer it, e.g. DINOv3)"),
) -> None:
    """Fit a linear probe on frozen embeddings (CLS, or mean patch token) of labelled DICOM files; save it in
    format 3e. Any model family (MAE, DINOv3)."""
    import numpy as np

    from engines.heads import save_head
    from engines.training.probes import fit_linear_probe, probe_to_head

    column = column or name
    rows, targets = _read_labels(labels, column)
    class_names = [c.strip() for c in classes.split(",")] if classes else [name]
    if not classes and set(targets) - {0, 1}:
        class_names = [f"{name}{k}" for k in range(max(targets) + 1)]
    loaded = _load_model(model, load_heads=False)
    offered = tuple(getattr(loaded, "poolings", ("cls",)))  # a capability, not a family check
    if pooling not in offered:
        typer.echo(f"--pooling {pooling}: model {model} offers {', '.join(offered)}", err=True)
        raise typer.Exit(code=2)
    embeddings, kept = _labelled_embeddings(loaded, data, rows, targets, pooling)
    if len(set(kept)) < 2:
        typer.echo("need at least two classes among the readable files", err=True)
        raise typer.Exit(code=2)
    fit = fit_linear_probe(embeddings, np.asarray(kept), class_names, test_fraction=test_fraction, seed=seed)
    head = probe_to_head(
        fit,
        name,
        loaded.encoder_hash,
        provenance={"data": str(data), "labels": str(labels), "column": column, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        pooling=pooling,
    )
    weights, meta = save_head(head, out or (Path(model) / "heads"))
    for key, value in fit.metrics.items():
        typer.echo(f"{key}: {value:.3f}")
    typer.echo(f"train {fit.train_size}, held out {fit.test_size}; saved {weights} and {meta.name}")


# ---------------------------------------------------------------------------------------------------------
# model calibrate
# ---------------------------------------------------------------------------------------------------------


def calibrate(
    model: Path = typer.Option(DEFAULT_MODEL, "--model", help="checkpoint folder; calibration.json is written beside it"),
    data: Path = typer.Option(..., "--data", help="folder of the site's normal studies (DICOM); with --labels, the "
                                                  "folder of the files the labels CSV names"),
    passes: int = typer.Option(10, "--passes", min=1),
    seed: int = typer.Option(0, "--seed", help="error-map mask seed (use the node's); with --labels, the split seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write calibration.json (default: the model "
                                                           "folder); with --labels, the heads folder"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV ('file' + label column) of labelled studies: "
                                          "calibrate a head's probabilities (any family; the only kind for a "
                                          "model without an error map, e.g. DINOv3)"),
    head: Optional[str] = typer.Option(None, "--head", help="with --labels: the head to calibrate (default: the "
                                                            "model's only head)"),
    column: Optional[str] = typer.Option(None, "--column", help="with --labels: label column (default: the head name)"),
    test_fraction: float = typer.Option(0.3, "--test-fraction", min=0.0, max=0.9,
                                        help="with --labels: share held out to report ECE on data the fit did not see"),
) -> None:
    """Store the distribution of abnormality scores over normal studies, for percentiles in results; or, with
    --labels, fit temperature / Platt scaling of a head's probabilities on labelled studies (ECE before and after)."""
    from engines.calibration import CALIBRATION_FILE, Calibration

    if labels is not None:
        _calibrate_head(model, data, labels, head, column, test_fraction, seed, out)
        return
    from engines.training.inputs import dicom_inputs

    loaded = _load_model(model, load_heads=False)
    if not loaded.supports_error_map:
        typer.echo(f"model {model} ({loaded.family}) has no error map, so no abnormality score to calibrate; "
                   "calibrate its heads' probabilities instead: --labels CSV --head NAME", err=True)
        raise typer.Exit(code=2)
    files = _dicom_files([data])
    scores: list[float] = []
    with _progress() as bar:
        task = bar.add_task("error maps", total=len(files))
        for path in files:
            try:
                x, _, _ = dicom_inputs(path, loaded.preprocessing)
            except Exception as exc:  # noqa: BLE001
                log.warning("skipping %s: %s", path.name, exc)
                bar.advance(task)
                continue
            _, frame_scores = loaded.error_map(x, seed=seed, passes=passes)
            scores.extend(float(s) for s in frame_scores)
            bar.advance(task)
    if not scores:
        typer.echo(f"no readable DICOM images under {data}", err=True)
        raise typer.Exit(code=2)
    calibration = Calibration.from_scores(
        scores,
        encoder_sha256=loaded.encoder_hash,
        passes=passes,
        seed=seed,
        source=str(data),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    target = out or (Path(model) if Path(model).is_dir() else Path(model).parent)
    path = calibration.save(target if target.suffix == ".json" else Path(target) / CALIBRATION_FILE)
    summary = calibration.summary()
    typer.echo(f"{summary['n']} images: median {summary['p50']:.5f}, p95 {summary['p95']:.5f}, p99 {summary['p99']:.5f}; saved {path}")


def _calibrate_head(
    model: Path, data: Path, labels: Path, head_name: Optional[str], column: Optional[str], test_fraction: float,
    seed: int, out: Optional[Path],
) -> None:
    """Temperature (softmax) or Platt (one sigmoid label) scaling of one head, fitted on labelled studies and
    stored in the head's JSON; ECE and log loss before/after on the held-out share (and on the fit share)."""
    import numpy as np
    import torch

    from engines.calibration import (
        class_probabilities,
        expected_calibration_error,
        fit_logit_calibration,
        log_loss,
    )
    from engines.heads import save_head
    from engines.training.probes import stratified_split

    loaded = _load_model(model, load_heads=True)
    if head_name is None:
        if len(loaded.heads) != 1:
            typer.echo(f"--head NAME needed: model {model} has heads {', '.join(sorted(loaded.heads)) or '(none)'}",
                       err=True)
            raise typer.Exit(code=2)
        head_name = next(iter(loaded.heads))
    head = loaded.heads.get(head_name)
    if head is None:
        typer.echo(f"model {model} has no head {head_name!r} (heads: {', '.join(sorted(loaded.heads)) or 'none'})",
                   err=True)
        raise typer.Exit(code=2)
    if head.activation not in ("softmax", "sigmoid") or (head.activation == "sigmoid" and len(head.labels) != 1):
        typer.echo(f"head {head_name!r} ({head.activation}, {len(head.labels)} labels) cannot be calibrated: only "
                   "softmax heads (temperature) and one-label sigmoid heads (Platt)", err=True)
        raise typer.Exit(code=2)
    classes = 2 if head.activation == "sigmoid" else len(head.labels)
    rows, targets = _read_labels(labels, column or head_name)
    if any(t < 0 or t >= classes for t in targets):
        typer.echo(f"{labels}: labels must be 0..{classes - 1} for head {head_name!r} ({', '.join(head.labels)})",
                   err=True)
        raise typer.Exit(code=2)
    embeddings, kept = _labelled_embeddings(loaded, data, rows, targets, head.pooling)
    if len(set(kept)) < 2:
        typer.echo("need at least two classes among the readable files", err=True)
        raise typer.Exit(code=2)
    with torch.no_grad():
        logits = head(embeddings).double()  # as fitted: any calibration already on the head is refitted
    y = np.asarray(kept)
    if test_fraction > 0:
        fit_idx, held_idx = stratified_split(y, test_fraction, seed)
    else:
        fit_idx, held_idx = np.arange(len(y)), np.arange(0)
    fitted = fit_logit_calibration(logits[fit_idx], y[fit_idx], head.activation)

    def scores(idx: np.ndarray) -> dict[str, float]:
        t = torch.as_tensor(y[idx])
        before, after = (class_probabilities(logits[idx], head.activation, c) for c in (None, fitted))
        return {"ece_before": expected_calibration_error(before, t), "ece_after": expected_calibration_error(after, t),
                "log_loss_before": log_loss(before, t), "log_loss_after": log_loss(after, t)}

    on_fit = scores(fit_idx)
    held_out = scores(held_idx) if len(held_idx) else None
    record: dict[str, Any] = {"method": fitted.method, "scale": fitted.scale, "offset": fitted.offset}
    if fitted.method == "temperature":
        record["temperature"] = fitted.temperature
    record.update({
        "fitted_on": int(len(fit_idx)), "held_out": int(len(held_idx)), "ece_bins": 15,
        "fit": {k: round(v, 6) for k, v in on_fit.items()},
        "held_out_metrics": {k: round(v, 6) for k, v in held_out.items()} if held_out else None,
        "data": str(data), "labels": str(labels), "column": column or head_name, "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    head.set_calibration(record)
    folder = out or (Path(model) / "heads" if Path(model).is_dir() else Path(model).parent / "heads")
    _, meta = save_head(head, folder)
    what = (f"temperature {fitted.temperature:.3f}" if fitted.method == "temperature"
            else f"Platt scale {fitted.scale:.3f}, offset {fitted.offset:+.3f}")
    typer.echo(f"head {head_name}: {what} (fitted on {len(fit_idx)} images)")
    for label, metrics, n in (("held out", held_out, len(held_idx)), ("fit set", on_fit, len(fit_idx))):
        if metrics:
            typer.echo(f"{label} ({n}): ECE {metrics['ece_before']:.3f} -> {metrics['ece_after']:.3f}, "
                       f"log loss {metrics['log_loss_before']:.3f} -> {metrics['log_loss_after']:.3f}")
    typer.echo(f"saved {meta}")


# ---------------------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------------------


def infer(
    files: list[Path] = typer.Argument(..., help="DICOM files or folders"),
    out: Path = typer.Option(..., "--out", help="folder for <name>.png overlays and <name>.json results"),
    model: Path = typer.Option(DEFAULT_MODEL, "--model"),
    passes: int = typer.Option(10, "--passes", min=1),
    seed: int = typer.Option(0, "--seed"),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0),
) -> None:
    """Run preprocessing, the error map and the heads on DICOM files without a PACS."""
    import numpy as np

    from engines.calibration import load_calibration
    from engines.imaging.overlay import save_overlay_png
    from engines.imaging.regions import highest_error_region
    from engines.training.inputs import dicom_inputs

    loaded = _load_model(model)
    calibration = load_calibration(model if Path(model).is_dir() else Path(model).parent, loaded.encoder_hash)
    out.mkdir(parents=True, exist_ok=True)
    paths = _dicom_files(files)
    failures = 0
    with _progress() as bar:
        task = bar.add_task("infer", total=len(paths))
        for index, path in enumerate(paths):
            try:
                x, geometry, display = dicom_inputs(path, loaded.preprocessing)
            except Exception as exc:  # noqa: BLE001
                typer.echo(f"{path.name}: cannot use ({exc})", err=True)
                failures += 1
                bar.advance(task)
                continue
            maps, scores = loaded.error_map(x, seed=seed, passes=passes)
            predictions = loaded.predict(x)
            for frame in range(x.shape[0]):
                stem = f"{index:04d}_{path.stem}" + (f"_f{frame + 1}" if x.shape[0] > 1 else "")
                error_map = maps[frame].numpy()
                score = float(scores[frame])
                region = highest_error_region(error_map, geometry)
                result: dict[str, Any] = {
                    "file": str(path),
                    "frame": frame + 1,
                    "model": {"name": loaded.name, "version": loaded.version, "encoder_sha256": loaded.encoder_hash},
                    "error_map": {"passes": passes, "seed": seed},
                    "score": score,
                    "percentile": calibration.percentile(score) if calibration else None,
                    "heads": {
                        name: {
                            "labels": loaded.heads[name].labels,
                            "activation": loaded.heads[name].activation,
                            "probabilities": [float(p) for p in probs[frame]],
                        }
                        for name, probs in predictions.items()
                    },
                    "region": None
                    if region is None
                    else {
                        "polygon": np.round(region.polygon, 2).tolist(),
                        "centroid": np.round(region.centroid, 2).tolist(),
                        "area_fraction": region.area_fraction,
                        "mean_error": region.mean_error,
                        "coordinates": "source pixels (column, row), SCOORD convention",
                    },
                    "geometry": {"rows": geometry.rows, "columns": geometry.columns, "pixel_spacing": geometry.pixel_spacing},
                    "overlay": f"{stem}.png",
                }
                save_overlay_png(out / f"{stem}.png", display[frame], error_map, alpha=alpha)
                (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
                pct = f", percentile {result['percentile']:.0f}" if calibration else ""
                bar.console.print(f"{path.name}: score {score:.5f}{pct}")
            bar.advance(task)
    if failures and failures == len(paths):
        raise typer.Exit(code=1)


# ---------------------------------------------------------------------------------------------------------
# phantoms
# ---------------------------------------------------------------------------------------------------------


def phantoms(
    out: Path = typer.Argument(..., help="folder for the DICOM files and labels.csv"),
    count: int = typer.Option(12, "--count", min=1),
    seed: int = typer.Option(0, "--seed"),
    kinds: str = typer.Option("hand,knee,long_bone", "--kinds", help="comma-separated: hand, knee, long_bone"),
    p_finding: float = typer.Option(0.5, "--p-finding", min=0.0, max=1.0, help="share of images with a focal finding"),
    modality: str = typer.Option("CR", "--modality", help="CR or DX"),
    jpeg2000: bool = typer.Option(False, "--jpeg2000", help="JPEG 2000 lossless (pylibjpeg-openjpeg)"),
    monochrome1_every: int = typer.Option(0, "--monochrome1-every", help="store every n-th image as MONOCHROME1"),
) -> None:
    """Write synthetic phantom radiographs (not real patients) as DICOM studies, with labels.csv."""
    from engines.training.phantoms import KINDS, write_dataset

    chosen = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = set(chosen) - set(KINDS)
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if modality not in ("CR", "DX"):
        raise typer.BadParameter("modality must be CR or DX")
    csv_path = write_dataset(
        out,
        count,
        seed=seed,
        kinds=chosen,
        p_finding=p_finding,
        modality=modality,
        compress="jpeg2000-lossless" if jpeg2000 else None,
        monochrome1_every=monochrome1_every,
        progress=True,
    )
    typer.echo(f"wrote {count} phantom images and {csv_path}")
