"""CLI: ``msknode model info | export-onnx | build-engine`` (checkpoint inspection and backends)."""

from __future__ import annotations

from pathlib import Path

import typer

model_app = typer.Typer(help="Inspect, export and build model checkpoints.", no_args_is_help=True)


@model_app.command("info")
def model_info(path: Path) -> None:
    """Show a checkpoint's format, sizes, parameters, encoder hash and heads."""
    raise typer.Exit(code=2)
