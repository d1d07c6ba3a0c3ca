"""CLI for the IT admin: ``msknode peers …``, ``msknode queue …`` and ``msknode status``.

Peer changes go to the database overlay (node/peers.py), so the running node applies them to the next
association without a restart and without touching associations in flight; the config file is not
rewritten.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from node.cli.node_commands import ConfigOption, console, err_console, load_or_exit, require_database
from node.settings import Settings

if TYPE_CHECKING:
    from storage.db import Database

peers_app = typer.Typer(help="DICOM peers: the config file's [[peers]] plus changes made here or on the web.",
                        no_args_is_help=True)
queue_app = typer.Typer(help="Failed jobs and undeliverable results (dead letters).", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@dataclass
class _Context:
    settings: Settings
    database: "Database"


@contextmanager
def _open(config: Path | None, read_only: bool = False) -> Iterator[_Context]:
    """Settings and database; ``read_only`` commands never create or migrate it (a clear error instead)."""
    from storage.db import Database
    from storage.migrate import upgrade

    from sqlalchemy.exc import SQLAlchemyError

    settings = load_or_exit(config)
    if read_only:
        require_database(settings)
    try:
        if not read_only:
            upgrade(settings.storage.database_url)
    except SQLAlchemyError as exc:
        raise _fail(f"database unavailable ({settings.storage.database_url.split(':', 1)[0]}): "
                    f"{type(exc.orig or exc).__name__}", code=1) from None
    database = Database(settings.storage.database_url)
    try:
        yield _Context(settings, database)
    finally:
        database.dispose()


def _actor() -> str:
    """Who made a change, for ``peer_overrides.updated_by``."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name (container without passwd entry)
        return "cli"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(message)
    return typer.Exit(code=code)


