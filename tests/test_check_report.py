"""check_grad, grad_report, GradientMonitor and `kgrad report`, on every backend.

References are independent of kgrad's autodiff: hand-derived NumPy gradients,
a deliberately wrong custom gradient, and NaN-producing layers.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

L = keras.layers
ops = keras.ops


def _square_layer(factor, dtype=None):
    """x -> x**2 with a custom gradient ``factor * x * upstream`` (2 is right)."""

    @ops.custom_gradient
    def square(x):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream * factor * x

        return x * x, grad

    class Square(L.Layer):
        def call(self, x):
            return square(x)

    return Square(name="square", dtype=dtype)


def _mlp(extra=None):
    layers = [keras.Input((3,)), L.Dense(4, activation="tanh", name="a")]
    if extra is not None:
        layers.append(extra)
    layers.append(L.Dense(2, name="b"))
    return keras.Sequential(layers, name="net")


@pytest.mark.parametrize("wrt", ["inputs", "weights", "activations"])
def test_check_grad_accepts_correct_gradients(wrt, rng):
    model = _mlp()
    x = rng.normal(size=(3, 3)).astype("float32")
    result = kgrad.check_grad(model, x, wrt=wrt)
    assert result.ok, str(result)
    assert result.checked == result.total
    assert result.max_abs_err < 1e-3
    y = rng.normal(size=(3, 2)).astype("float32")
    assert kgrad.check_grad(model, x, wrt=wrt, y=y, loss="mse", raise_on_fail=True).ok


def test_check_grad_accepts_a_correct_custom_gradient(rng):
    model = _mlp(_square_layer(2.0))
    x = rng.normal(size=(2, 3)).astype("float32")
    assert kgrad.check_grad(model, x, wrt="inputs").ok
    assert kgrad.check_grad(model, x, wrt="weights").ok


def test_check_grad_catches_a_wrong_custom_gradient(rng):
    model = _mlp(_square_layer(3.0))  # 3x instead of 2x: every gradient is 1.5 times too big
    x = rng.normal(size=(2, 3)).astype("float32")
    result = kgrad.check_grad(model, x, wrt="weights")
    assert not result.ok
    # The autodiff side is 3/2 of the truth, so the relative error is 1/3.
    np.testing.assert_allclose(result.max_rel_err, 1 / 3, rtol=1e-2)
    with pytest.raises(AssertionError, match=r"mismatch.*net/a/"):
        kgrad.check_grad(model, x, wrt="weights", raise_on_fail=True)
    # The layer after the wrong one is unaffected.
    assert kgrad.check_grad(model, x, wrt="weights", layers="b").ok


def test_check_grad_samples_large_tensors_and_reports_nan(rng):
    model = _mlp()
    x = rng.normal(size=(3, 3)).astype("float32")
    result = kgrad.check_grad(model, x, wrt="weights", max_entries=10)
    assert result.total == 3 * 4 + 4 + 4 * 2 + 2 and result.checked < result.total
    assert result.ok
    nan_model = keras.Sequential(
        [keras.Input((2,)), L.Lambda(lambda t: ops.sqrt(t), name="root"), L.Dense(1)]
    )
    bad = kgrad.check_grad(nan_model, -np.ones((1, 2), "float32"))
    assert not bad.ok and np.isnan(bad.max_abs_err)
    with pytest.raises(AssertionError, match="NaN or Inf"):
        kgrad.check_grad(nan_model, -np.ones((1, 2), "float32"), raise_on_fail=True)
    with pytest.raises(ValueError, match="max_entries"):
        kgrad.check_grad(model, x, max_entries=0)


def _float64_model():
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            L.Dense(4, activation="tanh", dtype="float64", name="h"),
            L.LayerNormalization(dtype="float64", name="norm"),
            L.Dense(2, dtype="float64", name="o"),
        ],
        name="f64",
    )


def _numpy_forward(model, x):
    """The float64 model's forward pass in NumPy float64 (LayerNorm: epsilon 1e-3)."""
    (w1, b1), (gamma, beta), (w2, b2) = (
        [np_(v).astype("float64") for v in model.get_layer(n).weights] for n in "h norm o".split()
    )
    h = np.tanh(x @ w1 + b1)
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return ((h - mean) / np.sqrt(var + 1e-3) * gamma + beta) @ w2 + b2


