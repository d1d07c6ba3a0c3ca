"""The ``msknode`` command line: one Typer app with a sub-command per admin task."""

from __future__ import annotations

import typer

from node.cli import admin_commands, engine_commands, node_commands, training_commands, user_commands

app = typer.Typer(
    name="msknode",
    help="msknode: a DICOM node that runs a musculoskeletal radiograph encoder on studies from the PACS.",
    no_args_is_help=True,
    add_completion=False,
)

node_commands.register(app)
admin_commands.register(app)
app.add_typer(engine_commands.model_app, name="model")
app.add_typer(training_commands.heads_app, name="heads")
app.add_typer(user_commands.users_app, name="users")
training_commands.register(app, engine_commands.model_app)


def main() -> None:
    """Console-script entry point."""
    from node.runtime.logs import protect_logs

    protect_logs()  # no command prints a header value that a pydicom warning quotes
    app()
