"""A real Triton Inference Server for the tests: nvidia-pytriton's bundled ``tritonserver`` (2.51), CPU only.

nvidia-pytriton needs numpy<2, which our DICOM codecs refuse, so the server has its own venv
(``.venv/triton-server``, made by ``tests/setup/install_triton_server.sh``; ``MSKNODE_TRITON_VENV`` overrides).
That build of Triton has only the Python backend, so :func:`python_backend_repository` serves a repository written
by ``msknode model export-triton`` through it: the same ``model.onnx``, ``config.pbtxt`` contract, max batch size,
dynamic batching and parameters, with ``backend: "python"`` and ``tests/helpers/triton_model.py`` (onnxruntime)
instead of ``platform: "onnxruntime_onnx"`` (NVIDIA's images load the exported repository as is).

A missing server skips locally and fails under CI (``component_missing``); an installed server that cannot start
always fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.components import component_missing
from tests.helpers.node import REPO_ROOT, free_port

SERVER_VENV = Path(os.environ.get("MSKNODE_TRITON_VENV", REPO_ROOT / ".venv" / "triton-server"))
INSTALLER = REPO_ROOT / "tests" / "setup" / "install_triton_server.sh"
MODEL_PY = Path(__file__).with_name("triton_model.py")


def site_packages(venv: Path = SERVER_VENV) -> Path | None:
    found = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    return found[-1].parents[3] if found else None


def python_backend_repository(exported: Path, out: Path) -> Path:
    """Copy an exported repository for the Python backend: platform line swapped, ``1/model.py`` added."""
    out.mkdir(parents=True, exist_ok=True)
    for config in sorted(exported.glob("*/config.pbtxt")):
        folder = out / config.parent.name
        shutil.copytree(config.parent, folder, dirs_exist_ok=True)
        text = config.read_text()
        if 'platform: "onnxruntime_onnx"' not in text:
            raise AssertionError(f"{config}: not an onnxruntime_onnx model")
        (folder / "config.pbtxt").write_text(text.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
        shutil.copyfile(MODEL_PY, folder / "1" / "model.py")
    return out


class TritonServer:
    """``tritonserver`` on fixed free ports (kept across restarts, so clients reconnect to the same address)."""

    def __init__(self, repository: Path, workdir: Path) -> None:
        packages = site_packages()
        if packages is None:
            component_missing(f"Triton server not installed ({SERVER_VENV}); run bash {INSTALLER.relative_to(REPO_ROOT)}")
        self.packages = packages
        self.repository = repository
        self.workdir = workdir
        self.grpc_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "tritonserver.log"
        self.backends = self._backend_directory()
        self.starts = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _backend_directory(self) -> Path:
        """The Python backend with the stub for the server venv's Python (what pytriton itself sets up)."""
        root = self.packages / "pytriton" / "tritonserver"
        python = self._python()
        version = subprocess.run([python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        backends = self.workdir / "backends"
        shutil.copytree(root / "backends", backends, dirs_exist_ok=True)
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _python(self) -> str:
        return str(SERVER_VENV / "bin" / "python")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = subprocess.run([self._python(), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        libs = [str(self.packages / "nvidia_pytriton.libs"), libdir]  # libpython of the server venv's interpreter
        env["LD_LIBRARY_PATH"] = ":".join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env["PATH"] = f"{SERVER_VENV / 'bin'}:{env.get('PATH', '')}"  # the stub's Python is the venv's
        env.pop("PYTHONPATH", None)
        env["OMP_NUM_THREADS"] = "1"
        return env

    def start(self, timeout: float = 120.0) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self.starts += 1
        binary = self.packages / "pytriton" / "tritonserver" / "bin" / "tritonserver"
        command = [
            str(binary), f"--model-repository={self.repository}", f"--backend-directory={self.backends}",
            f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}", "--allow-metrics=false",
            "--exit-timeout-secs=5", "--log-verbose=0", "--grpc-address=127.0.0.1", "--http-address=127.0.0.1",
        ]
        log = open(self.log_path, "ab")
        log.write(f"\n=== start {self.starts} ===\n".encode())
        log.flush()
        # its own process group: the Python backend's stub processes go with it when the test kills the server
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                        start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                break
            if self.ready():
                return self
            time.sleep(0.3)
        tail = self.log_tail()
        self.kill()
        pytest.fail(f"the Triton server did not start within {timeout:.0f} s (installed in {SERVER_VENV}):\n{tail}",
                    pytrace=False)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the server and its stubs (its process group) at once: a crash, mid-request if one is running."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, grace=15)

    def _signal(self, sig: int, grace: float = 0.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace or 10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        if sig != signal.SIGKILL:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # stubs left behind, if any
            except ProcessLookupError:
                pass

    def set_delay(self, model: str, seconds: float | None) -> Path:
        """Make ``model`` sleep ``seconds`` per execution (None: no delay); returns its ``executing`` marker file."""
        folder = self.repository / model
        (folder / "executing").unlink(missing_ok=True)
        if seconds is None:
            (folder / "delay").unlink(missing_ok=True)
        else:
            (folder / "delay").write_text(str(seconds))
        return folder / "executing"

    def statistics(self, model: str) -> dict[str, int]:
        """Requests and executions (batches) Triton counted for ``model`` since it started."""
        import json

        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/stats", timeout=5) as response:
            stats = json.load(response)["model_stats"][0]
        return {"inferences": int(stats["inference_count"]), "executions": int(stats["execution_count"]),
                "requests": int(stats["inference_stats"]["success"]["count"])}


__all__ = ["TritonServer", "python_backend_repository", "site_packages", "SERVER_VENV"]
