"""CLI: ``msknode heads train``, ``msknode model calibrate`` and ``msknode infer``."""

from __future__ import annotations

from pathlib import Path

import typer

heads_app = typer.Typer(help="Train linear-probe heads on frozen embeddings.", no_args_is_help=True)


def register(app: typer.Typer, model_app: typer.Typer) -> None:
    """Attach the commands that live outside the heads sub-app."""
    app.command("infer")(infer)


def infer(files: list[Path], out: Path = typer.Option(..., "--out")) -> None:
    """Run preprocessing, the error map and the heads on DICOM files without a PACS."""
    raise typer.Exit(code=2)