@pytest.mark.parametrize("with_loss", [False, True], ids=["outputs", "mse"])
@pytest.mark.parametrize("wrt", ["inputs", "weights"])
def test_check_grad_float64_follows_the_precision_the_backend_computes_at(wrt, with_loss, rng):
    """A float64 model passes, with steps and tolerances for the precision actually computed.

    Which precision that is comes from an independent measurement: the model's
    forward pass against NumPy in float64 (TensorFlow computes in float64;
    PyTorch runs Keras's mean and layer normalisation at float32; JAX without
    x64 holds float64 as float32).
    """
    model = _float64_model()
    x = rng.normal(size=(5, 3))
    y = rng.normal(size=(5, 2))
    reference = _numpy_forward(model, x)
    error = np.max(np.abs(np_(model(x)).astype("float64") - reference)) / np.max(np.abs(reference))
    expected = "float64" if error < 1e-12 else "float32"
    kwargs = dict(y=y, loss="mse") if with_loss else {}
    result = kgrad.check_grad(model, x, wrt=wrt, **kwargs)
    assert result.ok, str(result)
    assert result.precision == expected, (error, str(result))
    assert f"{expected} precision" in str(result)
    assert (result.eps, result.rtol) == ((1e-6, 1e-5) if expected == "float64" else (5e-3, 1e-2))


def test_check_grad_float64_keeps_float64_sensitivity_where_computed_in_float64(rng):
    """Where the backend computes in float64, a gradient 1e-4 off is still caught.

    The precision is measured from the objective alone, so the wrong gradient
    cannot loosen the tolerances it is checked with.
    """
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            L.Dense(2, dtype="float64", name="d"),
            _square_layer(2.0002, "float64"),  # d(x^2)/dx = 2x, here 1.0001 times that
            L.Dense(1, dtype="float64", name="o"),
        ]
    )
    x = rng.normal(size=(4, 3))
    (w1, b1), (w2, b2) = ([np_(v) for v in model.get_layer(n).weights] for n in "do")
    reference = (x @ w1 + b1) ** 2 @ w2 + b2
    if np.max(np.abs(np_(model(x)) - reference)) > 1e-12 * np.max(np.abs(reference)):
        pytest.skip("this backend computes the float64 model at float32 precision")
    result = kgrad.check_grad(model, x, wrt="weights", layers="d")
    assert result.precision == "float64" and not result.ok, str(result)
    np.testing.assert_allclose(result.max_rel_err, 1e-4, rtol=1e-2)


def test_check_grad_checks_the_function_kgrad_grad_runs(rng, monkeypatch):
    """check_grad's gradient is kgrad.grad's: a fault in the function grad runs is caught."""
    model = _mlp()
    x = rng.normal(size=(3, 3)).astype("float32")
    assert kgrad.check_grad(model, x, wrt="weights").ok
    original = kgrad.api._grad

    def faulty(*args, **kwargs):
        return keras.tree.map_structure(lambda t: t * 1.5, original(*args, **kwargs))

    monkeypatch.setattr(kgrad.api, "_grad", faulty)
    kgrad.clear_cache()
    wrong = np_(kgrad.grad(model, x, wrt="weights")["net/b/bias"])
    result = kgrad.check_grad(model, x, wrt="weights")
    assert not result.ok
    # kgrad.grad is 3/2 of the truth, so the relative error is 1/3.
    np.testing.assert_allclose(result.max_rel_err, 1 / 3, rtol=1e-2)
    # The bias of the last layer has the closed form: the batch size, per output.
    np.testing.assert_allclose(wrong, 1.5 * np.full(2, 3.0), rtol=1e-6)