# -- peers ---------------------------------------------------------------------------------------
@peers_app.command("list")
def peers_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the effective peers and where each definition comes from (config or database)."""
    from node.peers import PeerDirectory

    with _open(config, read_only=True) as ctx:
        peers = PeerDirectory(ctx.settings, ctx.database).list()
    if as_json:
        typer.echo(json.dumps([peer.model_dump(mode="json") for peer in peers], indent=2))
        return
    table = Table(title=f"{len(peers)} peer(s)")
    for column in ("name", "ae_title", "host", "port", "protocol", "may_send", "receives_results", "priority",
                   "source"):
        table.add_column(column)
    for peer in peers:
        protocol = f"dicomweb {peer.url}" if peer.protocol == "dicomweb" else "dimse"
        if peer.stow_token_sha256:
            protocol += " (+STOW-RS in)"
        table.add_row(peer.name, peer.ae_title, peer.host, str(peer.port), protocol, "yes" if peer.may_send else "no",
                      "yes" if peer.receives_results else "no", peer.priority, peer.source)
    console.print(table)


AeTitleOption = Annotated[Optional[str], typer.Option("--ae-title", help="The peer's AE title.")]
HostOption = Annotated[Optional[str], typer.Option("--host", help="Host name or address (must resolve).")]
PortOption = Annotated[Optional[int], typer.Option("--port", help="The peer's DICOM port.")]
ReceivesOption = Annotated[
    Optional[bool], typer.Option("--receives-results/--no-receives-results", help="Send AI results to this peer.")
]
MaySendOption = Annotated[Optional[bool], typer.Option("--may-send/--no-may-send", help="May it store to the node?")]
PriorityOption = Annotated[Optional[str], typer.Option("--priority", help="routine | high | urgent")]
SettleOption = Annotated[Optional[float], typer.Option("--settle-seconds", help="Overrides pipeline.settle_seconds.")]
TlsOption = Annotated[Optional[bool], typer.Option("--tls/--no-tls", help="Send results over DICOM TLS.")]
ProtocolOption = Annotated[Optional[str], typer.Option("--protocol", help="How results go to it: dimse | dicomweb.")]
UrlOption = Annotated[Optional[str], typer.Option("--url", help="DICOMweb base URL (results: STOW-RS to <url>/studies).")]
AuthOption = Annotated[Optional[str], typer.Option("--auth", help="DICOMweb auth to the peer: none | bearer | basic.")]
UsernameOption = Annotated[Optional[str], typer.Option("--username", help="User name for --auth basic.")]
SecretFileOption = Annotated[Optional[Path], typer.Option("--secret-file", help="File holding the bearer token or password.")]
CaFileOption = Annotated[Optional[Path], typer.Option("--ca-file", help="PEM CA bundle for the peer's https url.")]
VerifyTlsOption = Annotated[Optional[bool], typer.Option("--verify-tls/--no-verify-tls", help="Verify the https url's certificate.")]
StowTokenOption = Annotated[Optional[str], typer.Option(
    "--stow-token-sha256", help="SHA-256 of the token the peer presents to our STOW-RS (see `msknode peers token`).")]


def _fields(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@peers_app.command("add")
def peers_add(
    name: Annotated[str, typer.Argument(help="A new peer name ([A-Za-z0-9_.-]).")],
    ae_title: AeTitleOption = None,
    host: HostOption = None,
    port: PortOption = None,
    receives_results: ReceivesOption = None,
    may_send: MaySendOption = None,
    priority: PriorityOption = None,
    settle_seconds: SettleOption = None,
    tls: TlsOption = None,
    protocol: ProtocolOption = None,
    url: UrlOption = None,
    auth: AuthOption = None,
    username: UsernameOption = None,
    secret_file: SecretFileOption = None,
    ca_file: CaFileOption = None,
    verify_tls: VerifyTlsOption = None,
    stow_token_sha256: StowTokenOption = None,
    config: ConfigOption = None,
) -> None:
    """Add a peer; the running node accepts it on its next association."""
    from node.peers import PeerDirectory, PeerError, peer_from_fields

    with _open(config) as ctx:
        try:
            peer = peer_from_fields(_fields(name=name, ae_title=ae_title, host=host, port=port,
                                            receives_results=receives_results, may_send=may_send,
                                            priority=priority, settle_seconds=settle_seconds, tls=tls,
                                            protocol=protocol, url=url, auth=auth, username=username,
                                            secret_file=secret_file, ca_file=ca_file, verify_tls=verify_tls,
                                            stow_token_sha256=stow_token_sha256))
            saved = PeerDirectory(ctx.settings, ctx.database).add(peer, _actor())
        except PeerError as exc:
            raise _fail(f"cannot add peer {name!r}: {exc}") from None
    console.print(f"added peer {saved.name} ({saved.ae_title}@{saved.host}:{saved.port})")


@peers_app.command("edit")
def peers_edit(
    name: Annotated[str, typer.Argument(help="The peer to change.")],
    ae_title: AeTitleOption = None,
    host: HostOption = None,
    port: PortOption = None,
    receives_results: ReceivesOption = None,
    may_send: MaySendOption = None,
    priority: PriorityOption = None,
    settle_seconds: SettleOption = None,
    tls: TlsOption = None,
    protocol: ProtocolOption = None,
    url: UrlOption = None,
    auth: AuthOption = None,
    username: UsernameOption = None,
    secret_file: SecretFileOption = None,
    ca_file: CaFileOption = None,
    verify_tls: VerifyTlsOption = None,
    stow_token_sha256: StowTokenOption = None,
    config: ConfigOption = None,
) -> None:
    """Change some fields of a peer (the others are kept); applies to the next association."""
    from node.peers import PeerDirectory, PeerError, peer_from_fields

    with _open(config) as ctx:
        directory = PeerDirectory(ctx.settings, ctx.database)
        current = directory.get(name)
        if current is None:
            raise _fail(f"no peer named {name!r}")
        fields = current.model_dump(exclude={"source"})
        fields.update(_fields(ae_title=ae_title, host=host, port=port, receives_results=receives_results,
                              may_send=may_send, priority=priority, settle_seconds=settle_seconds, tls=tls,
                              protocol=protocol, url=url, auth=auth, username=username, secret_file=secret_file,
                              ca_file=ca_file, verify_tls=verify_tls, stow_token_sha256=stow_token_sha256))
        try:
            saved = directory.update(name, peer_from_fields(fields), _actor())
        except PeerError as exc:
            raise _fail(f"cannot change peer {name!r}: {exc}") from None
    console.print(f"changed peer {saved.name} ({saved.ae_title}@{saved.host}:{saved.port})")


@peers_app.command("token")
def peers_token(
    name: Annotated[str, typer.Argument(help="The peer that will push to the node by STOW-RS.")],
    config: ConfigOption = None,
) -> None:
    """Issue a new STOW-RS bearer token for a peer: its SHA-256 is stored (the old token stops working), the token
    is printed once. For a peer defined only in the config file, put the printed hash in its stow_token_sha256."""
    from node.dicomweb.auth import hash_token, new_token
    from node.peers import PeerDirectory, PeerError, peer_from_fields

    token = new_token()
    with _open(config) as ctx:
        directory = PeerDirectory(ctx.settings, ctx.database)
        current = directory.get(name)
        if current is None:
            raise _fail(f"no peer named {name!r}")
        fields = current.model_dump(exclude={"source"})
        fields["stow_token_sha256"] = hash_token(token)
        try:
            directory.update(name, peer_from_fields(fields), _actor())
        except PeerError as exc:
            raise _fail(f"cannot change peer {name!r}: {exc}") from None
    console.print(f"STOW-RS token for peer {name} (shown once; the node keeps only its SHA-256):")
    typer.echo(token)
    console.print(f"stow_token_sha256 = \"{hash_token(token)}\"")


@peers_app.command("remove")
def peers_remove(
    name: Annotated[str, typer.Argument(help="The peer to remove.")],
    config: ConfigOption = None,
) -> None:
    """Remove a peer: new associations from it are rejected; one already open completes."""
    from node.peers import PeerDirectory, PeerError

    with _open(config) as ctx:
        try:
            PeerDirectory(ctx.settings, ctx.database).remove(name, _actor())
        except PeerError as exc:
            raise _fail(f"cannot remove peer {name!r}: {exc}") from None
    console.print(f"removed peer {name}")


@peers_app.command("echo")
def peers_echo(
    name: Annotated[str, typer.Argument(help="The peer to C-ECHO.")],
    config: ConfigOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
) -> None:
    """C-ECHO a peer (as the node's AE title, over TLS if the peer uses it) and print the round trip."""
    from node.cli.node_commands import echo

    echo(name, config, timeout)


# -- queue ---------------------------------------------------------------------------------------
def _parse_item_id(item_id: str) -> tuple[str, int]:
    kind, _, number = item_id.partition(":")
    if kind not in ("job", "out", "note") or not number.isdigit():
        raise _fail(f"item id {item_id!r}: expected job:N (a failed job), out:N (a dead letter) or note:N "
                    "(a notification given up); see `msknode queue list`")
    return kind, int(number)


@queue_app.command("list")
def queue_list(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    state: Annotated[Optional[str], typer.Option(help="Only this state: failed (jobs) or dead (deliveries).")] = None,
) -> None:
    """Failed jobs (job:N), dead letters (out:N) and notifications given up (note:N), newest first."""
    from storage.status import attention_items

    if state not in (None, "failed", "dead"):
        raise _fail(f"--state: expected failed or dead, not {state!r}")
    with _open(config, read_only=True) as ctx:
        items = [item for item in attention_items(ctx.database) if state is None or item["state"] == state]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    table = Table(title=f"{len(items)} item(s) needing attention")
    for column in ("id", "kind", "state", "study", "destination", "attempts", "reason"):
        table.add_column(column)
    for item in items:
        table.add_row(item["id"], item["kind"], item["state"], item["study_instance_uid"],
                      item["destination"] or "", str(item["attempts"]), (item["reason"] or "")[:120])
    console.print(table)


@queue_app.command("retry")
def queue_retry(
    item_id: Annotated[str, typer.Argument(metavar="ID", help="job:N, out:N or note:N from `msknode queue list`.")],
    config: ConfigOption = None,
) -> None:
    """Queue a failed job again, or send a dead letter or notification again (attempts start from zero)."""
    from storage.notifications import Notifications
    from storage.outbox import Outbox
    from storage.queue import JobQueue

    kind, number = _parse_item_id(item_id)
    with _open(config) as ctx:
        queue = {"job": JobQueue, "out": Outbox, "note": Notifications}[kind](ctx.database)
        done = queue.retry(number)
    if not done:
        what = {"job": "failed job", "out": "dead letter", "note": "dead notification"}[kind]
        raise _fail(f"{item_id}: no {what} with that id", code=1)
    console.print(f"{item_id} queued again")


@queue_app.command("discard")
def queue_discard(
    item_id: Annotated[str, typer.Argument(metavar="ID", help="out:N or note:N from `msknode queue list`.")],
    config: ConfigOption = None,
) -> None:
    """Give up on a dead (or pending) delivery or notification for good; it is kept, marked discarded."""
    from storage.notifications import Notifications
    from storage.outbox import Outbox

    kind, number = _parse_item_id(item_id)
    if kind == "job":
        raise _fail(f"{item_id}: a failed job is already final (nothing is sent for it); "
                    "only deliveries (out:N) and notifications (note:N) can be discarded")
    with _open(config) as ctx:
        done = (Outbox if kind == "out" else Notifications)(ctx.database).discard(number)
    if not done:
        raise _fail(f"{item_id}: no dead or pending {'delivery' if kind == 'out' else 'notification'} "
                    "with that id", code=1)
    console.print(f"{item_id} discarded")


# -- status --------------------------------------------------------------------------------------
def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Roles alive, queue depths, oldest pending work, dead letters, free disk and the engine."""
    from node.runtime.status import collect_status

    with _open(config, read_only=True) as ctx:
        report = collect_status(ctx.settings, ctx.database)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    node = report["node"]
    console.print(f"[bold]{node['ae_title']}[/] on {node['host']}:{node['port']} — database {report['database']}")
    roles = Table(title="roles")
    for column in ("process", "role", "alive", "last seen", "detail"):
        roles.add_column(column)
    for row in report["processes"]:
        detail = row["detail"].get("engine") or {k: v for k, v in row["detail"].items() if k != "engine"}
        roles.add_row(row["owner"], row["role"], "[green]yes[/]" if row["alive"] else "[red]no[/]",
                      f"{row['seen_seconds_ago']:.0f} s ago", ", ".join(f"{k}={v}" for k, v in detail.items()
                                                                     if k in ("backend", "precision", "device", "model",
                                                                              "listening", "engine_loaded")))
    missing = [role for role in report["roles_configured"] if role not in report["roles_alive"]]
    console.print(roles)
    if missing:
        console.print(f"[red]configured here but not alive:[/] {', '.join(missing)}")
    queues = Table(title="queues")
    for column in ("queue", "by state", "oldest waiting"):
        queues.add_column(column)
    for queue, states in report["queues"].items():
        queues.add_row(queue, ", ".join(f"{s}={n}" for s, n in sorted(states.items())) or "empty",
                       _age(report["oldest_pending_seconds"][queue]))
    console.print(queues)
    disk = report["disk"]
    console.print(
        f"dead letters: {report['dead_letters']}   failed jobs: {report['failed_jobs']}   "
        f"spool free: {disk['free_bytes'] / 2**30:.1f} GiB (watermark {disk['min_free_bytes'] / 2**20:.0f} MiB)"
        + ("" if disk["above_watermark"] else " [red]BELOW WATERMARK[/]")
    )
    engine = report["engine"]
    if engine:
        for item in report.get("engines") or [engine]:  # one line per configured model
            console.print(f"model {item.get('configured_name', '')}: {item.get('family', '')} {item.get('name', '')} "
                          f"{item.get('version', '')} ({str(item.get('encoder_sha256', ''))[:12]}) — "
                          f"{item.get('backend')} {item.get('precision')} on {item.get('device')} — {item.get('model')}"
                          f" — heads {', '.join(item.get('reported_heads', item.get('heads', []))) or 'none'}")
    else:
        console.print(f"engine: no live worker has it loaded (configured: {report['engine_configured']['backend']})")


def register(app: typer.Typer) -> None:
    app.add_typer(peers_app, name="peers")
    app.add_typer(queue_app, name="queue")
    app.command("status")(status)
