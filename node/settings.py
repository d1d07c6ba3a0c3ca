"""The node's one typed settings object, read from a TOML file and validated with pydantic.

Unknown keys are errors everywhere: a misspelt key must never silently turn a whitelist off.
Every problem is reported with its dotted key path (``peers[1].ae_title``) so ``msknode config check``
can print them all at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from node.pipeline.triage_rules import check_expression

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


class TlsSettings(_Section):
    """[node.tls] / [sender.tls]: DICOM TLS (PS3.15 B.1, the BCP 195 profile) with PEM files."""

    enabled: bool = False
    certificate: Path | None = Field(None, description="PEM certificate presented to the other side")
    private_key: Path | None = Field(None, description="PEM private key of that certificate (not world-readable)")
    ca_certificates: Path | None = Field(None, description="PEM bundle used to verify the other side")
    require_client_certificate: bool = Field(False, description="SCP only: mutual TLS")
    verify_peer: bool = Field(True, description="SCU only: verify the destination's certificate against ca_certificates")

    @model_validator(mode="after")
    def _key_with_certificate(self) -> "TlsSettings":
        # The SCP always needs both (checked in NodeSettings); an SCU may go without a client certificate.
        if (self.certificate is None) != (self.private_key is None):
            missing = "private_key" if self.private_key is None else "certificate"
            raise ValueError(f"{missing}: certificate and private_key are given together")
        return self


class NodeSettings(_Section):
    """[node]: the DICOM listener (Storage and Verification SCP)."""

    ae_title: AETitle = "MSKNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    max_pdu_size: int = Field(0, ge=0, description="0 means unlimited (faster receive)")
    require_called_ae_title: bool = True
    accept_unknown_callers: bool = False
    dns_refresh_seconds: float = Field(
        60.0, gt=0, description="peer host names are re-resolved this often, in the background (never per request)"
    )
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    _check_ae = field_validator("ae_title")(_validate_ae_title)

    @model_validator(mode="after")
    def _tls_needs_certificate(self) -> "NodeSettings":
        if self.tls.enabled and self.tls.certificate is None:
            raise ValueError("tls.certificate: the TLS listener needs a certificate and private_key")
        if self.tls.require_client_certificate and self.tls.ca_certificates is None:
            raise ValueError("tls.ca_certificates: needed to verify client certificates (require_client_certificate)")
        return self


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


PRIORITIES = ("routine", "high", "urgent")
Priority = Literal["routine", "high", "urgent"]


def backoff_delay(schedule: Sequence[float], attempts: int) -> float:
    """The delay before the next attempt of a ``backoff_seconds`` schedule (attempts >= 1; the last value repeats)."""
    return float(schedule[min(max(attempts, 1), len(schedule)) - 1])


def priority_rank(priority: str) -> int:
    """routine 0 < high 1 < urgent 2 (stored as an integer so the queue can order by it)."""
    return PRIORITIES.index(priority)


class PeerSettings(_Section):
    """[[peers]]: a DICOM application entity the node talks to."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: int = Field(104, ge=1, le=65535)
    may_send: bool = True
    receives_results: bool = False
    settle_seconds: float | None = Field(None, ge=0, description="overrides pipeline.settle_seconds for this sender")
    priority: Priority = Field("routine", description="initial priority of studies this peer sends")
    tls: bool = Field(False, description="results to this peer go over DICOM TLS ([sender.tls])")
    # -- DICOMweb (docs/configuration.md, [[peers]]) --------------------------------------------------------
    protocol: Literal["dimse", "dicomweb"] = Field(
        "dimse", description="how results go to this peer: DIMSE C-STORE or DICOMweb STOW-RS (to url)")
    url: str | None = Field(None, validate_default=True,
                            description="base URL of the peer's DICOMweb service; results are POSTed to <url>/studies")
    auth: Literal["none", "bearer", "basic"] = Field("none", description="how the node authenticates to url")
    username: str | None = Field(None, validate_default=True, max_length=256, description="auth = basic: user name")
    secret_file: Path | None = Field(None, validate_default=True,
                                     description="file holding the bearer token (auth = bearer) or password (basic)")
    ca_file: Path | None = Field(None, description="PEM CA bundle that url's certificate must chain to (https; "
                                                   "default: the system's)")
    verify_tls: bool = Field(True, description="verify url's certificate and host name (https); false only for a "
                                               "closed test network")
    stow_token_sha256: str | None = Field(
        None, description="SHA-256 (hex) of the bearer token this peer presents to the node's STOW-RS endpoint")

    _check_ae = field_validator("ae_title")(_validate_ae_title)
    _addresses: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: Any) -> str | None:
        if value is None or not value.strip():
            if info.data.get("protocol") == "dicomweb":
                raise ValueError('needed with protocol = "dicomweb" (e.g. "https://pacs.example.org/dicom-web")')
            return None
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", value):
            raise ValueError(f"{value!r}: expected an http:// or https:// URL without query or fragment")
        return value

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None, info: Any) -> str | None:
        if info.data.get("auth") == "basic" and not (value or "").strip():
            raise ValueError('needed with auth = "basic"')
        if value is not None and ":" in value:
            raise ValueError("must not contain ':' (HTTP basic authentication)")
        return value

    @field_validator("secret_file")
    @classmethod
    def _secret_file(cls, value: Path | None, info: Any) -> Path | None:
        if info.data.get("auth") in ("bearer", "basic") and value is None:
            raise ValueError(f'needed with auth = "{info.data.get("auth")}" (a file holding the token or password)')
        return value

    @field_validator("stow_token_sha256")
    @classmethod
    def _token_hash(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("expected the 64 hex digits of a SHA-256 (msknode peers token NAME makes one)")
        return value

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


class DicomwebSettings(_Section):
    """[dicomweb]: the STOW-RS endpoint (the ``dicomweb`` role, node/dicomweb/)."""

    host: str = Field("0.0.0.0", description="address the dicomweb role listens on")
    port: int = Field(8090, ge=1, le=65535)
    base_path: str = Field("/dicom-web", pattern=r"^(/[A-Za-z0-9._~-]+)*$",
                           description="URL path of the service root; STOW-RS is POST <base_path>/studies")
    max_request_mb: int = Field(4096, ge=1, description="larger request bodies are refused with 413")
    max_concurrent_requests: int = Field(10, ge=1, le=1000, description="more at once are answered 503")
    check_peer_host: bool = Field(True, description="the request must come from one of the peer's host addresses")
    timeout_seconds: float = Field(60.0, gt=0, description="a client silent this long mid-request is dropped")
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @model_validator(mode="after")
    def _tls_needs_certificate(self) -> "DicomwebSettings":
        if self.tls.enabled and self.tls.certificate is None:
            raise ValueError("tls.certificate: HTTPS needs a certificate and private_key")
        if self.tls.require_client_certificate and self.tls.ca_certificates is None:
            raise ValueError("tls.ca_certificates: needed to verify client certificates (require_client_certificate)")
        return self


class PipelineSettings(_Section):
    """[pipeline]: when a study is complete, and how jobs are run."""

    settle_seconds: float = Field(10.0, ge=0)
    force_complete_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20)
    job_timeout_seconds: float = Field(600.0, gt=0)
    lease_seconds: float = Field(60.0, gt=1)
    poll_seconds: float = Field(1.0, gt=0)
    workers: int = Field(1, ge=1, le=32)
    max_instances_per_job: int = Field(
        2000, ge=1, le=1_000_000,
        description="a study revision with more stored instances is not analysed (reason recorded); only counted, "
                    "no header is read",
    )
    max_frames_per_job: int = Field(
        64, ge=1, le=100_000,
        description="a study revision whose eligible instances hold more frames (NumberOfFrames, from the headers) "
                    "is not analysed (reason recorded) and no pixel data is read; bounds the worker's memory",
    )
    roles: list[Literal["receiver", "scheduler", "worker", "sender", "web", "dicomweb"]] = Field(
        default_factory=lambda: ["receiver", "scheduler", "worker", "sender", "web"],
        description="the roles `msknode serve` runs on this machine",
    )


