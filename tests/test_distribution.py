"""kgrad under the frameworks' own engines, on simulated CPU devices.

tests/distributed_check.py runs every public function on one device and under
keras.distribution (JAX, 8 devices), in a process of its own (JAX fixes its
device count when it starts), and reports the differences and where each
result lies. tests/distributed_fit.py trains through kgrad with `fit` on one
device and under DataParallel (JAX) or MirroredStrategy (TensorFlow, 2
logical CPU devices). docs/scaling.md's recipes run as written: two
jax.distributed processes (gloo), MirroredStrategy's replicas, two torchrun
processes (gloo). Each suite runs its backend's tests.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
jax_only = pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution runs on JAX (tested in the jax suite)"
)
CHECK = pathlib.Path(__file__).with_name("distributed_check.py")
GUIDE = pathlib.Path(__file__).parents[1] / "docs" / "scaling.md"
FIT = pathlib.Path(__file__).with_name("distributed_fit.py")


def _guide_script(folder, title):
    """The guide's block titled ``title``, written to ``folder / title``."""
    fence = f'```python title="{re.escape(title)}"'
    (block,) = re.findall(fence + r"\n(.*?)```", GUIDE.read_text(), re.S)
    script = folder / title
    script.write_text(block)
    return script


def _clean_env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@jax_only
def test_every_function_under_data_and_model_parallel():
    env = _clean_env()
    kinds = ["DataParallel", "ModelParallel"]
    res = subprocess.run(
        [sys.executable, str(CHECK), *kinds], capture_output=True, text=True, env=env, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for kind in kinds:
        functions = report[kind]["functions"]
        assert len(functions) == 25
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


# Runs the guide's blocks that open with FENCE (argv[2]), in order, in one scope.
RUN_GUIDE = """
import pathlib, re, sys, textwrap
guide = pathlib.Path(sys.argv[1]).read_text()
scope = {}
for block in re.findall(re.escape(sys.argv[2]) + r"\\n(.*?)```", guide, re.S):
    exec(compile(textwrap.dedent(block), "docs/scaling.md", "exec"), scope)
"""


@jax_only
def test_the_scaling_guide_runs():
    # Its first block sets 8 simulated devices, so it runs in a fresh process.
    env = _clean_env()
    res = subprocess.run(
        [sys.executable, "-c", RUN_GUIDE, str(GUIDE), "```python"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "P('batch',) P('batch',)", res.stdout
    assert lines[1] == "P(None, 'model')", res.stdout
    assert "must divide the batch size" in lines[2], res.stdout


@pytest.mark.skipif(BACKEND == "torch", reason="fit has no multi-device engine on torch")
def test_fit_through_kgrad_under_the_engine_matches_one_device():
    # A gradient penalty and a Laplacian residual in compute_loss, three epochs of
    # SGD: the engine splits each batch over its devices and must end where one
    # device ends (float32 sums in another order).
    res = subprocess.run(
        [sys.executable, str(FIT), BACKEND],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["devices"] == (8 if BACKEND == "jax" else 2)
    (single, single_loss), (spread, spread_loss) = report["single"], report["spread"]
    assert single_loss[-1] < single_loss[0]  # it trains
    np.testing.assert_allclose(spread_loss, single_loss, rtol=1e-5)
    for a, b in zip(spread, single):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute: the tensorflow suite")
def test_the_scaling_guides_tf_distribute_recipe_runs():
    # Per-sample results gathered from two replicas equal one device's.
    res = subprocess.run(
        [sys.executable, "-c", RUN_GUIDE, str(GUIDE), '```python title="tf_distribute.py"'],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "(100, 16) True", res.stdout


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed: the torch suite")
def test_the_scaling_guides_torchrun_recipe_runs(tmp_path):
    # Two processes (gloo, CPU): the gathered per-sample results equal one process's.
    script = _guide_script(tmp_path, "torch_distributed.py")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = subprocess.run(
        [*run, str(script)],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "(100, 16) True", res.stdout


@jax_only
def test_the_scaling_guides_jax_distributed_recipe_runs(tmp_path):
    # Two processes (gloo collectives on CPU), each with its part of the batch:
    # the gathered results equal one process's.
    import socket

    script = _guide_script(tmp_path, "jax_distributed.py")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_clean_env(),
            cwd=tmp_path,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0].strip().splitlines()[-1] == "(100, 16) True", outs[0][0]
