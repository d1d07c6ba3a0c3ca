"""Linear heads on a model's embedding: our format (3e) and Hugging Face classifiers.

Format 3e is two files side by side: ``<name>.safetensors`` (``weight`` [K, D], ``bias`` [K]) and ``<name>.json``::

    {"name": "fracture", "labels": ["fracture"], "activation": "sigmoid",
     "provenance": {...free-form: data, date, trainer...}, "encoder_sha256": "<hex>", "format": "msknode-head/1"}

A head is only meaningful on the encoder it was trained on, so loading it against an encoder with another
``encoder_hash`` is refused (:class:`HeadEncoderMismatch`).

Optional ``"pooling"`` says which feature the head reads: ``"cls"`` (the default, and what a file without the key
means: every head written before the key existed) is the CLS token after the final norm; ``"patch_mean"`` is the
mean of the normed patch tokens (a family that offers it, e.g. DINOv3, says so with ``poolings``). It is written
only when it is not ``"cls"``, so existing head files read and re-write byte for byte.

Optional ``"calibration"`` (written by ``msknode model calibrate --labels``): ``{"method": "temperature" | "platt",
"scale": s, "offset": o, ...how it was fitted}``; :meth:`LinearHead.predict` then returns
``activation(s * logits + o)`` (:class:`engines.calibration.LogitCalibration`). Absent: the probabilities as fitted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engines.calibration import LOGIT_CALIBRATION_METHODS, LogitCalibration

HEAD_FORMAT = "msknode-head/1"
ACTIVATIONS = ("sigmoid", "softmax", "identity")
POOLINGS = ("cls", "patch_mean")  # which embedding a head reads; "cls" unless the head file says otherwise
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HeadEncoderMismatch(ValueError):
    """A head trained on other encoder weights than the ones it is asked to run on."""


class LinearHead(nn.Module):
    """``activation(W @ embedding + b)``: a linear probe with its labels and provenance."""

    def __init__(
        self,
        name: str,
        in_features: int,
        labels: list[str],
        activation: str = "softmax",
        encoder_sha256: str | None = None,
        provenance: dict[str, Any] | None = None,
        pooling: str = "cls",
        calibration: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not _SAFE_NAME.match(name):
            raise ValueError(f"head name {name!r} must be a plain file name (letters, digits, _ . -)")
        if not labels:
            raise ValueError("a head needs at least one label")
        self.name = name
        self.labels = list(labels)
        self.activation = activation
        self.encoder_sha256 = encoder_sha256
        self.provenance = dict(provenance or {})
        self.pooling = pooling
        self.linear = nn.Linear(in_features, len(labels))
        self.calibration: dict[str, Any] | None = None
        self.logit_calibration: LogitCalibration | None = None
        if calibration is not None:
            self.set_calibration(calibration)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    def set_calibration(self, calibration: dict[str, Any] | None) -> None:
        """Attach (or, with None, remove) a logit calibration: ``method``, ``scale``, ``offset`` plus free-form
        notes on how it was fitted (kept in the head file). Refused where the method does not fit the activation."""
        if calibration is None:
            self.calibration = self.logit_calibration = None
            return
        expected = LOGIT_CALIBRATION_METHODS.get(self.activation)
        if expected is None or (self.activation == "sigmoid" and len(self.labels) != 1):
            raise ValueError(f"head {self.name!r}: only softmax and single-label sigmoid heads take a calibration")
        try:
            logit = LogitCalibration(str(calibration["method"]), float(calibration["scale"]),
                                     float(calibration.get("offset", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"head {self.name!r}: invalid calibration {calibration!r}: {exc}") from exc
        if logit.method != expected:
            raise ValueError(f"head {self.name!r}: a {self.activation} head is calibrated by {expected}, "
                             f"not {logit.method}")
        self.calibration = dict(calibration)
        self.logit_calibration = logit

    def describe(self) -> dict[str, Any]:
        """What ``msknode model info`` shows of the head: labels, activation, and its calibration when it has one."""
        shown: dict[str, Any] = {"labels": self.labels, "activation": self.activation}
        if self.logit_calibration is not None:
            c = self.logit_calibration
            shown["calibration"] = (f"temperature {c.temperature:.3g}" if c.method == "temperature"
                                    else f"Platt scale {c.scale:.3g}, offset {c.offset:+.3g}")
        return shown

    def forward(self, embedding: Tensor) -> Tensor:
        """Logits [B, K] as fitted (before any calibration)."""
        return self.linear(embedding.to(self.linear.weight.dtype))

    def activate(self, logits: Tensor) -> Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        return logits

    def predict(self, embedding: Tensor) -> Tensor:
        """Probabilities (or values, for ``identity``) [B, K], calibrated when the head carries a calibration."""
        logits = self.forward(embedding)
        if self.logit_calibration is not None:
            logits = self.logit_calibration.apply(logits)
        return self.activate(logits)

    def check_encoder(self, encoder_sha256: str) -> None:
        if self.encoder_sha256 is not None and self.encoder_sha256 != encoder_sha256:
            raise HeadEncoderMismatch(
                f"head {self.name!r} was trained on encoder {self.encoder_sha256[:12]}..., "
                f"not on this encoder {encoder_sha256[:12]}...; retrain it for these weights"
            )

    def metadata(self) -> dict[str, Any]:
        meta = {
            "format": HEAD_FORMAT,
            "name": self.name,
            "labels": self.labels,
            "activation": self.activation,
            "in_features": self.in_features,
            "provenance": self.provenance,
            "encoder_sha256": self.encoder_sha256,
        }
        if self.pooling != "cls":
            meta["pooling"] = self.pooling
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        return meta


def save_head(head: LinearHead, folder: str | Path) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.safetensors`` and ``<folder>/<name>.json``; returns both paths."""
    if not head.encoder_sha256:
        raise ValueError(f"head {head.name!r} has no encoder_sha256: record the encoder it was trained on")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{head.name}.safetensors"
    meta = folder / f"{head.name}.json"
    tensors = {
        "weight": head.linear.weight.detach().float().contiguous().cpu(),
        "bias": head.linear.bias.detach().float().contiguous().cpu(),
    }
    save_file(tensors, str(weights), metadata={"format": HEAD_FORMAT, "name": head.name})
    meta.write_text(json.dumps(head.metadata(), indent=2) + "\n")
    return weights, meta


