"""CLI: ``serve``, ``config check``, ``db upgrade``, ``echo PEER`` and ``studies``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from node.settings import CONFIG_ENV_VAR, ConfigError, Settings, load_settings

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        "-c",
        help=f"Configuration file (TOML). Defaults to ${CONFIG_ENV_VAR}, then the embedded defaults.",
        envvar=CONFIG_ENV_VAR,
    ),
]

config_app = typer.Typer(help="Validate configuration files.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


def load_or_exit(path: Path | None) -> Settings:
    """Load settings or print every problem (with its key path) and exit 2."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/] in {exc.source}:")
        for problem in exc.problems:
            err_console.print(f"  - {problem}")
        raise typer.Exit(code=2) from None


def require_database(settings: Settings) -> None:
    """For read-only commands: the database must exist at the current revision (never created nor migrated
    here); otherwise a clear error naming it, exit 1."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage.migrate import DatabaseNotReady, require_current

    try:
        require_current(settings.storage.database_url)
    except DatabaseNotReady as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(code=1) from None
    except SQLAlchemyError as exc:
        err_console.print(f"database unavailable ({settings.storage.database_url.split(':', 1)[0]}): "
                          f"{type(getattr(exc, 'orig', None) or exc).__name__}")
        raise typer.Exit(code=1) from None


def serve(
    config: ConfigOption = None,
    role: Annotated[
        str, typer.Option(help="all (supervise [pipeline] roles), or one of receiver | scheduler | worker | sender | web.")
    ] = "all",
) -> None:
    """Run the node in the foreground until Ctrl-C / SIGTERM."""
    from node.runtime.logs import configure_logging
    from node.runtime.service import serve as run_serve

    settings = load_or_exit(config)
    try:
        _check_tls_files(settings, str(config or "<defaults>"))
    except ConfigError as exc:
        err_console.print(f"[bold red]configuration error[/] in {exc.source}:")
        for problem in exc.problems:
            err_console.print(f"  - {problem}")
        raise typer.Exit(code=2) from None
    configure_logging(settings.logging.level, settings.logging.format)
    run_serve(settings, role=role, config_path=config)


def _check_triage_names(settings: Settings, source: str) -> None:
    """Triage rules may only name study attributes and the configured models' reported heads (``<model>.<head>``,
    bare for the first model); a ``[[models]]`` entry's ``heads`` must exist in its model (heads' JSON, no weights)."""
    from node.pipeline.models import configured_head_labels
    from node.pipeline.triage import Triage, TriageError, head_labels_from_model

    models, problems = configured_head_labels(settings.model_entries, head_labels_from_model)
    if problems:
        raise ConfigError(source, problems)
    try:
        if models is None:  # a model given as a file: its heads are checked when the worker has loaded it
            Triage(settings.triage, None)
        elif len(models) == 1:
            Triage(settings.triage, next(iter(models.values())), models)
        else:
            Triage(settings.triage, None, models)
    except TriageError as exc:
        raise ConfigError(source, exc.problems) from None


def _check_tls_files(settings: Settings, source: str) -> None:
    """TLS files must exist, load, and keep their private keys private (checked before any role starts)."""
    from node.dicom.tls import TlsConfigError, client_context, server_context

    problems = []
    checks = [(settings.node.tls, server_context, "node.tls")]
    if any(peer.tls for peer in settings.peers):
        checks.append((settings.sender.tls, client_context, "sender.tls"))
    for tls, build, section in checks:
        if tls.enabled:
            try:
                build(tls, section)
            except TlsConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError(source, problems)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="The TOML file to validate.")]) -> None:
    """Validate FILE: print every problem with its key path; exit non-zero if there is any."""
    try:
        settings = load_settings(path)
        _check_triage_names(settings, str(path))
        _check_tls_files(settings, str(path))
    except ConfigError as exc:
        err_console.print(f"{exc.source}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            err_console.print(f"  {problem}")
        raise typer.Exit(code=1) from None
    console.print(
        f"{path}: OK — AE {settings.node.ae_title} on {settings.node.host}:{settings.node.port}, "
        f"{len(settings.peers)} peer(s), database {settings.storage.database_url.split(':', 1)[0]}"
    )


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply database migrations up to the newest revision."""
    from storage.migrate import upgrade

    settings = load_or_exit(config)
    revision = upgrade(settings.storage.database_url)
    console.print(f"database at revision {revision}")


