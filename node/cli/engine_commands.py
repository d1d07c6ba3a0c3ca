"""CLI: ``msknode model info | export-onnx | build-engine | export-triton`` (checkpoint inspection and backends)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from engines.family import ExportsGraphs  # light: no torch
from node.cli.node_commands import ConfigOption, load_or_exit

model_app = typer.Typer(help="Inspect, export and build model checkpoints.", no_args_is_help=True)
console = Console()


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)


def _load(path: Path, load_heads: bool = True):
    """The checkpoint at ``path`` as a loaded model (any family), on the CPU; exits 1 with the reason if it cannot."""
    import engines  # here, not at the top: torch stays out of the CLI's start-up

    try:
        with console.status(f"reading {path.name}"):
            return engines.load(path, device="cpu", backend="cpu", load_heads=load_heads)
    except (FileNotFoundError, ValueError) as exc:  # a loader's CheckpointError is a ValueError
        console.print(f"[red]cannot load {path}: {exc}")
        raise typer.Exit(code=1) from None


def _graphs(path: Path):
    """A loaded model that can export its graphs (``engines.family.ExportsGraphs``), or exit 1."""
    model = _load(path, load_heads=False)
    if not isinstance(model, ExportsGraphs):
        console.print(f"[red]{path}: the {model.family} family has no ONNX / TensorRT graphs")
        raise typer.Exit(code=1)
    return model


@model_app.command("info")
def model_info(
    path: Path,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Show a checkpoint's format, sizes, parameters, encoder hash and heads."""
    info = {"path": str(path), **_load(path).inspect()}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{path}", show_header=False)
    for key, value in info.items():
        if key == "model_heads":
            value = "\n".join(
                f"{n}: {h['activation']} {h['labels']}" + (f" (calibrated: {h['calibration']})" if "calibration" in h else "")
                for n, h in value.items()
            ) or "none"
        elif isinstance(value, int) and key.endswith("parameters"):
            value = f"{value:,}"
        elif isinstance(value, dict):  # e.g. a multi-head classifier's output groups and findings: one per line
            value = "\n".join(f"{k}: {v}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            value = "\n".join(str(v) for v in value) or "none"
        table.add_row(key, str(value))
    console.print(table)


@model_app.command("export-onnx")
def export_onnx_command(
    path: Path,
    out: Path = typer.Option(..., "--out", help="Folder for encoder_full.onnx, encoder_masked.onnx, decoder.onnx."),
    passes: int = typer.Option(10, help="Masked passes per image used for the example inputs."),
) -> None:
    """Export the ONNX graphs a TensorRT build needs (dynamic batch), fp32."""
    model = _graphs(path)
    graphs = model.graph_names()
    if not model.supports_error_map:
        console.print("[yellow]encoder-only checkpoint: exporting encoder_full only")
    with _progress() as progress:
        task = progress.add_task("exporting", total=len(graphs))
        for graph in graphs:
            progress.update(task, description=f"exporting {graph}")
            result = model.export_onnx(out, graphs=(graph,), passes=passes)
            progress.advance(task)
            console.print(f"{result.paths[graph]}  sha256 {result.sha256[graph][:16]}...")


@model_app.command("build-engine")
def build_engine_command(
    path: Path,
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Plan cache folder (default ~/.cache/msknode/engines)."),
    precision: str = typer.Option("fp16", help="fp16 (default), bf16 or fp32."),
    opt_images: int = typer.Option(4, help="Images per batch TensorRT optimises for."),
    max_images: int = typer.Option(16, help="Largest batch of images the plans accept."),
    passes: int = typer.Option(10, help="Masked passes per image (error-map masks)."),
) -> None:
    """Build (or find in the cache) the TensorRT plans for this GPU; needs the 'tensorrt' extra and CUDA."""
    from engines.backends import tensorrt_available
    from engines.backends.tensorrt_backend import BatchProfile

    if not tensorrt_available():
        console.print("[red]TensorRT needs the 'tensorrt' extra (pip install 'msknode[tensorrt]') and a CUDA GPU")
        raise typer.Exit(code=1)
    model = _graphs(path)
    profile = BatchProfile(min_images=1, opt_images=opt_images, max_images=max_images, passes=passes)
    with _progress() as progress:
        task = progress.add_task("preparing", total=None)
        backend = model.build_tensorrt(
            cache_dir=cache_dir, precision=precision, profile=profile,
            progress=lambda message: progress.update(task, description=message),
        )
        progress.update(task, description="plans ready")
    for graph, key in backend.keys.items():
        console.print(
            f"{graph}: {key.file_name(graph)} "
            f"({key.gpu_name}, sm {key.compute_capability}, TensorRT {key.tensorrt_version})"
        )


@model_app.command("export-triton")
def export_triton_command(
    out: Path = typer.Argument(..., help="Model repository folder (created); Triton's --model-repository."),
    config: ConfigOption = None,
    models: list[Path] = typer.Option(
        None, "--model", help="Checkpoint to export (repeatable); default: the configured [engine] model."
    ),
    name: str = typer.Option("", help="Base name of the served models (one model only); default [engine] "
                                      "triton_model, else the model's name."),
    max_batch_size: int = typer.Option(16, min=1, max=1024, help="Images per request Triton may batch together."),
    queue_delay_us: int = typer.Option(2000, min=0, help="Dynamic batching: longest wait for more requests (µs)."),
    passes: int = typer.Option(None, help="Masked passes per image (default [engine] passes)."),
    tensorrt: str = typer.Option("auto", help="auto (where TensorRT and a GPU are present), yes or no: also write "
                                               "fp16 TensorRT plans as <name>-trt_embed / <name>-trt_reconstruct."),
) -> None:
    """Write a Triton Inference Server model repository for each configured model (ONNX, config.pbtxt)."""
    from engines.backends import tensorrt_available
    from engines.backends.triton import export_repository, model_names

    settings = load_or_exit(config)
    paths = list(models or [settings.engine.model])
    if name and len(paths) > 1:
        console.print("[red]--name names one model; export several models without it (each gets its own name)")
        raise typer.Exit(code=2)
    if tensorrt not in ("auto", "yes", "no"):
        console.print("[red]--tensorrt must be auto, yes or no")
        raise typer.Exit(code=2)
    with_plans = tensorrt == "yes" or (tensorrt == "auto" and tensorrt_available())
    if tensorrt == "yes" and not tensorrt_available():
        console.print("[red]TensorRT needs the 'tensorrt' extra (pip install 'msknode[tensorrt]') and a CUDA GPU")
        raise typer.Exit(code=1)
    configured = not models
    for path in paths:
        model = _graphs(path)
        base = name or (settings.engine.triton_model if configured else "") or model.name
        try:
            model_names(base)
        except ValueError as exc:
            console.print(f"[red]{exc}; pass --name")
            raise typer.Exit(code=2) from None
        with _progress() as progress:
            task = progress.add_task("exporting", total=None)
            folders = export_repository(
                model, out, base, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                passes=passes or settings.engine.passes, tensorrt=with_plans,
                progress=lambda message: progress.update(task, description=message),
            )
        for folder in folders:
            console.print(f"{folder}  ({(folder / 'config.pbtxt').stat().st_size} B config, encoder "
                          f"{model.encoder_hash[:16]}...)")
    if not with_plans:
        console.print("ONNX only (platform onnxruntime_onnx); TensorRT plans need TensorRT and a GPU here")
