"""CLI: ``msknode users add|list|remove|passwd`` — local dashboard users (no default password exists)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from node.cli.node_commands import ConfigOption, console, err_console, load_or_exit, require_database

if TYPE_CHECKING:
    from node.web.accounts import Accounts

users_app = typer.Typer(help="Dashboard users (roles: admin, viewer).", no_args_is_help=True)

PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of standard input.")
]


@contextmanager
def _accounts(config: Path | None, read_only: bool = False) -> Iterator["Accounts"]:
    """``read_only`` (``users list``): the database is never created or migrated; a clear error instead."""
    from node.web.accounts import Accounts
    from storage.db import Database
    from storage.migrate import upgrade

    settings = load_or_exit(config)
    if read_only:
        require_database(settings)
    else:
        upgrade(settings.storage.database_url)
    database = Database(settings.storage.database_url)
    try:
        yield Accounts(database)
    finally:
        database.dispose()


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@users_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The login name.")],
    role: Annotated[str, typer.Option(help="admin (everything) or viewer (studies only).")] = "viewer",
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Create a user; the password is prompted for (or read with --password-stdin)."""
    with _accounts(config) as accounts:
        try:
            accounts.add_user(name, _read_password(password_stdin), role)
        except ValueError as exc:
            err_console.print(f"cannot add user: {exc}")
            raise typer.Exit(code=2) from None
    console.print(f"user {name} added ({role})")


@users_app.command("list")
def list_users(config: ConfigOption = None) -> None:
    """List users, their role and last login."""
    with _accounts(config, read_only=True) as accounts:
        rows = accounts.users()
    table = Table(title=f"{len(rows)} user(s)")
    for column in ("username", "role", "disabled", "last login"):
        table.add_column(column)
    for user, last_login in rows:
        table.add_row(user.username, user.role, "yes" if user.disabled else "", last_login or "never")
    console.print(table)


@users_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The login name.")], config: ConfigOption = None) -> None:
    """Delete a user and end their sessions."""
    with _accounts(config) as accounts:
        if not accounts.remove_user(name):
            err_console.print(f"no user named {name!r}")
            raise typer.Exit(code=1)
    console.print(f"user {name} removed")


@users_app.command("passwd")
def passwd(
    name: Annotated[str, typer.Argument(help="The login name.")],
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Set a new password; the user's open sessions end."""
    with _accounts(config) as accounts:
        try:
            changed = accounts.set_password(name, _read_password(password_stdin))
        except ValueError as exc:
            err_console.print(f"cannot change password: {exc}")
            raise typer.Exit(code=2) from None
        if not changed:
            err_console.print(f"no user named {name!r}")
            raise typer.Exit(code=1)
    console.print(f"password of {name} changed")
