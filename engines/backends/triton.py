"""Triton Inference Server backend: the worker's preprocessed batches go to a shared server, tensors come back.

Tensors in, tensors out, as every backend: the family still draws the error map's masks on the host (seeded) and
computes the map from the reconstructions, so a map is the same whether the graphs ran in-process or on Triton.
Several workers (on several machines) share one server, whose dynamic batcher merges their requests.

A model served by Triton is two Triton models named after a *base* (``[engine] triton_model``, by default the
loaded model's name):

- ``<base>_embed``: the ``encoder_full`` ONNX graph, ``pixels`` [B, 3, H, W] -> ``cls`` [B, D] (and, for a family
  with named features such as DINOv3, its other outputs);
- ``<base>_reconstruct``: masked encoder + decoder in one batch-first graph, ``pixels`` [B, 3, H, W],
  ``ids_keep`` [B, P, keep], ``ids_restore`` [B, P, L] -> ``pred`` [B, P, L, p*p*C] (only with a decoder).

:func:`write_model` writes one such model (``config.pbtxt`` with the input/output contract read from the ONNX
file, ``max_batch_size``, ``dynamic_batching``, and ``parameters`` naming the encoder hash) in the layout NVIDIA's
Triton images load as is (``platform: "onnxruntime_onnx"``, or ``"tensorrt_plan"`` for a plan). At connection
the backend reads each served model's config back and refuses a server whose encoder hash is not the loaded
model's (the results name the local weights' hash).

A server that cannot be reached, is not ready, has not (yet) loaded the model, or times out raises
:class:`~engines.backends.base.BackendUnavailable`: transient, the worker waits and retries the same batch (the
masks are seeded, so a retry gives the same results). Anything else (a refused input, a contract mismatch) is a
:class:`TritonError`.

``tritonclient`` is imported when a client is built (the ``triton`` extra), so this module imports without it.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engines.backends.base import BackendUnavailable
from engines.backends.tensorrt_backend import (
    DEFAULT_CACHE_DIR, PlanCache, PlanKey, build_plan, current_gpu, file_sha256, import_tensorrt,
)

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
EMBED, RECONSTRUCT = "embed", "reconstruct"
#: ONNX graph exported for each Triton model
GRAPH_FOR = {EMBED: "encoder_full", RECONSTRUCT: "reconstruct"}
PARAM_HASH = "msknode_encoder_sha256"
PARAM_GRAPH = "msknode_graph"
PARAM_PRECISION = "msknode_precision"
PARAM_MODEL = "msknode_model"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: gRPC status codes that mean "the server is not there (yet)", not "your request is wrong"
TRANSIENT_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "RESOURCE_EXHAUSTED", "UNKNOWN")
#: Triton's messages for a model that is loading, unloading or not (yet) in the repository
TRANSIENT_MESSAGES = ("not ready", "is not found", "unknown model", "unavailable", "failed to connect",
                      "connection", "socket closed", "broken pipe", "timed out", "timeout", "deadline",
                      "stub process", "server is shutting down", "exit")

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32"}
TRITON_TO_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}
WIRE_TYPE = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64",
             np.dtype(np.int32): "INT32"}


class TritonError(RuntimeError):
    """The server answered, but the request or the served model is wrong (not transient)."""


def model_names(base: str) -> dict[str, str]:
    """The Triton model names of a base name: ``{"embed": "<base>_embed", "reconstruct": "<base>_reconstruct"}``."""
    if not NAME_PATTERN.match(base):
        raise ValueError(f"Triton model name {base!r}: use letters, digits, '_', '.', '-' (at most 100)")
    return {EMBED: f"{base}_{EMBED}", RECONSTRUCT: f"{base}_{RECONSTRUCT}"}


# ---------------------------------------------------------------------------------------------- the repository
def onnx_io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) of an ONNX file as (name, Triton type, full shape with -1 for a dynamic axis)."""
    import onnx  # light enough, but only the exporter needs it

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))  # fills what the exporter left symbolic

    def describe(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            if tensor.elem_type not in ONNX_TO_TRITON:
                raise ValueError(f"{path.name}: tensor {value.name} has an ONNX type Triton models here do not use")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
            out.append((value.name, ONNX_TO_TRITON[tensor.elem_type], dims))
        return out

    initializers = {init.name for init in model.graph.initializer}
    return describe(v for v in model.graph.input if v.name not in initializers), describe(model.graph.output)


def _tensor_block(kind: str, tensors: list[tuple[str, str, list[int]]]) -> list[str]:
    lines = [f"{kind} ["]
    for index, (name, dtype, dims) in enumerate(tensors):
        comma = "," if index < len(tensors) - 1 else ""
        lines.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims[1:])} ] }}{comma}')
    lines.append("]")
    return lines


