"""Triton Python-backend model that runs an exported ``model.onnx`` with onnxruntime (CPU), for the tests.

nvidia-pytriton's bundled ``tritonserver`` has only the Python backend, not the onnxruntime one NVIDIA's images
have. ``tests/helpers/triton.py`` copies a repository written by ``msknode model export-triton`` and swaps
``platform: "onnxruntime_onnx"`` for ``backend: "python"`` plus this file as ``1/model.py``: same ONNX file, same
inputs, outputs, max batch size, dynamic batching and parameters, served by a real Triton server.

Runs inside the server (its own venv: numpy<2, onnxruntime), never imported by the test process.
Test hooks: a file ``<model folder>/delay`` (seconds) makes each execution sleep that long after writing
``<model folder>/executing`` (so a test can kill the server mid-batch).
"""

import json
import os
import time

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.folder = args["model_repository"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # the test machine has two cores, shared
        options.inter_op_num_threads = 1
        path = os.path.join(self.folder, args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.executions = 0

    def execute(self, requests):
        delay_file = os.path.join(self.folder, "delay")
        if os.path.exists(delay_file):
            with open(os.path.join(self.folder, "executing"), "w") as handle:
                handle.write(str(len(requests)))
            with open(delay_file) as handle:
                time.sleep(float(handle.read().strip() or 0))
        feeds = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            for name in self.inputs:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(feeds[self.inputs[0]][-1].shape[0])
        outputs = self.session.run(self.outputs, {name: np.concatenate(parts) for name, parts in feeds.items()})
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + size]))
                       for name, value in zip(self.outputs, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