DEFAULT_BODY_PARTS = [
    "HAND", "WRIST", "FOREARM", "ELBOW", "ARM", "HUMERUS", "SHOULDER", "CLAVICLE", "SCAPULA",
    "HIP", "PELVIS", "FEMUR", "THIGH", "KNEE", "LEG", "TIBIA", "FIBULA", "ANKLE", "FOOT", "HEEL",
    "FINGER", "TOE", "EXTREMITY", "LOWER LIMB", "UPPER LIMB", "LOWERLIMB", "UPPERLIMB",
]


class EligibilitySettings(_Section):
    """[eligibility]: which images the model is for. Ineligible images are recorded with the reason."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    sop_classes: list[str] = Field(
        default_factory=lambda: [
            "1.2.840.10008.5.1.4.1.1.1",  # CR
            "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
            "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
        ]
    )
    photometric_interpretations: list[str] = Field(default_factory=lambda: ["MONOCHROME1", "MONOCHROME2"])
    body_parts: list[str] = Field(default_factory=lambda: list(DEFAULT_BODY_PARTS))
    allow_unknown_body_part: bool = True
    excluded_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    peers: list[str] = Field(default_factory=list, description="peer names whose studies are analysed; empty = all")
    max_frames_per_instance: int = Field(
        16, ge=1, le=100_000,
        description="an instance with more frames (NumberOfFrames) is ineligible: a multi-frame object sent by mistake",
    )


# PS3.4 B.5: the SOP classes that hold results rather than acquired images (SR, SEG, SC).
DEFAULT_RESULT_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR (ours)
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (ours)
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
]
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class IntakeSettings(_Section):
    """[intake]: received objects that are results (our own, or another AI product's): stored and acknowledged,
    never analysed, never a new study revision (node/dicom/provenance.py). Our own SR/SC are always recognised."""

    result_sop_classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RESULT_SOP_CLASSES),
        description="SOP classes that may hold results; only these are checked against the rules",
    )
    ai_manufacturers: list[str] = Field(
        default_factory=list, description="Manufacturer values of other AI products (case-insensitive, whole value)",
    )
    ai_series_descriptions: list[str] = Field(
        default_factory=list, description="Series Description prefixes of other AI products' results (case-insensitive)",
    )

    @field_validator("result_sop_classes")
    @classmethod
    def _uids(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            if not _UID.match(value.strip()) or len(value.strip()) > 64:
                raise ValueError(f"item {index}: {value!r} is not a UID (digits and dots, at most 64 characters)")
        return [value.strip() for value in values]

    @field_validator("ai_manufacturers", "ai_series_descriptions")
    @classmethod
    def _not_blank(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            if not value.strip():
                raise ValueError(f"item {index}: must not be blank")
            if len(value.strip()) > 64:
                raise ValueError(f"item {index}: at most 64 characters (LO)")
        return [value.strip() for value in values]


class EngineSettings(_Section):
    """[engine]: the model and how it runs."""

    model: Path = Path("models/demo-mae")
    backend: Literal["auto", "cpu", "cuda", "tensorrt", "triton"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    batch_size: int = Field(8, ge=1, le=256)
    passes: int = Field(10, ge=1, le=64)
    seed: int = Field(0, ge=0)
    voi: Literal["auto", "window", "lut", "none"] = "auto"
    threads: int = Field(
        0, ge=0, le=256,
        description="torch CPU threads of the worker; 0 = torch's default (one per core). Small models (the demo "
                    "ones) are fastest on 1: their many tiny operations gain nothing from a second thread and, on a "
                    "busy machine, lose most of their time in OpenMP's spin-waits",
    )
    idle_priority: bool = Field(
        True,
        description="run inference under Linux SCHED_IDLE: it only gets CPU time that no other process wants, so "
                    "C-STORE responses never wait for it; false = use `nice` instead",
    )
    nice: int = Field(
        10, ge=0, le=19,
        description="CPU scheduling niceness of the worker process (Linux nice) when idle_priority is false or "
                    "unavailable: inference yields the CPU to the receiver; 0 = same priority",
    )
    # backend = "triton": the graphs run on a shared Triton Inference Server (docs/engine.md)
    triton_url: str = Field("localhost:8001", description="host:port of the Triton server (gRPC 8001, HTTP 8000)")
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_model: str = Field(
        "", description="base name of the served models (<name>_embed, <name>_reconstruct); empty = the model's name"
    )
    triton_timeout_seconds: float = Field(60.0, gt=0, le=3600, description="per request; past it the server counts "
                                          "as unavailable and the batch is retried")
    triton_retry_seconds: float = Field(5.0, gt=0, le=600, description="wait between tries while the server is "
                                        "unavailable (jobs wait; no attempt is counted)")

    @field_validator("triton_url")
    @classmethod
    def _triton_url(cls, value: str) -> str:
        host, sep, port = value.strip().rpartition(":")
        if "://" in value or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port (no scheme), e.g. triton.example.org:8001, got {value!r}")
        return value.strip()

    @field_validator("triton_model")
    @classmethod
    def _triton_model(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value):
            raise ValueError(f"{value!r}: letters, digits, '_', '.', '-' only (at most 100), as Triton model names")
        return value

    @model_validator(mode="after")
    def _triton_precision(self) -> "EngineSettings":
        if self.backend == "triton" and self.precision != "auto":
            raise ValueError(f"precision = {self.precision!r} with backend = \"triton\": the served model decides the "
                             "precision (export-triton); leave engine.precision at \"auto\"")
        return self


MODEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class ModelEntry(_Section):
    """[[models]]: one model the worker loads, what it applies to and which heads it reports.

    Every image admitted by ``[eligibility]`` gets each model whose filters it passes (decided from its header).
    An empty filter list means any value; values are compared case-insensitively.
    """

    name: str = Field(description="what triage rules call it (<name>.<head>); a plain identifier, unique")
    path: Path = Field(description="the model folder or file, as [engine] model")
    modalities: list[str] = Field(default_factory=list, description="Modality (0008,0060); empty = any")
    body_parts: list[str] = Field(default_factory=list, description="Body Part Examined (0018,0015); empty = any")
    view_positions: list[str] = Field(default_factory=list,
                                      description="View Position (0018,5101); empty = any (absent never excludes)")
    lateralities: list[str] = Field(default_factory=list, description="Laterality / Image Laterality (R, L, B, U); "
                                                                      "empty = any (absent never excludes)")
    sop_classes: list[str] = Field(default_factory=list, description="SOP Class UID; empty = any")
    heads: list[str] | None = Field(None, description="heads reported and offered to triage; absent = all the "
                                                      "model's heads")
    regions_from: str | None = Field(None, description="for a region-guided classifier (a folder with "
                                     "head_layout.json): the [[models]] name of the error-map model whose "
                                     "high-error regions it crops; absent = whole image only")
    max_regions: int = Field(3, ge=1, le=8, description="regions_from: high-error regions cropped per image")
    region_context: float = Field(2.0, ge=1.0, le=8.0, description="regions_from: crop side = this x the region's")
    region_min_fraction: float = Field(0.25, gt=0.0, le=1.0,
                                       description="regions_from: smallest crop side, share of the image's short side")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not MODEL_NAME.match(value):
            raise ValueError(f"{value!r}: letters, digits and '_' only, not starting with a digit (at most 64): "
                             "triage rules name outputs as <name>.<head>")
        return value

    @field_validator("sop_classes")
    @classmethod
    def _uids(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            if not _UID.match(value.strip()):
                raise ValueError(f"item {index}: {value!r} is not a UID (digits and dots)")
        return [value.strip() for value in values]

    @field_validator("modalities", "body_parts", "view_positions", "lateralities")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            if not value.strip():
                raise ValueError(f"item {index}: blank value")
        return [value.strip().upper() for value in values]


def default_model_name(path: Path) -> str:
    """The configured name of the one model of ``[engine] model``: its folder or file name as an identifier."""
    stem = Path(path).stem if Path(path).suffix else Path(path).name
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "model"
    return ("m_" + name if name[0].isdigit() else name)[:64]


class ResultsSettings(_Section):
    """[results]: the objects sent back."""

    report_not_analysed: bool = False
    series_number_base: int = Field(9000, ge=1, le=2147483000)
    manufacturer: str = "msknode"
    send_secondary_capture: bool = True
    #: Long side of the radiograph in the error-map secondary capture, at most (px). The map is computed at 224 px,
    #: so a larger overlay adds only radiograph detail the PACS already holds; 600 lets a windowed 5 MP JPEG 2000
    #: image decode once at 1/4 size for the model and the overlay (docs/preprocessing.md, docs/benchmarks.md).
    overlay_max_size: int = Field(600, ge=224, le=2048)  # 2048: the SC's own limit (render.py)


class SenderSettings(_Section):
    """[sender]: delivery of results to every peer with receives_results."""

    backoff_seconds: list[float] = Field(default_factory=lambda: [30.0, 120.0, 600.0, 3600.0])
    max_age_hours: float = Field(48.0, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)
    max_concurrent_per_destination: int = Field(2, ge=1, le=16)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("backoff_seconds")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("backoff_seconds needs at least one positive delay")
        return value


class RetentionSettings(_Section):
    """[retention]: what is deleted, and when. Undelivered work is never deleted."""

    days: float = Field(7.0, gt=0)
    emergency_cleanup: bool = True


class TriageRule(_Section):
    """[[triage.rules]]: ``when`` is a small comparison expression over result values, never eval'd."""

    name: str = Field(min_length=1, max_length=64)
    when: str = Field(min_length=1, max_length=500)
    priority: Priority

    @field_validator("when")
    @classmethod
    def _safe_expression(cls, value: str) -> str:
        check_expression(value)
        return value


class TriageSettings(_Section):
    """[triage]: rules over the study's results, first match wins; no match gives ``default``."""

    default: Priority = "routine"
    rules: list[TriageRule] = Field(default_factory=list)


class WebhookSettings(_Section):
    """[[notifications.webhooks]]: a JSON POST per announced study."""

    url: str = Field(pattern=r"^https?://")
    secret_file: Path | None = Field(None, description="file holding the HMAC-SHA256 signing secret")
    timeout_seconds: float = Field(10.0, gt=0)


class SmtpSettings(_Section):
    """[notifications.smtp]: optional e-mail."""

    host: str = Field(min_length=1)
    port: int = Field(25, ge=1, le=65535)
    from_address: str = Field(min_length=3)
    to: list[str] = Field(min_length=1)
    starttls: bool = Field(False, description="STARTTLS, verifying the server's certificate and host name")
    ca_file: Path | None = Field(None, description="PEM CA bundle to trust for STARTTLS (default: the system's)")
    username: str | None = None
    password_file: Path | None = None
    timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _login_complete(self) -> "SmtpSettings":
        if (self.username is None) != (self.password_file is None):
            missing = "password_file" if self.password_file is None else "username"
            raise ValueError(f"{missing}: username and password_file are given together (or neither)")
        return self


class NotificationSettings(_Section):
    """[notifications]: announce studies at or above ``min_priority``."""

    min_priority: Priority = "urgent"
    include_phi: bool = Field(False, description="add patient name/ID to notifications (off: UIDs and accession only)")
    dashboard_url: str = Field("http://127.0.0.1:8080", description="base of the link put in each notification")
    backoff_seconds: list[float] = Field(default_factory=lambda: [10.0, 60.0, 300.0, 1800.0])
    max_age_hours: float = Field(24.0, gt=0)
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    smtp: SmtpSettings | None = None


class WebSettings(_Section):
    """[web]: the dashboard, REST, /healthz and /metrics (the ``web`` role)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    secret_key_file: Path = Field(Path("var/web-secret"), description="created (mode 0600) if missing")
    session_hours: float = Field(12.0, gt=0)
    cookie_secure: bool = Field(False, description="set when served behind HTTPS")
    login_max_failures: int = Field(
        5, ge=1, le=1000,
        description="failed logins per user name within login_window_minutes before further tries are refused "
                    "(429) until the oldest failure leaves the window; 4 times as many per client address",
    )
    login_window_minutes: int = Field(15, ge=1, le=1440)


def _check_pattern(value: str | None) -> str | None:
    """A regular expression (Python ``re``, searched case-insensitively), compiled once here to fail early."""
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
    return value


MriPlane = Literal["sagittal", "coronal", "axial"]


class SeriesRule(_Section):
    """[[mri.rules]]: one preference among an MR study's series; every condition given must hold for the rule
    to add its ``score`` (negative: avoid). Conditions left out are not checked."""

    name: str = Field(min_length=1, max_length=64)
    score: float = Field(ge=-1000, le=1000)
    planes: list[MriPlane] = Field(default_factory=list,
                                   description="the rule applies only to these planes; empty = all")
    series_description: str | None = Field(None, description="regular expression searched in Series Description")
    scanning_sequence: list[str] = Field(default_factory=list, description="any of these Scanning Sequence values "
                                         "(SE, IR, GR, EP, RM)")
    sequence_variant: list[str] = Field(default_factory=list, description="any of these Sequence Variant values "
                                        "(SK, MTC, SS, TRSS, SP, MP, OSP, NONE)")
    fat_saturated: bool | None = Field(None, description="fat suppression as detected (Scan Options FS, Spectrally "
                                       "Selected Suppression FAT, or mri.fat_saturation_description)")
    image_type: list[str] = Field(default_factory=list, description="all of these Image Type values present")
    repetition_time_ms: tuple[float, float] | None = Field(None, description="[min, max] Repetition Time")
    echo_time_ms: tuple[float, float] | None = Field(None, description="[min, max] Echo Time")
    slices: tuple[int, int] | None = Field(None, description="[min, max] number of slices")

    _check_description = field_validator("series_description")(_check_pattern)

    @field_validator("repetition_time_ms", "echo_time_ms", "slices")
    @classmethod
    def _range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"[min, max] with min <= max, got {list(value)}")
        return value

    @field_validator("scanning_sequence", "sequence_variant", "image_type")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]


def _default_series_rules() -> list[SeriesRule]:
    """Prefer fat-saturated PD / T2 (what knee MRI models are trained on); avoid T1 and short-TR series."""
    return [
        SeriesRule(name="fat-saturated", score=4, fat_saturated=True),
        SeriesRule(name="proton-density", score=3, series_description=r"\b(PD|PDW|proton)"),
        SeriesRule(name="t2-weighted", score=2, series_description=r"\bT2"),
        SeriesRule(name="long-tr", score=1, repetition_time_ms=(1500, 20000)),
        SeriesRule(name="t1-weighted", score=-10, series_description=r"\bT1"),
        SeriesRule(name="short-tr", score=-5, repetition_time_ms=(0, 900)),
    ]


class MriSettings(_Section):
    """[mri]: which series of an MR study feed a 3-D model (one per plane), chosen by rules, reasons recorded."""

    planes: list[MriPlane] = Field(default_factory=lambda: ["sagittal", "coronal", "axial"], min_length=1,
                                   description="planes to choose a series for")
    plane_tolerance_degrees: float = Field(20.0, gt=0, le=45, description="how far a slice normal may tilt from "
                                           "the patient axis of its plane before the series counts as oblique")
    modalities: list[str] = Field(default_factory=lambda: ["MR"], min_length=1)
    min_slices: int = Field(10, ge=2, le=10000, description="fewer slices: not a volume worth analysing")
    min_score: float = Field(1.0, description="a series whose rules add up to less is never chosen (wrong contrast)")
    excluded_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"],
                                            description="a series with any of these Image Type values is rejected")
    excluded_series_descriptions: list[str] = Field(
        default_factory=lambda: [r"\b(loc|locali[sz]er|scout|survey|3.?plane|calibration)\b"],
        description="regular expressions searched in Series Description; a match rejects the series",
    )
    fat_saturation_description: str = Field(
        r"(\bFS\b|FAT.?SAT|\bSPAIR\b|\bSPIR\b|\bSTIR\b|\bFS[_ -]|[_ -]FS\b|\bDIXON.?W)",
        description="Series Description pattern that counts as fat suppression when the header has no Scan Options FS",
    )
    rules: list[SeriesRule] = Field(default_factory=_default_series_rules)

    _check_fat = field_validator("fat_saturation_description")(_check_pattern)

    @field_validator("excluded_series_descriptions")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"item {index}: {value!r} is not a valid regular expression: {exc}") from None
        return values

    @field_validator("modalities", "excluded_image_types")
    @classmethod
    def _codes(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values]

    @field_validator("planes")
    @classmethod
    def _planes_once(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("each plane at most once")
        return values

    @field_validator("rules")
    @classmethod
    def _rule_names_unique(cls, rules: list[SeriesRule]) -> list[SeriesRule]:
        seen: dict[str, int] = {}
        for index, rule in enumerate(rules):
            if rule.name in seen:
                raise ValueError(f"[{index}].name: duplicate rule name {rule.name!r} (also [{seen[rule.name]}])")
            seen[rule.name] = index
        return rules


class LoggingSettings(_Section):
    """[logging]"""

    level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    format: str = Field("text", pattern=r"^(text|json)$", description="json: one JSON object per line")


class Settings(_Section):
    """The whole configuration file."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    peers: list[PeerSettings] = Field(default_factory=list)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    eligibility: EligibilitySettings = Field(default_factory=EligibilitySettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    models: list[ModelEntry] = Field(default_factory=list, description="several models; empty = [engine] model")
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    sender: SenderSettings = Field(default_factory=SenderSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    dicomweb: DicomwebSettings = Field(default_factory=DicomwebSettings)
    mri: MriSettings = Field(default_factory=MriSettings)

    @model_validator(mode="after")
    def _unique_peers(self) -> "Settings":
        seen: dict[str, int] = {}
        for index, peer in enumerate(self.peers):
            if peer.name in seen:
                raise ValueError(f"peers[{index}].name: duplicate peer name {peer.name!r}")
            seen[peer.name] = index
            if peer.tls and not self.sender.tls.enabled:
                raise ValueError(f"peers[{index}].tls: needs [sender.tls] enabled (with ca_certificates)")
        return self

    @model_validator(mode="after")
    def _models(self) -> "Settings":
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.models):
            if entry.name in seen:
                raise ValueError(f"models[{index}].name: duplicate model name {entry.name!r} (also models[{seen[entry.name]}])")
            seen[entry.name] = index
        if self.models and "model" in self.engine.model_fields_set:
            raise ValueError("engine.model: give either [engine] model (one model) or [[models]] (several), not both")
        for index, entry in enumerate(self.models):
            if entry.regions_from is not None and (entry.regions_from == entry.name or entry.regions_from not in seen):
                raise ValueError(f"models[{index}].regions_from: {entry.regions_from!r} names no other [[models]] "
                                 f"entry (have: {', '.join(n for n in seen if n != entry.name) or 'none'})")
        return self

    @property
    def model_entries(self) -> list[ModelEntry]:
        """The configured models in order: ``[[models]]``, or the one ``[engine] model`` (applies to every eligible
        image, all its heads) when that list is empty."""
        if self.models:
            return list(self.models)
        return [ModelEntry(name=default_model_name(self.engine.model), path=self.engine.model)]

    def peer_by_ae_title(self, ae_title: str | None) -> PeerSettings | None:
        for peer in self.peers:
            if ae_title is not None and peer.ae_title == ae_title.strip():
                return peer
        return None

    def settle_seconds_for(self, calling_ae_title: str | None) -> float:
        peer = self.peer_by_ae_title(calling_ae_title)
        if peer is not None and peer.settle_seconds is not None:
            return peer.settle_seconds
        return self.pipeline.settle_seconds

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
