"""TensorRT backend: plans built from our ONNX graphs, cached on disk, run on torch CUDA buffers.

Written against TensorRT 10's documented Python API (``Builder`` -> ``create_network`` -> ``OnnxParser`` ->
``create_builder_config`` with ``BuilderFlag.FP16``, an optimisation profile per dynamic input, a persistent
timing cache -> ``build_serialized_network`` -> ``Runtime.deserialize_cuda_engine`` -> ``set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``).

**Never run in this project's workplace**: TensorRT cannot be installed here and no GPU machine has it. What is
tested is the plan-cache keying, cache hits/misses, the rebuild after a failed deserialisation and the backend
selection (with a stand-in ``tensorrt`` module); the ONNX graphs it consumes are verified with onnxruntime.

Plans are not portable across GPUs or TensorRT versions, so the cache key is ONNX sha256 + GPU name + compute
capability + TensorRT version + precision + profile; a plan that fails to deserialise is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("MSKNODE_ENGINE_CACHE", Path.home() / ".cache" / "msknode" / "engines"))
WORKSPACE_BYTES = 4 << 30


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or an ImportError that says how to get it (the ``tensorrt`` extra)."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - the normal case in this workplace
        raise ImportError("TensorRT is not installed: pip install 'msknode[tensorrt]' on the GPU machine") from exc
    return tensorrt


@dataclass(frozen=True)
class BatchProfile:
    """Optimisation profile for the worker's batch sizes: images per batch and masked passes per image."""

    min_images: int = 1
    opt_images: int = 4
    max_images: int = 16
    passes: int = 10


@dataclass(frozen=True)
class PlanKey:
    """Everything a serialised plan depends on."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profile: str

    def file_name(self, graph: str) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]
        return f"{graph}-{digest}.plan"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_gpu() -> tuple[str, str]:
    """(name, "major.minor") of the current CUDA device."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, f"{props.major}.{props.minor}"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


class PlanCache:
    """Plans on disk keyed by :class:`PlanKey`; one timing cache per GPU + TensorRT version."""

    def __init__(self, directory: str | Path = DEFAULT_CACHE_DIR) -> None:
        self.directory = Path(directory)

    def plan_path(self, key: PlanKey, graph: str) -> Path:
        return self.directory / key.file_name(graph)

    def timing_cache_path(self, key: PlanKey) -> Path:
        safe_gpu = "".join(ch if ch.isalnum() else "_" for ch in key.gpu_name)
        return self.directory / f"timing-{safe_gpu}-sm{key.compute_capability}-trt{key.tensorrt_version}.cache"

    def get_engine(
        self,
        trt: ModuleType,
        runtime: Any,
        key: PlanKey,
        graph: str,
        build: Callable[[], bytes],
    ) -> Any:
        """Deserialise the cached plan, or build (and store) one when it is missing or does not deserialise."""
        path = self.plan_path(key, graph)
        if path.is_file():
            engine = None
            try:
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
            except Exception as exc:  # TensorRT raises or returns None depending on the failure
                log.warning("cached plan %s failed to deserialise (%s)", path.name, exc)
            if engine is not None:
                log.info("TensorRT plan cache hit: %s", path.name)
                return engine
            log.warning("rebuilding TensorRT plan %s", path.name)
            path.unlink(missing_ok=True)
        plan = build()
        _atomic_write(path, bytes(plan))
        engine = runtime.deserialize_cuda_engine(bytes(plan))
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialise the plan it just built for {graph}")
        return engine


