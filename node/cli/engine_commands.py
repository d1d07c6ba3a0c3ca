"""CLI commands that drive engines/: model info/export/build, head training, calibration, offline inference.

Owned by the Engine work; filled in there.
"""

from __future__ import annotations

from pathlib import Path

import typer

model_app = typer.Typer(help="Inspect, export and build model checkpoints.", no_args_is_help=True)
heads_app = typer.Typer(help="Train linear-probe heads on frozen embeddings.", no_args_is_help=True)


@model_app.command("info")
def model_info(path: Path) -> None:
    """Show a checkpoint's format, sizes, parameters, encoder hash and heads."""
    raise typer.Exit(code=2)


def infer(files: list[Path], out: Path = typer.Option(..., "--out")) -> None:
    """Run preprocessing, the error map and the heads on DICOM files without a PACS."""
    raise typer.Exit(code=2)