def model_config_text(
    name: str,
    platform: str,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    max_batch_size: int,
    queue_delay_us: int,
    parameters: Mapping[str, str],
) -> str:
    """``config.pbtxt`` (Triton's text protobuf ``ModelConfig``): batch dimension implicit, dynamic batching on."""
    for tensor_name, _, dims in inputs + outputs:
        if not dims or dims[0] != -1:
            raise ValueError(f"{name}: tensor {tensor_name} has no dynamic first (batch) axis: {dims}")
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {int(max_batch_size)}"]
    lines += _tensor_block("input", inputs) + _tensor_block("output", outputs)
    lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {int(queue_delay_us)}", "}"]
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_model(
    repository: Path,
    name: str,
    model_file: Path,
    *,
    onnx_file: Path | None = None,
    max_batch_size: int = 16,
    queue_delay_us: int = 2000,
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and ``1/model.onnx`` (or ``1/model.plan``); returns the folder.

    The input/output contract is read from ``onnx_file`` (``model_file`` itself for ONNX; the ONNX a plan was
    built from for TensorRT).
    """
    is_plan = model_file.suffix == ".plan"
    platform = "tensorrt_plan" if is_plan else "onnxruntime_onnx"
    inputs, outputs = onnx_io(onnx_file or model_file)
    folder = repository / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, folder / "1" / ("model.plan" if is_plan else "model.onnx"))
    text = model_config_text(name, platform, inputs, outputs, max_batch_size, queue_delay_us, parameters or {})
    (folder / "config.pbtxt").write_text(text)
    return folder


def plan_shapes(onnx_file: Path, max_batch_size: int, passes: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """TensorRT profile for a Triton plan: batch 1 .. ``max_batch_size``, other dynamic axes (passes) fixed."""
    inputs, _ = onnx_io(onnx_file)
    opt = max(1, max_batch_size // 2)
    shapes = {}
    for name, _, dims in inputs:
        rest = tuple(passes if d == -1 else d for d in dims[1:])
        shapes[name] = ((1, *rest), (opt, *rest), (max_batch_size, *rest))
    return shapes


def build_plan_for_triton(onnx_file: Path, plan_file: Path, max_batch_size: int, passes: int,
                          precision: str = "fp16") -> Path:
    """A TensorRT plan of ``onnx_file`` for a Triton ``tensorrt_plan`` model (needs TensorRT and a CUDA GPU; a plan
    only runs on the GPU model and TensorRT version it was built with, so build it on (or like) the server)."""
    trt = import_tensorrt()
    gpu, capability = current_gpu()
    key = PlanKey(file_sha256(onnx_file), gpu, capability, trt.__version__, precision, f"triton:{max_batch_size}")
    logger = trt.Logger(trt.Logger.WARNING)
    timing = PlanCache(DEFAULT_CACHE_DIR).timing_cache_path(key)
    plan = build_plan(trt, onnx_file, plan_shapes(onnx_file, max_batch_size, passes), precision, timing, logger)
    plan_file.write_bytes(plan)
    return plan_file


def export_repository(
    model: Any,
    repository: Path,
    base: str,
    *,
    max_batch_size: int = 16,
    queue_delay_us: int = 2000,
    passes: int = 10,
    tensorrt: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write the Triton models of one loaded model (an :class:`engines.family.ExportsGraphs`): ``<base>_embed``
    and, with a decoder, ``<base>_reconstruct`` as ONNX (``onnxruntime_onnx``); with ``tensorrt`` also
    ``<base>-trt_embed`` / ``<base>-trt_reconstruct`` as fp16 TensorRT plans. Returns the model folders."""
    roles = [EMBED] + ([RECONSTRUCT] if model.supports_error_map else [])
    names = model_names(base)
    parameters = {PARAM_HASH: model.encoder_hash, PARAM_MODEL: f"{model.name} {model.version}"}
    written = []
    with tempfile.TemporaryDirectory(prefix="msknode-triton-") as scratch:
        for role in roles:
            graph = GRAPH_FOR[role]
            if progress:
                progress(f"exporting {names[role]} (ONNX)")
            onnx_file = model.export_onnx(Path(scratch), graphs=(graph,), passes=passes).paths[graph]
            written.append(write_model(
                repository, names[role], onnx_file, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                parameters={**parameters, PARAM_GRAPH: graph, PARAM_PRECISION: "fp32"},
            ))
            if tensorrt:
                if progress:
                    progress(f"building {model_names(base + '-trt')[role]} (TensorRT)")
                plan = build_plan_for_triton(onnx_file, Path(scratch) / f"{graph}.plan", max_batch_size, passes)
                written.append(write_model(
                    repository, model_names(base + "-trt")[role], plan, onnx_file=onnx_file,
                    max_batch_size=max_batch_size, queue_delay_us=queue_delay_us,
                    parameters={**parameters, PARAM_GRAPH: graph, PARAM_PRECISION: "fp16"},
                ))
    return written


# ---------------------------------------------------------------------------------------------- the client
def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return True
    status = ""
    try:
        status = str(exc.status() or "")  # type: ignore[attr-defined]  # tritonclient's InferenceServerException
    except Exception:
        status = ""
    if any(code in status for code in TRANSIENT_GRPC):
        return True
    if status in ("400", "404") and "not found" not in str(exc).lower() and "not ready" not in str(exc).lower():
        return False
    if status.isdigit() and int(status) >= 500:
        return True
    text = str(exc).lower()
    return any(message in text for message in TRANSIENT_MESSAGES)


def _parameters(config: Mapping[str, Any]) -> dict[str, str]:
    found = config.get("parameters") or {}
    return {key: str((value or {}).get("string_value", "")) for key, value in found.items()}


class TritonBackend:
    """Runs the model's graphs on a Triton Inference Server over gRPC or HTTP (``name`` ``triton``).

    ``expect_hash``: the loaded model's encoder hash; a served model whose ``msknode_encoder_sha256`` parameter
    differs is refused. ``client_factory(url, protocol, timeout)`` builds the tritonclient client (tests may pass
    their own).
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        base: str,
        *,
        protocol: str = "grpc",
        timeout_seconds: float = 60.0,
        expect_hash: str | None = None,
        needs_reconstruct: bool = True,
        client_factory: Callable[[str, str, float], Any] | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"Triton protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.timeout = float(timeout_seconds)
        self.models = model_names(base)
        if not needs_reconstruct:
            self.models.pop(RECONSTRUCT)
        self.expect_hash = expect_hash
        self.device = f"triton {protocol}://{url}"
        self.precision = "fp32"  # until the served config says otherwise
        self._factory = client_factory or make_client
        self._client: Any = None
        self._checked: dict[str, dict[str, Any]] = {}  # model -> its config, read when the server was last ready
        self.server_version = ""

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._client is None:
            self._client = self._factory(self.url, self.protocol, self.timeout)
        return self._client

    def _drop(self) -> None:
        """Forget the client and what was checked: a restarted server may serve other models."""
        client, self._client = self._client, None
        self._checked.clear()
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def _call(self, what: str, function: Callable[[Any], Any]) -> Any:
        try:
            return function(self._connect())
        except (TritonError, BackendUnavailable):
            raise
        except Exception as exc:
            if _is_transient(exc):
                self._drop()
                raise BackendUnavailable(f"Triton server {self.url} ({self.protocol}) unavailable during {what}: "
                                         f"{str(exc)[:300]}") from exc
            raise TritonError(f"Triton server {self.url}: {what} failed: {str(exc)[:500]}") from exc

    def _config(self, model: str) -> dict[str, Any]:
        """The served model's config (read once per server start) after checking its contract."""
        if model in self._checked:
            return self._checked[model]

        def read(client: Any) -> dict[str, Any]:
            if not client.is_server_ready(**self._kw()):
                raise BackendUnavailable(f"Triton server {self.url} is not ready")
            if not client.is_model_ready(model, **self._kw()):
                raise BackendUnavailable(f"Triton server {self.url}: model {model!r} is not ready (loading, or not "
                                         "in its repository)")
            if self.protocol == "grpc":
                config = client.get_model_config(model, as_json=True, **self._kw())["config"]
            else:
                config = client.get_model_config(model)
            if not self.server_version:
                metadata = client.get_server_metadata(**({"as_json": True} if self.protocol == "grpc" else {}))
                self.server_version = str(metadata.get("version", ""))
            return config

        try:
            config = self._call(f"reading the config of {model}", read)
        except BackendUnavailable:
            self._drop()
            raise
        parameters = _parameters(config)
        served = parameters.get(PARAM_HASH)
        if self.expect_hash and served != self.expect_hash:
            raise TritonError(
                f"Triton model {model!r} at {self.url} serves encoder {str(served)[:16] or '(no hash)'}..., the loaded "
                f"model is {self.expect_hash[:16]}...: export the repository again (msknode model export-triton) "
                "or point [engine] triton_model at the right model"
            )
        self.precision = parameters.get(PARAM_PRECISION, self.precision)
        config["max_batch_size"] = int(config.get("max_batch_size", 0) or 0)
        self._checked[model] = config
        return config

    def _kw(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def ready(self) -> bool:
        """Server and every model ready, and their contract checked; False (never raises) while unavailable."""
        try:
            for model in self.models.values():
                self._config(model)
        except BackendUnavailable as exc:
            log.debug("%s", exc)
            return False
        return True

    def check(self) -> None:
        """Read and check every model's config now; raises :class:`BackendUnavailable` or :class:`TritonError`."""
        for model in self.models.values():
            self._config(model)

    # -- inference -------------------------------------------------------------------------
    def _infer(self, role: str, arrays: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        model = self.models.get(role)
        if model is None:
            raise RuntimeError("this model has no decoder: it can give embeddings but not error maps")
        config = self._config(model)
        names = outputs or [out["name"] for out in config.get("output", [])]
        batch = next(iter(arrays.values())).shape[0]
        limit = config["max_batch_size"] or batch
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, batch, limit):
            chunk = {key: np.ascontiguousarray(value[start : start + limit]) for key, value in arrays.items()}
            result = self._call(f"inference on {model}", lambda client: self._send(client, model, chunk, names))
            for name in names:
                parts[name].append(result[name])
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def _send(self, client: Any, model: str, arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        module = client_module(self.protocol)
        inputs = []
        for key, value in arrays.items():
            tensor = module.InferInput(key, list(value.shape), WIRE_TYPE[value.dtype])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        requested = [module.InferRequestedOutput(name) for name in names]
        if self.protocol == "grpc":
            response = client.infer(model, inputs, outputs=requested, client_timeout=self.timeout)
        else:
            response = client.infer(model, inputs, outputs=requested)
        out = {}
        for name in names:
            value = response.as_numpy(name)
            if value is None:
                raise TritonError(f"{model} returned no {name!r}")
            out[name] = value
        return out

    def embed(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self._infer(EMBED, {"pixels": _numpy(x)}, ["cls"])["cls"].astype(np.float32))

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Every output of the ``<base>_embed`` model by name (DINOv3: ``cls`` and ``patch_mean``), fp32."""
        out = self._infer(EMBED, {"pixels": _numpy(x)})
        return {name: torch.from_numpy(value.astype(np.float32)) for name, value in out.items()}

    def reconstruct(self, x: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        """``ids_keep`` [B*P, keep] / ``ids_restore`` [B*P, L] image-major, as every backend; sent batch-first."""
        batch = x.shape[0]
        rows = ids_keep.shape[0]
        if rows % batch:
            raise ValueError(f"ids_keep has {rows} rows, not a multiple of the {batch} images")
        passes = rows // batch
        arrays = {
            "pixels": _numpy(x),
            "ids_keep": ids_keep.reshape(batch, passes, -1).cpu().numpy().astype(np.int64),
            "ids_restore": ids_restore.reshape(batch, passes, -1).cpu().numpy().astype(np.int64),
        }
        pred = self._infer(RECONSTRUCT, arrays, ["pred"])["pred"].astype(np.float32)
        return torch.from_numpy(pred.reshape(rows, pred.shape[2], pred.shape[3]))

    def describe(self) -> dict[str, str]:
        described = {"backend": self.name, "precision": self.precision, "device": self.device,
                     "triton_models": ", ".join(self.models.values())}
        if self.server_version:
            described["triton_server"] = self.server_version
        return described

    def close(self) -> None:
        self._drop()


def _numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def client_module(protocol: str) -> Any:
    """``tritonclient.grpc`` or ``tritonclient.http``, or an ImportError naming the extra."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module  # type: ignore[import-not-found]
        else:
            import tritonclient.http as module  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError("the Triton backend needs tritonclient: pip install 'msknode[triton]'") from exc
    return module


def make_client(url: str, protocol: str, timeout: float) -> Any:
    """A tritonclient client for ``url`` (``host:port``); gRPC messages up to 2 GiB (a reconstruction is large)."""
    module = client_module(protocol)
    if protocol == "grpc":
        return module.InferenceServerClient(url=url)
    return module.InferenceServerClient(url=url, connection_timeout=timeout, network_timeout=timeout)


def wait_until_ready(backend: TritonBackend, timeout: float, interval: float = 0.5) -> bool:
    """Poll :meth:`TritonBackend.ready` for up to ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if backend.ready():
            return True
        time.sleep(interval)
    return backend.ready()
