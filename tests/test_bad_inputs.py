"""The bad-input catalogue: every case raises a built-in exception that says what it received.

Also the documented behaviour at the edges that are not errors: mixed-precision
policies, Dropout with ``training=True``, non-differentiable ops, and NaN/Inf.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import reference as ref

import kgrad
from kgrad import backends, func

L = keras.layers
ops = keras.ops


def npy(t):
    return np.asarray(ops.convert_to_numpy(t))


def _mlp():
    return ref.mlp()


def _two_inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    out = L.Dense(1, name="d")(L.Concatenate()([a, b]))
    return keras.Model([a, b], out, name="two")


def _bn():
    return keras.Sequential([keras.Input((3,)), L.BatchNormalization(name="bn"), L.Dense(2)])


X = np.linspace(-1.0, 1.0, 12, dtype="float32").reshape(4, 3)
Y = np.zeros((4, 2), "float32")
VEC = ops.ones((3,))

# (case id, model factory or None, call(model) -> anything, exception type, pattern)
CATALOGUE = [
    (
        "unknown-layer",
        _mlp,
        lambda m: kgrad.grad(m, X, wrt="activations", layers="h3"),
        ValueError,
        r"No layer named 'h3'.*Received: layers='h3'.*Did you mean",
    ),
    (
        "unknown-of",
        _mlp,
        lambda m: kgrad.grad(m, X, of="outt"),
        ValueError,
        r"Received: of='outt'.*Did you mean 'out'",
    ),
    (
        "layer-index-out-of-range",
        _mlp,
        lambda m: kgrad.grad(m, X, wrt="weights", layers=7),
        ValueError,
        r"out of range.*Received: layers=7",
    ),
    (
        "layer-of-another-model",
        _mlp,
        lambda m: kgrad.grad(m, X, wrt="weights", layers=L.Dense(2, name="stranger")),
        ValueError,
        r"not part of model.*Received: layers='stranger'",
    ),
    (
        "layer-spec-type",
        _mlp,
        lambda m: kgrad.grad(m, X, wrt="weights", layers=1.5),
        TypeError,
        r"Received: layers=1.5",
    ),
    (
        "invalid-wrt",
        _mlp,
        lambda m: kgrad.grad(m, X, wrt="input"),
        ValueError,
        r"Received: wrt='input'.*Did you mean 'inputs'",
    ),
    (
        "integer-inputs",
        _mlp,
        lambda m: kgrad.grad(m, np.ones((2, 3), "int64")),
        TypeError,
        r"needs float inputs.*Received: x with dtype int(32|64).*wrt='activations'",
    ),
    (
        "boolean-inputs",
        _mlp,
        lambda m: kgrad.jacobian(m, np.ones((2, 3), bool)),
        TypeError,
        r"Received: x with dtype bool",
    ),
    (
        "target-out-of-range",
        _mlp,
        lambda m: kgrad.grad(m, X, target=2),
        ValueError,
        r"index 2 is out of range.*size 2.*Received: target=2",
    ),
    (
        "target-too-many-indices",
        _mlp,
        lambda m: kgrad.grad(m, X, target=(0, 0)),
        ValueError,
        r"Received: target=\(0, 0\).*at most 1",
    ),
    (
        "samples-interact-per-sample",
        _bn,
        lambda m: kgrad.jacobian(m, X, training=True),
        ValueError,
        r"\['bn'\].*per-sample results are undefined.*Received: training=True",
    ),
    (
        "oversize-jacobian",
        _mlp,
        lambda m: _with_budget(lambda: kgrad.jacobian(m, np.ones((64, 3), "float32"))),
        ValueError,
        r"Jacobian needs about .*Received: a request of.*chunk_size.*hvp",
    ),
    (
        "oversize-hessian",
        _mlp,
        lambda m: _with_budget(lambda: kgrad.hessian(m, X, wrt="weights")),
        ValueError,
        r"Hessian needs about .*Received: a request of",
    ),
    (
        "y-without-loss-uncompiled",
        _mlp,
        lambda m: kgrad.grad(m, X, y=Y),
        ValueError,
        r"not compiled with a loss.*Received: y of shape \(4, 2\), loss=None",
    ),
    (
        "loss-without-y",
        _mlp,
        lambda m: kgrad.grad(m, X, loss="mse"),
        ValueError,
        r"without targets.*Received: loss='mse', y=None",
    ),
    (
        "unbuilt-model",
        lambda: keras.Sequential([L.Dense(2)]),
        lambda m: kgrad.jacobian(m, X),
        ValueError,
        r"not built.*Received: an unbuilt Sequential.*model.build",
    ),
    (
        "empty-batch",
        _mlp,
        lambda m: kgrad.jacobian(m, np.zeros((0, 3), "float32")),
        ValueError,
        r"empty batch.*Received: x with batch size 0",
    ),
    (
        "jacobian-mode",
        _mlp,
        lambda m: kgrad.jacobian(m, X, mode="reverse"),
        ValueError,
        r"Received: mode='reverse'",
    ),
    (
        "chunk-size",
        _mlp,
        lambda m: kgrad.jacobian(m, X, chunk_size=0),
        ValueError,
        r"Received: chunk_size=0",
    ),
    # A non-scalar objective where a scalar is needed.
    (
        "func-grad-non-scalar",
        None,
        lambda _: func.grad(lambda v: v * 2.0)(VEC),
        ValueError,
        r"scalar-output.*Received: an output of shape \(3,\)",
    ),
    (
        "func-value-and-grad-non-scalar",
        None,
        lambda _: func.value_and_grad(lambda v: v * 2.0)(VEC),
        ValueError,
        r"scalar-output.*Received: an output of shape \(3,\)",
    ),
    (
        "func-hessian-non-scalar",
        None,
        lambda _: func.hessian(lambda v: v * 2.0)(VEC),
        ValueError,
        r"func.hessian.*scalar-output.*Received: an output of shape \(3,\)",
    ),
    (
        "func-grad-integer-output",
        None,
        lambda _: func.grad(lambda v: ops.sum(ops.cast(v, "int32")))(VEC),
        TypeError,
        r"has dtype int32.*Received: an output of dtype int32",
    ),
    (
        "per-sample-target-without-batch-axis",
        _mlp,
        lambda m: kgrad.jacobian(m, X, target=lambda y: ops.sum(y)),
        ValueError,
        r"keep the batch axis first.*shape \(\).*Received: target=.*per_sample=False",
    ),
    (
        "per-sample-hessian-target-without-batch-axis",
        _mlp,
        lambda m: kgrad.hessian(m, X, target=lambda y: ops.sum(y)),
        ValueError,
        r"keep the batch axis first.*Received: target=",
    ),
    # Shape mismatches.
    (
        "x-feature-shape",
        _mlp,
        lambda m: kgrad.grad(m, np.ones((4, 5), "float32")),
        ValueError,
        r"has shape \(None, 3\).*Received: x with shape \(4, 5\)",
    ),
    (
        "x-without-batch-axis",
        _mlp,
        lambda m: kgrad.jacobian(m, np.ones((3,), "float32")),
        ValueError,
        r"Received: x with shape \(3,\).*x\[None\]",
    ),
    (
        "x-weights-feature-shape",
        _mlp,
        lambda m: kgrad.grad(m, np.ones((4, 5), "float32"), wrt="weights"),
        ValueError,
        r"Received: x with shape \(4, 5\)",
    ),
    (
        "multi-input-count",
        _two_inputs,
        lambda m: kgrad.grad(m, X),
        ValueError,
        r"takes 2 input\(s\).*got 1\. Received: x with shapes \[\(4, 3\)\]",
    ),
    (
        "multi-input-order",
        _two_inputs,
        lambda m: kgrad.grad(m, [np.ones((4, 2), "float32"), X]),
        ValueError,
        r"input 0 has shape \(None, 3\).*Received: x with shape \(4, 2\)",
    ),
    (
        "multi-input-batch-sizes",
        _two_inputs,
        lambda m: kgrad.grad(m, [X, np.ones((5, 2), "float32")]),
        ValueError,
        r"same number of samples.*Received: x with shape \(4, 3\), x with shape \(5, 2\)",
    ),
    (
        "y-batch-size",
        _mlp,
        lambda m: kgrad.grad(m, X, y=np.zeros((5, 2)), loss="mse"),
        ValueError,
        r"same number of samples.*Received: x with shape \(4, 3\), y with shape \(5, 2\)",
    ),
    (
        "y-shape-vs-output",
        _mlp,
        lambda m: kgrad.grad(m, X, wrt="weights", y=np.zeros((4, 3)), loss="mse"),
        ValueError,
        r"Expected `y` of shape \(4, 2\).*Received: y with shape \(4, 3\), loss='mse'",
    ),
    (
        "y-shape-vs-output-hessian",
        _mlp,
        lambda m: kgrad.hessian(m, X, y=np.zeros((4,)), loss="mse"),
        ValueError,
        r"Expected `y` of shape \(4, 2\).*Received: y with shape \(4,\)",
    ),
    (
        "hvp-vector-shape-weights",
        _mlp,
        lambda m: kgrad.hvp(m, X, {"mlp/h1/kernel": np.ones((4, 3))}, y=Y, loss="mse"),
        ValueError,
        r"Expected \(3, 4\)\. Received: shape \(4, 3\)",
    ),
    (
        "hvp-vector-shape-inputs",
        _mlp,
        lambda m: kgrad.hvp(m, X, np.ones((4, 2), "float32"), wrt="inputs", y=Y, loss="mse"),
        ValueError,
        r"Expected \(4, 3\)\. Received: shape \(4, 2\)",
    ),
    (
        "hvp-vector-key",
        _mlp,
        lambda m: kgrad.hvp(m, X, {"mlp/h1/kernal": np.ones((3, 4))}, y=Y, loss="mse"),
        ValueError,
        r"Received: \['mlp/h1/kernal'\].*Did you mean 'mlp/h1/kernel'",
    ),
]


def _with_budget(fn):
    kgrad.set_memory_budget(1000)
    try:
        return fn()
    finally:
        kgrad.set_memory_budget(None)


@pytest.mark.parametrize(
    "make, call, error, pattern",
    [case[1:] for case in CATALOGUE],
    ids=[case[0] for case in CATALOGUE],
)
def test_catalogue(make, call, error, pattern):
    model = make() if make else None
    with pytest.raises(error, match=pattern) as info:
        call(model)
    assert type(info.value) in (ValueError, TypeError, NotImplementedError)
    assert "Received:" in str(info.value)


def test_catalogue_is_complete():
    assert len(CATALOGUE) >= 15
    assert len({case[0] for case in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("jit", [True, False])
def test_shape_errors_with_and_without_jit(jit):
    kgrad.set_jit_compile(jit)
    try:
        model = _mlp()
        kgrad.grad(model, X)
        for _ in range(2):  # the second call takes the compiled path
            with pytest.raises(ValueError, match=r"Received: x with shape \(4, 5\)"):
                kgrad.grad(model, np.ones((4, 5), "float32"))
            with pytest.raises(ValueError, match=r"Received: y with shape \(4, 3\)"):
                kgrad.grad(model, X, y=np.zeros((4, 3)), loss="mse")
    finally:
        kgrad.set_jit_compile(True)


def test_good_inputs_keras_accepts_still_work():
    """Keras's own leniency stays: a trailing axis of 1 and a dict of named inputs."""
    model = keras.Sequential([keras.Input((1,)), L.Dense(2, name="d")])
    assert tuple(kgrad.grad(model, np.ones((4,), "float32")).shape) == (4,)
    two = _two_inputs()
    x2 = np.ones((4, 2), "float32")
    by_list = kgrad.grad(two, [X, x2])
    by_name = kgrad.grad(two, {"b": x2, "a": X})
    np.testing.assert_allclose(npy(by_name["a"]), npy(by_list[0]), rtol=1e-6)
    np.testing.assert_allclose(npy(by_name["b"]), npy(by_list[1]), rtol=1e-6)
    # A sparse loss compares class indices with (B, C) outputs: not a shape error.
    g = kgrad.grad(
        _mlp(),
        X,
        wrt="weights",
        y=np.array([0, 1, 1, 0]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert all(np.isfinite(npy(v)).all() for v in g.values())


# ------------------------------------------------------------ unsupported backends


def test_numpy_backend_refused_in_a_subprocess():
    code = textwrap.dedent(
        """
        import keras, numpy as np
        import kgrad
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        for call in (lambda: kgrad.grad(model, np.ones((3, 2), "float32")),
                     lambda: kgrad.func.grad(lambda v: v.sum())(np.ones(2))):
            try:
                call()
            except Exception as err:
                print(type(err).__name__, "|", err)
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = (
        subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    assert len(out) == 2, out
    for line in out:
        kind, message = line.split(" | ", 1)
        assert kind == "NotImplementedError"
        assert "Received: keras.backend.backend()='numpy'" in message
        assert "KERAS_BACKEND=jax" in message and "jax, tensorflow, torch" in message


def test_openvino_backend_refused(monkeypatch):
    """OpenVINO is not installed here; kgrad refuses it by name before importing anything."""
    monkeypatch.setattr(backends, "name", lambda: "openvino")
    with pytest.raises(
        NotImplementedError, match=r"Received: keras.backend.backend\(\)='openvino'"
    ):
        kgrad.grad(_mlp(), X)
    with pytest.raises(NotImplementedError, match="openvino"):
        func.grad(lambda v: ops.sum(v))(VEC)


# ------------------------------------------------------------ mixed precision


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _tanh_mlp():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [keras.Input((3,)), L.Dense(16, activation="tanh", name="h"), L.Dense(2, name="o")],
        name="mp",
    )


def _rel(a, b):
    a, b = npy(a).astype("float64"), npy(b).astype("float64")
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize(
    "policy, tol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 1e-1)], indirect=["policy"]
)
def test_mixed_precision_dtypes_and_tolerance(policy, tol):
    keras.mixed_precision.set_global_policy("float32")
    reference = _tanh_mlp()
    keras.mixed_precision.set_global_policy(policy)
    model = _tanh_mlp()
    model.set_weights(reference.get_weights())
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    compute = policy.split("_")[1]
    # Derivatives come back in the dtype of what they are taken with respect to:
    # float32 inputs and float32 (variable-dtype) weights.
    g = kgrad.grad(model, x)
    assert kgrad._errors.dtype_name(g) == "float32"
    assert _rel(g, kgrad.grad(reference, x)) < tol
    assert _rel(kgrad.jacobian(model, x), kgrad.jacobian(reference, x)) < tol
    assert _rel(kgrad.hessian(model, x, target=0), kgrad.hessian(reference, x, target=0)) < tol
    # Forward mode and the operators too (forward mode carries the compute dtype).
    v = np.ones((8, 3), "float32")
    pairs = {
        "jacobian fwd": lambda m: kgrad.jacobian(m, x, mode="fwd"),
        "laplacian": lambda m: kgrad.laplacian(m, x),
        "partial": lambda m: kgrad.partial(m, x, (0, 1)),
        "divergence": lambda m: kgrad.divergence(
            keras.Sequential([keras.Input((3,)), L.Dense(3, activation="tanh")]), x
        ),
        "taylor": lambda m: kgrad.taylor(m, x, v, 2)[2],
    }
    for name, f in pairs.items():
        got = f(model)
        assert kgrad._errors.dtype_name(got) == "float32", name
        if name != "divergence":  # its model is built under each policy with other weights
            assert _rel(got, f(reference)) < tol, name
    jw = kgrad.jacobian(model, x, wrt="weights", mode="fwd")
    assert {kgrad._errors.dtype_name(t) for t in jw.values()} == {"float32"}
    # check_grad steps and tolerances follow the compute dtype, not x's float32.
    for kw in ({}, dict(wrt="weights", y=Y.repeat(2, 0), loss="mse")):
        result = kgrad.check_grad(model, x, **kw)
        assert result.precision == compute and result.ok, result
    wg = kgrad.grad(model, x, wrt="weights", y=Y.repeat(2, 0), loss="mse")
    wr = kgrad.grad(reference, x, wrt="weights", y=Y.repeat(2, 0), loss="mse")
    for k in wr:
        assert kgrad._errors.dtype_name(wg[k]) == "float32"
        assert _rel(wg[k], wr[k]) < tol
    # Values and activations are in the policy's compute dtype, as the model computes them.
    value, _ = kgrad.value_and_grad(model, x, y=Y.repeat(2, 0), loss="mse")
    assert kgrad._errors.dtype_name(value) == compute
    lg = kgrad.layer_grad(model, x)["h"]
    assert kgrad._errors.dtype_name(lg.output) == compute
    assert kgrad._errors.dtype_name(lg.output_grad) == compute


# ------------------------------------------------------------ Dropout with training=True


def _dropout_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(8, activation="tanh", name="h"),
            L.Dropout(0.5, name="drop"),
            L.Dense(2, name="o"),
        ],
        name="dr",
    )


def test_dropout_training_uses_one_mask_per_call_and_repeats():
    model = _dropout_model()
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    first = npy(kgrad.grad(model, x, training=True))
    # Dropout is active: the result differs from inference mode.
    assert not np.allclose(first, npy(kgrad.grad(model, x)))
    # The mask comes from the model's seed state, which kgrad does not advance.
    np.testing.assert_array_equal(npy(kgrad.grad(model, x, training=True)), first)
    kgrad.set_jit_compile(False)
    try:
        np.testing.assert_allclose(npy(kgrad.grad(model, x, training=True)), first, rtol=1e-6)
    finally:
        kgrad.set_jit_compile(True)
    # Every forward pass of one call sees the same mask: reverse and forward mode
    # agree, and finite differences of the value match the gradient.
    rev = kgrad.jacobian(model, x, training=True, mode="rev")
    fwd = kgrad.jacobian(model, x, training=True, mode="fwd")
    np.testing.assert_allclose(npy(rev), npy(fwd), rtol=1e-5, atol=1e-6)
    assert kgrad.check_grad(model, x, training=True).ok
    assert kgrad.check_grad(model, x, wrt="weights", training=True).ok
    # A new seed state draws a new mask.
    state = model.get_layer("drop").seed_generator.state
    state.assign(ops.convert_to_numpy(state.value) + 7)
    assert not np.allclose(npy(kgrad.grad(model, x, training=True)), first)


# ------------------------------------------------------------ non-differentiable ops

NON_DIFFERENTIABLE = {
    "argmax": lambda t: ops.cast(ops.argmax(t, axis=-1), "float32")[:, None] + 0.0 * t,
    "round": ops.round,
    "sign": ops.sign,
    "floor": ops.floor,
    "int-cast": lambda t: ops.cast(ops.cast(t * 3.0, "int32"), "float32"),
}


@pytest.mark.parametrize("op", list(NON_DIFFERENTIABLE))
def test_non_differentiable_ops_give_zero_gradients(op):
    fn = NON_DIFFERENTIABLE[op]
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, name="d"), L.Lambda(fn, name="step"), L.Dense(2, name="o")],
        name="nd",
    )
    x = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    np.testing.assert_array_equal(npy(kgrad.grad(model, x)), np.zeros_like(x))
    np.testing.assert_array_equal(npy(kgrad.jacobian(model, x)), np.zeros((4, 2, 3)))
    g = kgrad.grad(model, x, wrt="weights")
    np.testing.assert_array_equal(npy(g["nd/d/kernel"]), np.zeros((3, 4)))
    # The layers after the step still get their gradients: d sum(a @ W + b) / dW = a^T 1.
    a = npy(kgrad.layer_grad(model, x)["step"].output)  # the forward values
    np.testing.assert_allclose(npy(g["nd/o/kernel"]), a.T @ np.ones((4, 2)), rtol=1e-6)


def test_one_hot_of_argmax_is_a_constant_mask():
    fn = lambda t: ops.one_hot(ops.argmax(t, axis=-1), 4) * t
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, name="d"), L.Lambda(fn, name="pick"), L.Dense(1, name="o")],
        name="oh",
    )
    x = np.random.default_rng(2).normal(size=(5, 3)).astype("float32")
    kernel, bias = (npy(v) for v in model.get_layer("d").weights)
    w_out = npy(model.get_layer("o").weights[0])[:, 0]
    mask = np.eye(4)[np.argmax(x @ kernel + bias, axis=-1)]
    expected = (mask * w_out) @ kernel.T  # the mask is a constant: no gradient through argmax
    np.testing.assert_allclose(npy(kgrad.grad(model, x)), expected, rtol=1e-5, atol=1e-6)


def test_integer_model_output_is_refused():
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(4), L.Lambda(lambda t: ops.argmax(t, axis=-1), name="cls")]
    )
    with pytest.raises(TypeError, match=r"dtype int(32|64).*Received: an output of dtype"):
        kgrad.grad(model, X)


# ------------------------------------------------------------ NaN and Inf


def _root_model():
    return keras.Sequential(
        [
            keras.Input((3,)),
            L.Lambda(ops.sqrt, name="root"),
            L.Dense(1, kernel_initializer="ones", name="d"),
        ],
        name="nan",
    )


def test_nan_and_inf_propagate_through_model_level_calls():
    model = _root_model()
    x = np.array([[0.0, -1.0, 4.0], [1.0, 4.0, 9.0]], "float32")
    g = npy(kgrad.grad(model, x))
    assert np.isposinf(g[0, 0]) and np.isnan(g[0, 1]) and g[0, 2] == pytest.approx(0.25)
    np.testing.assert_allclose(g[1], 0.5 / np.sqrt(x[1]), rtol=1e-6)
    j = npy(kgrad.jacobian(model, x))
    assert np.isposinf(j[0, 0, 0]) and np.isnan(j[0, 0, 1])
    np.testing.assert_allclose(j[1, 0], 0.5 / np.sqrt(x[1]), rtol=1e-6)
    h = npy(kgrad.hessian(model, x, target=0))
    assert not np.isfinite(h[0, 0, 0]) and np.isnan(h[0, 1, 1])
    assert h[0, 2, 2] == pytest.approx(-0.25 * 4.0**-1.5)
    np.testing.assert_allclose(np.diag(h[1]), -0.25 * x[1] ** -1.5, rtol=1e-5)
    wg = npy(kgrad.grad(model, x, wrt="weights")["nan/d/kernel"])
    assert np.isnan(wg[1, 0]) and wg[2, 0] == pytest.approx(5.0)
    value, _ = kgrad.value_and_grad(model, x)
    assert np.isnan(npy(value))


def test_grad_report_counts_nan_and_inf():
    model = _root_model()
    x = np.array([[0.0, -1.0, 4.0], [1.0, 4.0, 9.0]], "float32")
    report = kgrad.grad_report(model, x, np.zeros((2, 1)), loss="mse")
    root, dense = report.layers["root"], report.layers["d"]
    assert root.nan_count > 0 and "nan" in root.flags
    assert dense.nan_count > 0 and "nan" in dense.flags
    assert report.nan_count >= root.nan_count + dense.nan_count
    clean = kgrad.grad_report(model, np.abs(x) + 1.0, np.zeros((2, 1)), loss="mse")
    assert clean.nan_count == 0 and clean.inf_count == 0
    # Inf alone: an infinite activation, and the kernel gradient it gives.
    inf_report = kgrad.grad_report(model, np.array([[np.inf, 1.0, 4.0]], "float32"))
    assert inf_report.layers["root"].inf_count > 0 and "inf" in inf_report.layers["root"].flags
    assert inf_report.layers["d"].inf_count > 0
    assert inf_report.nan_count == 0
