"""The `kgrad` command line, end to end through subprocess."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import on_accelerator

L = keras.layers

# `kgrad compare` runs each backend in a worker process of its own, so the
# backend of the test process changes nothing: each of its tests runs in one
# suite only, the torch one (the quickest of the three) or, to balance CI's two
# CPUs (jax's suite shares one with the zoo, tensorflow's and torch's the other),
# the jax one (the custom-objects test's comparison).
compare_suite = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="kgrad compare runs every backend in its own workers: tested under torch",
)


def _kgrad(*args, cwd=None, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **kwargs)
    return subprocess.run(
        [sys.executable, "-m", "kgrad.tools.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


@compare_suite
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
    # Table mode is checked in test_custom_objects_load_in_report_and_compare.
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
    # The ratio is the median of the per-round ratios; the range is theirs.
    assert all(row["ratio_min"] <= row["ratio"] <= row["ratio_max"] for row in rows)
    from kgrad.tools import bench

    text = bench.format_table(rows, [json.loads(res.stdout)["environment"]])
    assert "median of per-round ratios" in text.splitlines()[1]
    first = text.splitlines()[3]  # two header lines, the column names, the first row
    assert first.startswith(rows[0]["backend"]) and " (" in first and ")" in first


CUSTOM_LAYERS = """
import keras


@keras.saving.register_keras_serializable(package="kgradtest")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class Shift(keras.layers.Layer):  # not registered: needs --custom-objects
    def call(self, x):
        return x + 1.0
"""


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="loading custom objects does not depend on the backend: tested under jax",
)
def test_custom_objects_load_in_report_and_compare(tmp_path, rng, monkeypatch):
    (tmp_path / "mylayers.py").write_text(CUSTOM_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mylayers

    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, name="h"), mylayers.Scale(3.0), mylayers.Shift(), L.Dense(2)]
    )
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", rng.normal(size=(5, 3)).astype("float32"))
    x = str(tmp_path / "x.npy")
    # Without the module, the model cannot load; the message names the options.
    res = _kgrad("report", path, "--inputs", x)
    assert res.returncode == 2 and "--import MODULE" in res.stderr, res.stderr[-2000:]
    # A module name (found in the current folder) and MODULE:NAME.
    res = _kgrad(
        "report",
        path,
        "--inputs",
        x,
        "--import",
        "mylayers",
        "--custom-objects",
        "mylayers:Shift",
        "--json",
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    norms = {row["name"]: row["output_grad_norm"] for row in json.loads(res.stdout)["layers"]}
    # d sum(Dense(3 h + 1)) / dh = 3 * (the last kernel's row sums), for each of 5 samples.
    w2 = keras.ops.convert_to_numpy(model.layers[-1].kernel)
    expected = np.sqrt(5) * 3 * np.linalg.norm(w2.sum(axis=1))
    np.testing.assert_allclose(norms["h"], expected, rtol=1e-5)
    # explain takes the same options; the input x gradient of the linear model, by hand.
    res = _kgrad(
        "explain",
        path,
        "--inputs",
        x,
        "--target",
        "1",
        "--method",
        "input_x_gradient",
        "--import",
        "mylayers",
        "--custom-objects",
        "mylayers:Shift",
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    w1 = keras.ops.convert_to_numpy(model.layers[0].kernel)
    expected = np.load(x) * (3 * w1 @ w2[:, 1])
    np.testing.assert_allclose(np.load(tmp_path / "input_x_gradient.npy"), expected, rtol=1e-5)
    # compare, from another folder: the .py file by path, in every worker.
    module = str(tmp_path / "mylayers.py")
    res = _kgrad(
        "compare",
        path,
        "--inputs",
        x,
        "--backends",
        "jax,torch",
        "--import",
        module,
        "--custom-objects",
        f"{module}:Shift",
        cwd=os.path.dirname(sys.executable),
    )
    # Table mode, with progress lines: stdout is not a terminal here.
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2/2 models" in res.stdout and "all backends agree" in res.stdout
    assert "\x1b" not in res.stdout and "\r" not in res.stdout


@compare_suite
def test_a_failed_worker_reports_one_clean_line(tmp_path, rng):
    model = keras.Sequential([keras.Input((3,)), L.Dense(2, name="o")])
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", rng.normal(size=(5, 4)).astype("float32"))  # wrong shape
    args = ["compare", path, "--inputs", str(tmp_path / "x.npy"), "--backends", "jax,torch"]
    res = _kgrad(*args)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("kgrad compare: the jax worker failed on m.keras: ValueError: ")
    assert "shape" in line and "--verbose" in line
    assert "Traceback" not in res.stderr and "kgrad compare: kgrad compare" not in res.stderr
    res = _kgrad(*args, "--verbose")
    assert res.returncode == 2 and "Traceback" in res.stderr
    assert "the jax worker failed on m.keras: ValueError" in res.stderr


@pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="reading input files does not depend on the backend: tested under torch",
)
def test_report_reads_csv_and_refuses_other_formats(tmp_path, rng):
    model = keras.Sequential([keras.Input((3,)), L.Dense(2, name="o")])
    path = str(tmp_path / "m.keras")
    model.save(path)
    x = rng.normal(size=(4, 3)).astype("float32")
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    res = _kgrad("report", path, "--inputs", str(tmp_path / "x.csv"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(res.stdout)["layers"]
    # The output gradient of the summed outputs is all ones: its norm is sqrt(4 * 2).
    np.testing.assert_allclose(row["output_grad_norm"], np.sqrt(8.0), rtol=1e-6)
    (tmp_path / "x.pkl").write_bytes(b"not a batch")
    res = _kgrad("report", path, "--inputs", str(tmp_path / "x.pkl"))
    assert res.returncode == 2 and "reads .npy, .npz, .csv files" in res.stderr
    assert "allow_pickle" not in res.stderr


def test_explain_writes_the_attribution_and_its_heatmap(tmp_path, rng):
    import kgrad

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            L.Conv2D(3, 3, activation="tanh", name="conv"),
            L.Flatten(),
            L.Dense(4),
        ]
    )
    path = str(tmp_path / "m.keras")
    model.save(path)
    x = rng.uniform(size=(3, 6, 6, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    res = _kgrad(
        "explain",
        path,
        "--inputs",
        str(tmp_path / "x.npy"),
        "--target",
        "0,3,1",
        "--steps",
        "8",
        "--plot",
        "maps.png",
        "--output",
        "ig.npy",
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote ig.npy ((3, 6, 6, 1))" in res.stdout
    expected = kgrad.attribution.integrated_gradients(model, x, target=np.array([0, 3, 1]), steps=8)
    # The command computes at the framework's default precision: TF32 on a GPU.
    rtol, atol = (1e-2, 1e-4) if on_accelerator() else (1e-5, 1e-7)
    np.testing.assert_allclose(
        np.load(tmp_path / "ig.npy"), keras.ops.convert_to_numpy(expected), rtol=rtol, atol=atol
    )
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG"
    res = _kgrad(
        "explain",
        path,
        "--inputs",
        str(tmp_path / "x.npy"),
        "--target",
        "predicted",
        "--method",
        "gradcam",
        cwd=str(tmp_path),
    )
    assert res.returncode == 0 and np.load(tmp_path / "gradcam.npy").shape == (3, 6, 6), res.stderr
    res = _kgrad("explain", path, "--inputs", str(tmp_path / "x.npy"), "--target", "two")
    assert res.returncode == 2 and "Received: --target 'two'" in res.stderr, res.stderr