def test_grad_report_matches_hand_derived_norms(rng):
    # Two linear layers and MSE: every norm has a closed form.
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, name="h"), L.Dense(2, name="o")], name="lin"
    )
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    W1, b1 = (np_(v).astype("float64") for v in model.layers[0].weights)
    W2, b2 = (np_(v).astype("float64") for v in model.layers[1].weights)
    h = x @ W1 + b1
    out = h @ W2 + b2
    d_out = 2 * (out - y) / out.size
    d_h = d_out @ W2.T
    rep = kgrad.grad_report(model, x, y, loss="mse")
    assert list(rep.layers) == ["h", "o"]
    o, hl = rep.layers["o"], rep.layers["h"]
    np.testing.assert_allclose(o.activation_norm, np.linalg.norm(out), rtol=1e-5)
    np.testing.assert_allclose(o.output_grad_norm, np.linalg.norm(d_out), rtol=1e-4)
    np.testing.assert_allclose(hl.output_grad_norm, np.linalg.norm(d_h), rtol=1e-4)
    np.testing.assert_allclose(o.weight_grad_norms["kernel"], np.linalg.norm(h.T @ d_out), 1e-4)
    np.testing.assert_allclose(hl.weight_grad_norms["bias"], np.linalg.norm(d_h.sum(0)), 1e-4)
    assert rep.flagged == {} and rep.nan_count == rep.inf_count == 0
    text = rep.to_text()
    assert text.splitlines()[0].split()[:2] == ["layer", "activation"]
    assert "h " in text and "o " in text
    assert json.loads(rep.to_json())["layers"][1]["name"] == "o"


def test_grad_report_flags_an_exploding_network(rng):
    init = keras.initializers.RandomNormal(stddev=4.0, seed=1)
    layers = [keras.Input((8,))]
    layers += [L.Dense(8, kernel_initializer=init, name=f"d{i}") for i in range(6)]
    model = keras.Sequential(layers + [L.Dense(1, name="out")])
    x = rng.normal(size=(4, 8)).astype("float32")
    rep = kgrad.grad_report(model, x, np.zeros((4, 1), "float32"), loss="mse")
    assert "exploding" in rep.layers["d0"].flags
    norms = [rep.layers[f"d{i}"].output_grad_norm for i in range(6)]
    assert norms[0] > 100 * norms[-1]  # the gradient grows towards the input
    healthy = kgrad.grad_report(_mlp(), rng.normal(size=(4, 3)).astype("float32"))
    assert healthy.flagged == {}


def test_grad_report_flags_a_dead_relu_layer_as_vanishing(rng):
    # Bias -100: the ReLU is off for every sample, so d loss / d (kernel, bias) is
    # exactly zero, while the gradient of its output (through "o") is not.
    dead = keras.initializers.Constant(-100.0)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            L.Dense(3, activation="relu", bias_initializer=dead, name="r"),
            L.Dense(1, name="o"),
        ]
    )
    rep = kgrad.grad_report(model, rng.normal(size=(4, 2)).astype("float32"))
    assert rep.layers["r"].weight_grad_norm == 0.0
    assert rep.layers["r"].output_grad_norm > 0.0
    assert rep.flagged == {"r": ("vanishing",)}


def test_grad_report_counts_nan_and_keeps_it(rng):
    model = keras.Sequential(
        [keras.Input((2,)), L.Dense(3, name="d"), L.Lambda(ops.log, name="log"), L.Dense(1)]
    )
    x = rng.normal(size=(4, 2)).astype("float32")  # some pre-activations are negative
    rep = kgrad.grad_report(model, x)
    assert rep.layers["log"].nan_count > 0 and "nan" in rep.layers["log"].flags
    assert np.isnan(rep.layers["log"].activation_norm)  # reported, never zeroed
    row = next(line for line in rep.to_text().splitlines() if line.startswith("log"))
    assert "nan" in row.split()[1]


