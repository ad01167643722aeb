"""The `kgrad` command line, end to end through subprocess."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

L = keras.layers


def _kgrad(*args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **kwargs)
    return subprocess.run(
        [sys.executable, "-m", "kgrad.tools.cli", *args], capture_output=True, text=True, env=env
    )


def test_compare_a_saved_model(tmp_path, rng):
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, activation="tanh", name="h"), L.Dense(2, name="o")]
    )
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", rng.normal(size=(5, 3)).astype("float32"))
    np.save(tmp_path / "y.npy", rng.normal(size=(5, 2)).astype("float32"))
    args = ["compare", path, "--inputs", str(tmp_path / "x.npy"), "--backends", "jax,torch"]
    res = _kgrad(*args, "--targets", str(tmp_path / "y.npy"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["ok"] and data["reference"] == "jax" and data["max_difference"] < 1e-3
    groups = set(data["models"]["m.keras"])
    assert {"grad/inputs", "grad/weights", "hvp/weights", "layer_grad/weights"} <= groups
    res = _kgrad(*args)  # table mode, with the progress bar
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2/2" in res.stdout and "all backends agree" in res.stdout
    res = _kgrad("compare", path, "--inputs", str(tmp_path / "x.npy"), "--backends", "jax,mx")
    assert res.returncode == 2 and "Unknown backend" in res.stderr and "Received" in res.stderr
    res = _kgrad("compare", path, "--backends", "jax,torch")
    assert res.returncode == 2 and "--inputs" in res.stderr


def test_bench_quick(tmp_path):
    res = _kgrad("bench", "--quick", "--repeats", "1", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)["rows"]
    cases = {row["case"] for row in rows}
    assert any("hessian" in c for c in cases) and any("loop" in c for c in cases)
    assert all(row["kgrad_s"] > 0 and row["native_s"] > 0 for row in rows)