def load_head(path: str | Path, encoder_sha256: str | None = None) -> LinearHead:
    """Load a 3e head from its ``.json``, its ``.safetensors`` or the common stem; refuse a foreign encoder."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    meta_path, weights_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"a head needs both {meta_path.name} and {weights_path.name} in {stem.parent}")
    meta = json.loads(meta_path.read_text())
    for key in ("name", "labels", "activation", "encoder_sha256"):
        if key not in meta:
            raise ValueError(f"{meta_path}: missing {key!r}")
    tensors = load_file(str(weights_path))
    weight, bias = tensors["weight"], tensors.get("bias")
    if weight.shape[0] != len(meta["labels"]):
        raise ValueError(f"{weights_path}: {weight.shape[0]} outputs but {len(meta['labels'])} labels")
    head = LinearHead(
        meta["name"],
        weight.shape[1],
        meta["labels"],
        meta["activation"],
        encoder_sha256=meta["encoder_sha256"],
        provenance=meta.get("provenance"),
        pooling=meta.get("pooling", "cls"),
        calibration=meta.get("calibration"),
    )
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    if encoder_sha256 is not None:
        head.check_encoder(encoder_sha256)
    return head.eval()


def load_heads_dir(folder: str | Path, encoder_sha256: str | None = None) -> dict[str, LinearHead]:
    """Every 3e head in ``folder`` (``*.json`` with a matching ``.safetensors``), by name."""
    folder = Path(folder)
    heads: dict[str, LinearHead] = {}
    for meta_path in sorted(folder.glob("*.json")):
        if meta_path.with_suffix(".safetensors").is_file():
            head = load_head(meta_path, encoder_sha256)
            heads[head.name] = head
    return heads


def head_from_classifier(classifier: dict[str, Any], encoder_sha256: str, source: str) -> LinearHead:
    """A HF ``ViTForImageClassification`` classifier (CLS after the final norm) as a :class:`LinearHead`."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(classifier["name"])) or "classifier"
    if not name[0].isalnum():
        name = f"h{name}"
    weight: Tensor = classifier["weight"]
    head = LinearHead(
        name,
        weight.shape[1],
        classifier["labels"],
        classifier["activation"],
        encoder_sha256=encoder_sha256,
        provenance={"source": source, "format": "hf-vit-classification"},
    )
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.copy_(classifier["bias"])
    return head.eval()
