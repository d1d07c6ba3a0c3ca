"""The node's one typed settings object, read from a TOML file and validated with pydantic.

Unknown keys are errors everywhere: a misspelt key must never silently turn a whitelist off.
Every problem is reported with its dotted key path (``peers[1].ae_title``) so ``msknode config check``
can print them all at once.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

CONFIG_ENV_VAR = "MSKNODE_CONFIG"

# PS3.5 6.2: AE titles are 1-16 characters of the default character repertoire, no backslash or control chars;
# leading/trailing spaces are not significant.
AETitle = Annotated[str, Field(min_length=1, max_length=16)]


def _validate_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title must not be blank")
    if len(value) > 16:
        raise ValueError("AE title must be at most 16 characters")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("AE title may only contain printable ASCII characters other than backslash")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeSettings(_Section):
    """[node]: the DICOM listener (Storage and Verification SCP)."""

    ae_title: AETitle = "MSKNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    max_pdu_size: int = Field(0, ge=0, description="0 means unlimited (faster receive)")
    require_called_ae_title: bool = True
    accept_unknown_callers: bool = False
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)

    _check_ae = field_validator("ae_title")(_validate_ae_title)


class StorageSettings(_Section):
    """[storage]: where instances and the index live."""

    database_url: str = "sqlite:///var/msknode.db"
    spool_dir: Path = Path("var/spool")
    min_free_disk_mb: int = Field(1024, ge=0)
    fsync: bool = Field(True, description="fsync every instance and its directory before acknowledging")

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
            raise ValueError("database_url must be a sqlite:/// or postgresql:// URL")
        return value


class PeerSettings(_Section):
    """[[peers]]: a DICOM application entity the node talks to."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(104, ge=1, le=65535)
    may_send: bool = True
    receives_results: bool = False

    _check_ae = field_validator("ae_title")(_validate_ae_title)
    _addresses: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @property
    def addresses(self) -> frozenset[str]:
        """IP addresses the peer's host resolved to at load time."""
        return self._addresses

    def resolve(self) -> None:
        """Resolve ``host`` to its addresses, so that association checks need no DNS at run time."""
        try:
            ipaddress.ip_address(self.host)
            self._addresses = frozenset({str(ipaddress.ip_address(self.host))})
            return
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(self.host, None, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise ValueError(f"host {self.host!r} does not resolve: {exc.strerror}") from exc
        self._addresses = frozenset(str(info[4][0]) for info in infos)


class LoggingSettings(_Section):
    """[logging]"""

    level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    format: str = Field("text", pattern=r"^(text|json)$", description="json: one JSON object per line")


class Settings(_Section):
    """The whole configuration file."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    peers: list[PeerSettings] = Field(default_factory=list)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _unique_peers(self) -> "Settings":
        seen: dict[str, int] = {}
        for index, peer in enumerate(self.peers):
            if peer.name in seen:
                raise ValueError(f"peers[{index}].name: duplicate peer name {peer.name!r}")
            seen[peer.name] = index
        return self

    def peer(self, name: str) -> PeerSettings:
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(f"no peer named {name!r} in the configuration")

    def resolve_peer_hosts(self) -> list[str]:
        """Resolve every peer's host; returns problems as ``peers[i].host: reason`` strings."""
        problems = []
        for index, peer in enumerate(self.peers):
            try:
                peer.resolve()
            except ValueError as exc:
                problems.append(f"peers[{index}].host: {exc}")
        return problems


class ConfigError(Exception):
    """A configuration file that cannot be used; ``problems`` lists each one with its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _format_validation_error(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = item["loc"]
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see docs/configuration.md)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append(f"{_key_path(loc)}: {message}")
    return problems


def parse_settings(data: dict[str, Any], source: str = "<config>", resolve_hosts: bool = True) -> Settings:
    """Validate already-parsed TOML data into :class:`Settings` or raise :class:`ConfigError`."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format_validation_error(exc)) from None
    if resolve_hosts:
        problems = settings.resolve_peer_hosts()
        if problems:
            raise ConfigError(source, problems)
    return settings


def load_settings(path: str | os.PathLike[str] | None = None, resolve_hosts: bool = True) -> Settings:
    """Load the configuration from ``path``, ``$MSKNODE_CONFIG``, or the embedded defaults.

    Relative ``spool_dir`` and SQLite paths are taken relative to the working directory, as a
    systemd unit's ``WorkingDirectory`` or ``make run`` sets it.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR) or None
    if path is None:
        return parse_settings({}, "<defaults>", resolve_hosts)
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    return parse_settings(data, source, resolve_hosts)
