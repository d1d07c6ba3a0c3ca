"""CLI: ``msknode model info | export-onnx | build-engine`` (checkpoint inspection and backends)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

model_app = typer.Typer(help="Inspect, export and build model checkpoints.", no_args_is_help=True)
console = Console()


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)


@model_app.command("info")
def model_info(
    path: Path,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Show a checkpoint's format, sizes, parameters, encoder hash and heads."""
    from engines.mae.encoder import Encoder
    from engines.mae.loaders import CheckpointError, load_checkpoint
    from engines.mae.model import count_parameters

    try:
        with console.status(f"reading {path.name}"):
            checkpoint = load_checkpoint(path)
            encoder = Encoder.from_checkpoint(checkpoint, device="cpu", backend="cpu")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot load {path}: {exc}")
        raise typer.Exit(code=1) from None
    c = checkpoint.config
    info = {
        "path": str(path),
        "format": checkpoint.format,
        "name": encoder.name,
        "version": encoder.version,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "hidden_size": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "mlp_size": c.intermediate_size,
        "layer_norm_eps": c.layer_norm_eps,
        "has_decoder": checkpoint.has_decoder,
        "decoder": (
            f"{c.decoder_hidden_size} x {c.decoder_num_hidden_layers} layers, {c.decoder_num_attention_heads} heads, "
            f"MLP {c.decoder_intermediate_size}" if checkpoint.has_decoder else None
        ),
        "mask_ratio": c.mask_ratio,
        "encoder_parameters": count_parameters(c, with_decoder=False),
        "parameters": count_parameters(c, with_decoder=checkpoint.has_decoder),
        "encoder_sha256": encoder.encoder_hash,
        "model_heads": {
            name: {"labels": head.labels, "activation": head.activation} for name, head in sorted(encoder.heads.items())
        },
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{path}", show_header=False)
    for key, value in info.items():
        if key == "model_heads":
            value = "\n".join(f"{n}: {h['activation']} {h['labels']}" for n, h in value.items()) or "none"
        elif isinstance(value, int) and key.endswith("parameters"):
            value = f"{value:,}"
        table.add_row(key, str(value))
    console.print(table)


@model_app.command("export-onnx")
def export_onnx_command(
    path: Path,
    out: Path = typer.Option(..., "--out", help="Folder for encoder_full.onnx, encoder_masked.onnx, decoder.onnx."),
    passes: int = typer.Option(10, help="Masked passes per image used for the example inputs."),
) -> None:
    """Export the ONNX graphs a TensorRT build needs (dynamic batch), fp32."""
    from engines.mae.loaders import CheckpointError, build_model, load_checkpoint
    from engines.backends.onnx_export import GRAPH_NAMES, export_onnx

    try:
        checkpoint = load_checkpoint(path)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot load {path}: {exc}")
        raise typer.Exit(code=1) from None
    model = build_model(checkpoint)
    graphs = GRAPH_NAMES if checkpoint.has_decoder else ("encoder_full",)
    if not checkpoint.has_decoder:
        console.print("[yellow]encoder-only checkpoint: exporting encoder_full only")
    with _progress() as progress:
        task = progress.add_task("exporting", total=len(graphs))
        for graph in graphs:
            progress.update(task, description=f"exporting {graph}")
            result = export_onnx(model, out, graphs=(graph,), passes=passes)
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
    from engines.backends.tensorrt_backend import BatchProfile, TensorRTBackend
    from engines.mae.loaders import CheckpointError, build_model, load_checkpoint

    if not tensorrt_available():
        console.print("[red]TensorRT needs the 'tensorrt' extra (pip install 'msknode[tensorrt]') and a CUDA GPU")
        raise typer.Exit(code=1)
    try:
        model = build_model(load_checkpoint(path))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]cannot load {path}: {exc}")
        raise typer.Exit(code=1) from None
    profile = BatchProfile(min_images=1, opt_images=opt_images, max_images=max_images, passes=passes)
    with _progress() as progress:
        task = progress.add_task("preparing", total=None)
        backend = TensorRTBackend.from_model(
            model, precision=precision, cache_dir=cache_dir, profile=profile,
            progress=lambda message: progress.update(task, description=message),
        )
        progress.update(task, description="plans ready")
    for graph, key in backend.keys.items():
        console.print(
            f"{graph}: {key.file_name(graph)} "
            f"({key.gpu_name}, sm {key.compute_capability}, TensorRT {key.tensorrt_version})"
        )
