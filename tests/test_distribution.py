"""kgrad under keras.distribution on 8 simulated CPU devices (JAX).

tests/distributed_check.py runs every public function on one device and under
the distribution, in a process of its own (JAX fixes its device count when it
starts), and reports the differences and where each result lies.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution runs on JAX (tested in the jax suite)",
)
CHECK = pathlib.Path(__file__).with_name("distributed_check.py")


def test_every_function_under_data_and_model_parallel():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    kinds = ["DataParallel", "ModelParallel"]
    res = subprocess.run(
        [sys.executable, str(CHECK), *kinds], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for kind in kinds:
        functions = report[kind]["functions"]
        assert len(functions) == 23
        for name, result in functions.items():
            # The same float32 computation, its reductions split over devices.
            assert result["max_difference"] < 1e-4, (kind, name, result)
            # Per-sample results split along the batch axis, weight-shaped ones
            # with their weights' layouts (distributed_check.laid_out).
            assert result["laid_out"], (kind, name, result)
        # 13 samples cannot be split over the batch dimension (8 devices, or 2).
        refused = report[kind]["refused"]
        assert "must divide the batch size" in refused and "Received: a batch of 13" in refused
    kernels = report["ModelParallel"]["kernels"]
    assert kernels == {"h/kernel": "P(None, 'model')", "o/kernel": "P('model', None)"}