def test_grad_report_plot(tmp_path, rng, monkeypatch):
    pytest.importorskip("matplotlib")
    rep = kgrad.grad_report(_mlp(), rng.normal(size=(4, 3)).astype("float32"))
    path = rep.plot(str(tmp_path / "flow.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"kgrad\[plot\]"):
        rep.plot(str(tmp_path / "again.png"))


def test_gradient_monitor_records_during_fit(tmp_path, rng):
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    monitor = kgrad.callbacks.GradientMonitor(x[:4], y[:4], every=2, log_dir=str(tmp_path / "tb"))
    model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[monitor])
    assert [epoch for epoch, _ in monitor.history] == [1, 3]
    # The last record used the trained weights: the same report computed now.
    now = kgrad.grad_report(model, x[:4], y[:4])
    last = monitor.history[-1][1]
    for name in now.layers:
        np.testing.assert_allclose(
            last.layers[name].weight_grad_norm, now.layers[name].weight_grad_norm, rtol=1e-5
        )
    first = monitor.history[0][1]
    assert first.layers["b"].weight_grad_norm != last.layers["b"].weight_grad_norm
    rows = open(monitor.to_csv(str(tmp_path / "g.csv"))).read().splitlines()
    assert rows[0].startswith("epoch,layer,") and len(rows) == 1 + 2 * 2
    data = json.load(open(monitor.to_json(str(tmp_path / "g.json"))))
    assert [d["epoch"] for d in data] == [1, 3]
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.")]
    assert events and os.path.getsize(tmp_path / "tb" / events[0]) > 100
    with pytest.raises(ValueError, match="every"):
        kgrad.callbacks.GradientMonitor(x, y, every=0)


def test_gradient_monitor_without_tensorboard(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="log_dir=.*pip install"):
        kgrad.callbacks.GradientMonitor(np.ones((2, 3), "float32"), log_dir="logs")


def test_report_cli_end_to_end(tmp_path, rng):
    model = _mlp()
    path = str(tmp_path / "m.keras")
    model.save(path)
    x = rng.normal(size=(4, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros((4, 2), "float32"))
    cmd = [
        sys.executable,
        "-m",
        "kgrad.tools.cli",
        "report",
        path,
        "--inputs",
        str(tmp_path / "x.npy"),
    ]
    env = dict(os.environ)
    res = subprocess.run(
        [*cmd, "--targets", str(tmp_path / "y.npy"), "--loss", "mse", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    expected = kgrad.grad_report(model, x, np.zeros((4, 2), "float32"), loss="mse")
    for row in data["layers"]:
        np.testing.assert_allclose(
            row["output_grad_norm"], expected.layers[row["name"]].output_grad_norm, rtol=1e-4
        )
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.splitlines()[0].startswith("layer")
    res = subprocess.run(
        [*cmd, "--targets", str(tmp_path / "y.npy")], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2 and "--loss" in res.stderr


def test_gradient_monitor_writes_tensorboard_scalars_without_tensorflow(tmp_path):
    # A fresh process under the active backend: only TensorFlow's own backend
    # may import it. The scalars read back with tensorboard's event reader.
    code = (
        "import sys, keras, numpy as np, kgrad\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name='d')])\n"
        "m.compile(optimizer='sgd', loss='mse')\n"
        "x, y = np.ones((4, 3), 'float32'), np.zeros((4, 2), 'float32')\n"
        f"mon = kgrad.callbacks.GradientMonitor(x, y, log_dir={str(tmp_path)!r})\n"
        "m.fit(x, y, epochs=2, verbose=0, callbacks=[mon])\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = proc.stdout.strip().splitlines()[-1] == "True"
    assert imported == (keras.backend.backend() == "tensorflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "grad_norm/d/weight_grad_norm" in tags
    assert [e.step for e in acc.Scalars("grad_norm/d/weight_grad_norm")] == [0, 1]
