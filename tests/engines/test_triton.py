"""The Triton backend against a real Triton Inference Server (nvidia-pytriton's tritonserver 2.51, on this CPU).

``msknode model export-triton`` writes the repository; the server serves its ONNX files and config.pbtxt contract
through its Python backend (tests/helpers/triton.py says why and how). Checked: the repository's config parses as
Triton's own ``ModelConfig`` protobuf with the contract, batching and hash; parity with the in-process CPU backend
(embedding and error map <= 1e-5; raw reconstructions <= 1e-4, as the ONNX parity) over gRPC and HTTP, with
batches split at the server's ``max_batch_size``; a server serving other weights is refused; an unreachable server is transient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from typer.testing import CliRunner

import engines
from engines.backends import BackendUnavailable, triton_backend
from engines.backends.triton import PARAM_HASH, TritonError, model_names
from engines.mae.errormap import masks_from_noise, expand_noise, noise_from_seed
from node.cli import app
from node.settings import ConfigError, parse_settings
from tests.helpers import triton as triton_helper
from tests.helpers.node import REPO_ROOT, free_port
from tests.helpers.triton import TritonServer, python_backend_repository

DEMO = REPO_ROOT / "models" / "demo-mae"
MAX_BATCH = 4  # small, so a batch of 5 images is split into two requests
TOLERANCE = 1e-5  # embedding and error map (the outputs)
PRED_TOLERANCE = 1e-4  # raw reconstructions: onnxruntime vs torch kernels, as the ONNX parity (docs/engine.md)


@pytest.fixture(scope="module")
def demo():
    return engines.load(DEMO, backend="cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repository"
    result = CliRunner().invoke(app, ["model", "export-triton", str(out), "--model", str(DEMO),
                                      "--max-batch-size", str(MAX_BATCH), "--queue-delay-us", "5000"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    work = tmp_path_factory.mktemp("triton-server")
    triton = TritonServer(python_backend_repository(exported, work / "repository"), work).start()
    yield triton
    triton.stop()


def test_export_triton_writes_a_repository_triton_loads_as_is(exported, demo) -> None:
    from tritonclient.grpc import model_config_pb2

    names = model_names("demo-mae")
    assert sorted(p.name for p in exported.iterdir()) == sorted(names.values())
    configs = {}
    for role, name in names.items():
        assert (exported / name / "1" / "model.onnx").is_file()
        config = text_format.Parse((exported / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == MAX_BATCH
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert config.parameters[PARAM_HASH].string_value == demo.encoder_hash
        configs[role] = config

    def contract(tensors):
        return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in tensors]

    width, keep, patches = demo.config.hidden_size, demo.config.len_keep, demo.config.num_patches
    assert contract(configs["embed"].input) == [("pixels", "TYPE_FP32", [3, 224, 224])]
    assert contract(configs["embed"].output) == [("cls", "TYPE_FP32", [width])]
    assert contract(configs["reconstruct"].input) == [
        ("pixels", "TYPE_FP32", [3, 224, 224]), ("ids_keep", "TYPE_INT64", [-1, keep]),
        ("ids_restore", "TYPE_INT64", [-1, patches]),
    ]
    assert contract(configs["reconstruct"].output) == [("pred", "TYPE_FP32", [-1, patches, 16 * 16 * 3])]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_parity_with_the_in_process_cpu_backend(server, demo, protocol, capsys) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    remote = triton_backend(url, "demo-mae", demo.encoder_hash, protocol=protocol, timeout_seconds=60)
    local = demo.backend
    x = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    embed_diff = (remote.embed(x) - local.embed(x)).abs().max().item()
    ids_keep, ids_restore, _ = masks_from_noise(expand_noise(noise_from_seed(0, 3, 196), 5, 3), demo.config.mask_ratio)
    pred_diff = (remote.reconstruct(x, ids_keep, ids_restore) - local.reconstruct(x, ids_keep, ids_restore)).abs().max()
    reference = demo.error_map_result(x, seed=7, passes=3)
    demo.backend = remote
    try:
        served = demo.error_map_result(x, seed=7, passes=3)
    finally:
        demo.backend = local
    map_diff = (served.maps - reference.maps).abs().max().item()
    score_diff = (served.scores - reference.scores).abs().max().item()
    with capsys.disabled():
        print(f"\n[triton {protocol}] max |diff| vs cpu: embed {embed_diff:.2e}, reconstruction {pred_diff:.2e}, "
              f"error map {map_diff:.2e}, score {score_diff:.2e}")
    assert embed_diff <= TOLERANCE and pred_diff <= PRED_TOLERANCE
    assert map_diff <= TOLERANCE and score_diff <= TOLERANCE
    assert served.seed == reference.seed == 7
    assert remote.describe()["backend"] == "triton" and remote.describe()["triton_server"]
    remote.close()


def test_a_server_serving_other_weights_is_refused(server) -> None:
    remote = triton_backend(server.grpc_url, "demo-mae", "0" * 64)
    with pytest.raises(TritonError, match="serves encoder"):
        remote.check()


def test_a_missing_model_or_server_is_transient(server, demo) -> None:
    missing = triton_backend(server.grpc_url, "no-such-model", demo.encoder_hash)
    assert missing.ready() is False
    with pytest.raises(BackendUnavailable, match="not ready"):
        missing.embed(torch.zeros(1, 3, 224, 224))
    for protocol in ("grpc", "http"):
        nobody = triton_backend(f"127.0.0.1:{free_port()}", "demo-mae", demo.encoder_hash, protocol=protocol,
                                timeout_seconds=5)
        assert nobody.ready() is False
        with pytest.raises(BackendUnavailable):
            nobody.embed(torch.zeros(1, 3, 224, 224))


def test_triton_settings_are_validated_naming_the_key() -> None:
    settings = parse_settings({"engine": {"backend": "triton", "triton_url": "triton.lan:8001",
                                          "triton_protocol": "http", "triton_model": "skelex-vitl"}})
    assert settings.engine.triton_url == "triton.lan:8001" and settings.engine.triton_model == "skelex-vitl"
    for engine, key in [({"triton_url": "http://triton:8001"}, "engine.triton_url"),
                        ({"triton_url": "triton"}, "engine.triton_url"),
                        ({"triton_model": "my model"}, "engine.triton_model"),
                        ({"triton_protocol": "tcp"}, "engine.triton_protocol"),
                        ({"triton_timeout_seconds": 0}, "engine.triton_timeout_seconds"),
                        ({"backend": "triton", "precision": "fp16"}, "precision")]:
        with pytest.raises(ConfigError) as caught:
            parse_settings({"engine": engine})
        assert any(key in problem for problem in caught.value.problems), caught.value.problems


def test_a_missing_triton_server_fails_under_ci(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(triton_helper, "site_packages", lambda venv=None: None)
    with pytest.raises(pytest.fail.Exception, match="Triton server not installed"):
        TritonServer(tmp_path, tmp_path)
