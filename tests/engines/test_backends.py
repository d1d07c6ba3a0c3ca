"""Backend selection, CPU precisions, and the TensorRT plan cache (the only place a stand-in tensorrt is used)."""

from __future__ import annotations

import types

import pytest
import torch

from engines.backends import resolve_backend_name, select_backend
from engines.backends.tensorrt_backend import BatchProfile, PlanCache, PlanKey
from engines.mae.backend import build_backend
from engines.backends.torch_backend import TorchBackend
from engines.mae.family import MAEModel
from engines.mae.errormap import noise_from_seed
from engines.mae.network import MAEConfig
from engines.mae.onnx_export import graph_shapes


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_auto_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend_name(None, "cpu") == "cpu"
    assert resolve_backend_name("auto", "cpu") == "cpu"
    assert resolve_backend_name(None, "auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("engines.backends.tensorrt_available", lambda: False)
    assert resolve_backend_name(None, "cpu") == "cpu"  # the default load stays on the CPU
    assert resolve_backend_name(None, "cuda:1") == "cuda"
    assert resolve_backend_name("auto", "cpu") == "cuda"
    monkeypatch.setattr("engines.backends.tensorrt_available", lambda: True)
    assert resolve_backend_name("auto") == "tensorrt"
    assert resolve_backend_name(None, "auto") == "tensorrt"
    assert resolve_backend_name("cpu", "cuda") == "cpu"  # an explicit choice wins
    with pytest.raises(ValueError, match="backend"):
        resolve_backend_name("metal")


def test_explicit_unavailable_backends_raise(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        build_backend(tiny_model, backend="cuda")
    with pytest.raises((ImportError, RuntimeError)):
        build_backend(tiny_model, backend="tensorrt")
    with pytest.raises(RuntimeError, match="no TensorRT graphs"):  # a family without TensorRT graphs
        select_backend(tiny_model, backend="tensorrt", tensorrt=None)


def test_auto_falls_back_to_cuda_when_tensorrt_fails(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("engines.backends.tensorrt_available", lambda: True)
    built = {}

    class FakeTorchBackend:  # stands in for CUDA torch, which this machine cannot run
        def __init__(self, model, device, precision):
            built.update(device=device, precision=precision)
            self.name, self.device, self.precision = "cuda", device, precision

    monkeypatch.setattr("engines.backends.torch_backend.TorchBackend", FakeTorchBackend)
    monkeypatch.setattr(
        "engines.backends.tensorrt_backend.TensorRTBackend.from_onnx",
        classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(ImportError("no tensorrt"))),
    )
    monkeypatch.setattr("engines.backends.tensorrt_backend.import_tensorrt", lambda: types.SimpleNamespace())
    monkeypatch.setattr("engines.mae.backend.export_onnx", lambda *a, **k: None)  # export skipped: the build fails
    backend = build_backend(tiny_model, backend="auto")
    assert backend.name == "cuda" and built == {"device": "cuda", "precision": "fp16"}


def test_cpu_precisions_and_description(tiny_model, images):
    fp32 = MAEModel(tiny_model, name="t", backend=TorchBackend(tiny_model, "cpu", "fp32"))
    bf16 = MAEModel(tiny_model, name="t", backend=TorchBackend(tiny_model, "cpu", "bf16"))
    assert bf16.describe()["precision"] == "bf16" and fp32.describe()["backend"] == "cpu"
    assert next(fp32.network.parameters()).dtype == torch.float32  # bf16 runs on its own copy
    noise = noise_from_seed(0, 4, 196)
    maps32, _ = fp32.error_map(images, noise=noise)
    maps16, _ = bf16.error_map(images, noise=noise)
    assert maps16.dtype == torch.float32
    assert pearson(maps32, maps16) >= 0.99
    assert torch.allclose(fp32.embed(images), bf16.embed(images), atol=0.1)
    with pytest.raises(ValueError, match="fp16"):
        TorchBackend(tiny_model, "cpu", "fp16")


def test_cpu_int8_maps_agree_with_fp32(tiny_model, images):
    fp32 = MAEModel(tiny_model, name="t")
    int8 = MAEModel(tiny_model, name="t", backend=TorchBackend(tiny_model, "cpu", "int8"))
    assert int8.precision == "int8" and int8.encoder_hash == fp32.encoder_hash
    noise = noise_from_seed(2, 4, 196)
    maps32, _ = fp32.error_map(images, noise=noise)
    maps8, _ = int8.error_map(images, noise=noise)
    assert not torch.equal(maps32, maps8)  # really quantised
    assert pearson(maps32, maps8) >= 0.99
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in int8.backend.model.modules())
    with pytest.raises(ValueError, match="int8"):
        TorchBackend(tiny_model, "cuda", "int8")


def test_chunked_reconstruction_equals_one_batch(tiny_model, images):
    noise = noise_from_seed(1, 3, 196)
    small = MAEModel(tiny_model, name="t", backend=TorchBackend(tiny_model, max_batch=2))
    large = MAEModel(tiny_model, name="t", backend=TorchBackend(tiny_model, max_batch=64))
    assert torch.allclose(small.error_map(images, noise=noise)[0], large.error_map(images, noise=noise)[0], atol=1e-6)


# --------------------------------------------------------------------------------------- TensorRT plan cache
class FakeRuntime:
    """Stand-in for trt.Runtime: 'deserialises' plans that start with b'PLAN'."""

    def __init__(self):
        self.calls = 0

    def deserialize_cuda_engine(self, data: bytes):
        self.calls += 1
        return types.SimpleNamespace(plan=data) if data.startswith(b"PLAN") else None


def key(**changes) -> PlanKey:
    fields = dict(onnx_sha256="a" * 64, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                  tensorrt_version="10.3.0", precision="fp16", profile=repr(BatchProfile()))
    fields.update(changes)
    return PlanKey(**fields)


def test_plan_key_changes_with_everything_a_plan_depends_on():
    base = key().file_name("decoder")
    for change in (dict(onnx_sha256="b" * 64), dict(gpu_name="NVIDIA A100"), dict(compute_capability="8.0"),
                   dict(tensorrt_version="10.4.0"), dict(precision="bf16"), dict(profile="other")):
        assert key(**change).file_name("decoder") != base
    assert key().file_name("decoder") == base and key().file_name("encoder_full") != base


def test_cache_hit_miss_and_rebuild_after_failed_deserialisation(tmp_path):
    cache, runtime, builds = PlanCache(tmp_path), FakeRuntime(), []

    def build():
        builds.append(1)
        return b"PLAN-v%d" % len(builds)

    first = cache.get_engine(None, runtime, key(), "decoder", build)
    second = cache.get_engine(None, runtime, key(), "decoder", build)
    assert len(builds) == 1 and first.plan == second.plan == b"PLAN-v1"  # miss then hit
    cache.plan_path(key(), "decoder").write_bytes(b"garbage from another TensorRT")
    third = cache.get_engine(None, runtime, key(), "decoder", build)
    assert len(builds) == 2 and third.plan == b"PLAN-v2"
    assert cache.plan_path(key(), "decoder").read_bytes() == b"PLAN-v2"
    other_gpu = cache.get_engine(None, runtime, key(gpu_name="NVIDIA L4", compute_capability="8.9"), "decoder", build)
    assert len(builds) == 3 and other_gpu.plan == b"PLAN-v3"


def test_timing_cache_is_per_gpu_and_tensorrt_version(tmp_path):
    cache = PlanCache(tmp_path)
    assert cache.timing_cache_path(key()) == cache.timing_cache_path(key(onnx_sha256="c" * 64))
    assert cache.timing_cache_path(key()) != cache.timing_cache_path(key(tensorrt_version="10.4.0"))
    assert cache.timing_cache_path(key()) != cache.timing_cache_path(key(gpu_name="NVIDIA L4"))


def test_profile_shapes_cover_the_worker_batches():
    vitl = MAEConfig(hidden_size=1024)  # ViT-L/16 widths at 224 px: 196 patches, 49 kept
    shapes = graph_shapes(BatchProfile(min_images=1, opt_images=4, max_images=8, passes=10), vitl, "decoder")
    assert shapes["latent"] == ((10, 50, 1024), (40, 50, 1024), (80, 50, 1024))
    assert shapes["ids_restore"] == ((10, 196), (40, 196), (80, 196))
    masked = graph_shapes(BatchProfile(), vitl, "encoder_masked")
    assert masked["ids_keep"][0] == (1, 10, 49)
    assert masked["pixels"][2] == (16, 3, 224, 224)
    with pytest.raises(ValueError, match="graph"):
        graph_shapes(BatchProfile(), vitl, "unknown")


def fake_tensorrt_build(monkeypatch, exports: list, builds: list) -> None:
    """CUDA present, a stand-in tensorrt module, ONNX "exported" as placeholder files, plan builds recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        "engines.backends.tensorrt_backend.TensorRTBackend.from_onnx",
        classmethod(lambda cls, inputs, **kwargs: builds.append((inputs, kwargs)) or "built"),
    )

    def export(network, onnx_dir, graphs=("encoder_full",), **kwargs):
        exports.append(onnx_dir)
        onnx_dir.mkdir(parents=True, exist_ok=True)
        for graph in graphs:
            (onnx_dir / f"{graph}.onnx").write_bytes(b"onnx")

    monkeypatch.setattr("engines.mae.backend.export_onnx", export)
    monkeypatch.setattr("engines.dinov3.backend.export_onnx", export)


def test_both_families_share_the_tensorrt_export_and_plan_plumbing(tiny_model, tmp_path, monkeypatch):
    """engines.backends.tensorrt_backend.tensorrt_from_export: ONNX exported once per export key, each family's
    graphs and shapes handed to the plan builder, one ONNX folder per (family, weights, input size)."""
    from engines.dinov3 import backend as dinov3_backend
    from engines.dinov3.network import DINOv3Config, DINOv3ViT
    from engines.mae import backend as mae_backend

    exports, builds = [], []
    fake_tensorrt_build(monkeypatch, exports, builds)
    trt = types.SimpleNamespace()
    profile = BatchProfile(max_images=8)
    for _ in range(2):
        assert mae_backend.tensorrt_backend(tiny_model, cache_dir=tmp_path, profile=profile, trt=trt) == "built"
    assert len(exports) == 1 and len(builds) == 2  # the second call found the ONNX files: no second export
    inputs, kwargs = builds[-1]
    expected_graphs = {"encoder_full", "encoder_masked", "decoder"} if tiny_model.has_decoder else {"encoder_full"}
    assert set(inputs) == expected_graphs
    assert inputs["encoder_full"] == (exports[0] / "encoder_full.onnx",
                                      graph_shapes(profile, tiny_model.config, "encoder_full"))
    assert kwargs["cache_dir"] == tmp_path and kwargs["profile"] == profile and kwargs["precision"] == "fp16"

    network = DINOv3ViT(DINOv3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=64)).init_weights(seed=0)
    dinov3_backend.tensorrt_backend(network, 64, 64, precision="bf16", cache_dir=tmp_path, trt=trt)
    dinov3_backend.tensorrt_backend(network, 64, 64, cache_dir=tmp_path, trt=trt)
    dinov3_backend.tensorrt_backend(network, 96, 96, cache_dir=tmp_path, trt=trt)  # another input size
    assert len(exports) == 3 and len({*exports}) == 3 and all(p.parent == tmp_path / "onnx" for p in exports)
    inputs, kwargs = builds[-1]
    assert set(inputs) == {"encoder_full"} and inputs["encoder_full"][1]["pixels"][2] == (16, 3, 96, 96)
    assert builds[-3][1]["precision"] == "bf16"


def test_tensorrt_plumbing_needs_cuda(tiny_model, tmp_path, monkeypatch):
    from engines.mae import backend as mae_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA device"):
        mae_backend.tensorrt_backend(tiny_model, cache_dir=tmp_path, trt=types.SimpleNamespace())
    assert not (tmp_path / "onnx").exists()  # nothing exported for a backend that cannot run