def echo(
    peer: Annotated[str, typer.Argument(help="Name of a peer (msknode peers list).")],
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
) -> None:
    """Send a C-ECHO to a configured peer and print the round trip."""
    from node.dicom.scu import echo as send_echo

    from node.peers import PeerDirectory
    from storage.db import Database

    from storage.migrate import DatabaseNotReady, require_current

    settings = load_or_exit(config)
    try:
        require_current(settings.storage.database_url)
    except DatabaseNotReady as exc:
        if not exc.missing:
            require_database(settings)  # prints the problem and exits
        # Before the node first started (checking the PACS at installation): the file's peers only.
        err_console.print(f"note: {exc}; using the configuration file's peers only", soft_wrap=True)
        target = next((p for p in settings.peers if p.name == peer), None)
        known = [p.name for p in settings.peers] if target is None else []
    else:
        database = Database(settings.storage.database_url)
        try:  # the file's peers plus those added with `msknode peers add` or on the web
            directory = PeerDirectory(settings, database)
            target = directory.get(peer)
            known = [p.name for p in directory.list()] if target is None else []
        finally:
            database.dispose()
    if target is None:
        err_console.print(f"no peer named {peer!r}; known: {', '.join(known) or 'none'}")
        raise typer.Exit(code=2)
    tls_args = None
    if target.tls:  # the same TLS settings the sender uses for this peer
        from node.dicom.tls import TlsConfigError, client_tls_args

        try:
            tls_args = client_tls_args(settings.sender.tls, target.host)
        except TlsConfigError as exc:
            err_console.print(f"configuration error: {exc}")
            raise typer.Exit(code=2) from None
    result = send_echo(settings.node.ae_title, target, timeout=timeout, tls_args=tls_args)
    where = f"{target.name} ({target.ae_title}@{target.host}:{target.port})"
    if result.ok:
        console.print(f"C-ECHO {where}: success in {result.round_trip_ms:.1f} ms")
        return
    err_console.print(f"C-ECHO {where}: FAILED — {result.error}")
    raise typer.Exit(code=1)


def studies(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many studies, newest first.")] = 200,
) -> None:
    """List received studies, newest first."""
    from storage.db import Database
    from storage.studies import studies_summary

    settings = load_or_exit(config)
    require_database(settings)
    database = Database(settings.storage.database_url)
    try:
        rows = studies_summary(database, limit=limit)
    finally:
        database.dispose()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} studies")
    for column in ("study_instance_uid", "accession", "instances", "series", "modalities", "status", "last_received"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["study_instance_uid"]),
            str(row["accession_number"] or ""),
            str(row["instances"]),
            str(row["series"]),
            ",".join(row["modalities"]),  # type: ignore[arg-type]
            str(row["status"]),
            str(row["last_received"]),
        )
    console.print(table)
    for row in rows:  # MR studies: which series fed the 3-D model, one line per plane
        for line in selection_lines(row.get("series_selection")):  # type: ignore[arg-type]
            console.print(f"{row['study_instance_uid']}  {line}", markup=False, highlight=False)


def selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """A stored series selection as text, one line per plane: the chosen series and its score, or why none was;
    then how many series were rejected (``studies --json`` lists each with its reasons)."""
    if not selection:
        return []
    lines = []
    for plane, chosen in selection.get("chosen", {}).items():
        rules = ", ".join(rule["name"] for rule in chosen.get("matched_rules", [])) or "no rule"
        lines.append(f"{plane}: series {chosen.get('series_number')} {chosen.get('description', '')!r} "
                     f"({chosen.get('slices')} slices, score {chosen.get('score'):g}: {rules})")
    for plane, why in selection.get("missing_planes", {}).items():
        lines.append(f"{plane}: none ({why})")
    rejected = selection.get("rejected", [])
    if rejected:
        lines.append(f"rejected: {len(rejected)} series (" + "; ".join(
            f"series {r.get('series_number')} {r.get('description', '')!r}: "
            + (r["reasons"][0]["message"] if r.get("reasons") else "rejected") for r in rejected) + ")")
    return lines


def demo(
    workdir: Annotated[Optional[Path], typer.Option(help="Keep everything in this folder (default: a new temp folder).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 240.0,
    keep: Annotated[bool, typer.Option(help="Leave the node and the PACS running afterwards.")] = False,
) -> None:
    """Run the whole loop locally: a throw-away PACS, the node, three phantom radiograph studies and (with
    models/demo-orthodiffusion) a knee MRI phantom study, their AI results."""
    from node.demo.tour import run_demo

    raise typer.Exit(code=run_demo(workdir, timeout, keep))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(config_app, name="config")
    app.add_typer(db_app, name="db")
    app.command("echo")(echo)
    app.command("studies")(studies)
    app.command("demo")(demo)