def build_plan(
    trt: ModuleType,
    onnx_path: Path,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    precision: str,
    timing_cache_path: Path,
    logger: Any,
) -> bytes:
    """Parse ONNX, set FP16 + one optimisation profile + the timing cache, build a serialised plan."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (min_shape, opt_shape, max_shape) in shapes.items():
        profile.set_shape(name, min_shape, opt_shape, max_shape)
    config.add_optimization_profile(profile)
    cached = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cached)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for {onnx_path.name}")
    _atomic_write(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def tensorrt_from_export(
    export_key: list[Any],
    graphs: tuple[str, ...],
    export: Callable[[Path, BatchProfile], None],
    shapes: Callable[[str, BatchProfile], dict[str, tuple[tuple[int, ...], ...]]],
    precision: str = "fp16",
    cache_dir: Path | None = None,
    profile: BatchProfile | None = None,
    trt: ModuleType | None = None,
    progress: Callable[[str], None] | None = None,
) -> TensorRTBackend:
    """The TensorRT plumbing every family shares: ONNX export cached on disk, then one plan per graph.

    The family supplies only what differs: ``export_key`` (JSON-able; everything its ONNX files depend on, e.g.
    the encoder hash and input size), its ``graphs``, ``export(onnx_dir, profile)`` writing ``<graph>.onnx``
    files there, and ``shapes(graph, profile)`` (input -> (min, opt, max)). The ONNX folder is
    ``<cache>/onnx/<sha256(export_key)[:24]>``; the plans are keyed by :class:`PlanKey`.
    """
    trt = trt or import_tensorrt()
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT needs a CUDA device")
    directory = Path(cache_dir or DEFAULT_CACHE_DIR)
    profile = profile or BatchProfile()
    key = hashlib.sha256(json.dumps(export_key).encode()).hexdigest()
    onnx_dir = directory / "onnx" / key[:24]
    if not all((onnx_dir / f"{g}.onnx").is_file() for g in graphs):
        if progress:
            progress("exporting ONNX")
        export(onnx_dir, profile)
    inputs = {g: (onnx_dir / f"{g}.onnx", shapes(g, profile)) for g in graphs}
    return TensorRTBackend.from_onnx(
        inputs, precision=precision, cache_dir=directory, profile=profile, trt=trt, progress=progress
    )


class EngineRunner:
    """One deserialised engine and its execution context, fed with torch CUDA tensors."""

    def __init__(self, trt: ModuleType, engine: Any) -> None:
        self.trt = trt
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        mapping = {
            trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32
        }
        return mapping[self.engine.get_tensor_dtype(name)]

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        stream = torch.cuda.current_stream()
        keep_alive = []
        for name in self.inputs:
            tensor = inputs[name].to("cuda", self._torch_dtype(name)).contiguous()
            keep_alive.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outputs


class TensorRTBackend:
    """Runs the three exported graphs as TensorRT plans (FP16 by default; fp32 inputs and outputs)."""

    name = "tensorrt"

    def __init__(
        self, runners: dict[str, EngineRunner], precision: str, keys: dict[str, PlanKey], profile: BatchProfile
    ) -> None:
        self.runners = runners
        self.precision = precision
        self.device = "cuda"
        self.keys = keys
        self.profile = profile

    @classmethod
    def from_onnx(
        cls,
        graphs: dict[str, tuple[Path, dict[str, tuple[tuple[int, ...], ...]]]],
        precision: str = "fp16",
        cache_dir: Path | None = None,
        profile: BatchProfile | None = None,
        trt: ModuleType | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> TensorRTBackend:
        """Load or build one plan per graph: ``graphs`` maps a graph name to (ONNX file, input -> (min, opt, max)).

        The family exports the ONNX files and computes the shapes for ``profile`` (``engines.mae.backend``).
        """
        trt = trt or import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT needs a CUDA device")
        cache = PlanCache(cache_dir or DEFAULT_CACHE_DIR)
        profile = profile or BatchProfile()
        gpu_name, capability = current_gpu()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        runners, keys = {}, {}
        for graph, (onnx_path, shapes) in graphs.items():
            key = PlanKey(file_sha256(onnx_path), gpu_name, capability, trt.__version__, precision, repr(profile))

            def build(onnx_path: Path = onnx_path, shapes=shapes, key: PlanKey = key, graph: str = graph) -> bytes:
                if progress:
                    progress(f"building TensorRT plan for {graph}")
                return build_plan(trt, onnx_path, shapes, precision, cache.timing_cache_path(key), logger)

            runners[graph] = EngineRunner(trt, cache.get_engine(trt, runtime, key, graph, build))
            keys[graph] = key
        return cls(runners, precision, keys, profile)

    def embed(self, x: Tensor) -> Tensor:
        return self.runners["encoder_full"](pixels=x)["cls"].float()

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Every output of the ``encoder_full`` graph by name (DINOv3: ``cls`` and ``patch_mean``), fp32."""
        return {name: out.float() for name, out in self.runners["encoder_full"](pixels=x).items()}

    def reconstruct(self, x: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        if "decoder" not in self.runners:
            raise RuntimeError("this checkpoint has no decoder: it can give embeddings but not error maps")
        passes = ids_keep.shape[0] // x.shape[0]
        latent = self.runners["encoder_masked"](pixels=x, ids_keep=ids_keep.reshape(x.shape[0], passes, -1))["latent"]
        return self.runners["decoder"](latent=latent, ids_restore=ids_restore)["pred"].float()

    def describe(self) -> dict[str, str]:
        any_key = next(iter(self.keys.values()))
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": f"cuda ({any_key.gpu_name}, sm {any_key.compute_capability})",
            "tensorrt": any_key.tensorrt_version,
        }
