"""What kgrad's compiled-call cache keys on, and what it must never freeze.

References are NumPy backprop of a one-layer tanh model,
``y = tanh(x @ W + b)``: ``d sum(y) / dW = x.T @ (1 - y**2)``.
"""

import dataclasses
import logging

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad
from kgrad import _compiled

BACKEND = keras.backend.backend()
ops = keras.ops
CACHES = BACKEND in ("jax", "tensorflow")  # torch runs model-level calls eagerly


def _model():
    inp = keras.Input((3,))
    return keras.Model(inp, keras.layers.Dense(2, activation="tanh", name="d")(inp), name="net")


def _np_kernel_grad(x, w, b, select=None):
    y = np.tanh(x @ w + b)
    upstream = np.ones_like(y) if select is None else select
    return x.T @ ((1 - y**2) * upstream)


def test_a_users_stateless_scope_reaches_compiled_calls(rng):
    model = _model()
    x = rng.normal(size=(5, 3)).astype("float32")
    own = [np.array(v) for v in model.get_weights()]
    mapped = [rng.normal(size=v.shape).astype("float32") for v in own]
    mapping = list(zip(model.trainable_variables, [ops.convert_to_tensor(m) for m in mapped]))
    for _ in range(3):  # the first call compiles, the next reuse it
        with keras.StatelessScope(state_mapping=mapping):
            g = np_(kgrad.grad(model, x, wrt="weights"))[model.get_layer("d").kernel.path]
        np.testing.assert_allclose(g, _np_kernel_grad(x, *mapped), rtol=1e-4, atol=1e-5)
        # Outside the scope the model's own weights, never the mapped values frozen in.
        g = np_(kgrad.grad(model, x, wrt="weights"))[model.get_layer("d").kernel.path]
        np.testing.assert_allclose(g, _np_kernel_grad(x, *own), rtol=1e-4, atol=1e-5)


class _Counting(keras.Model):
    """Counts how often Python runs its ``call`` (tracing runs it, compiled code does not)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d = keras.layers.Dense(2, activation="tanh", name="d")
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return self.d(x)


@pytest.mark.skipif(not CACHES, reason="torch runs model-level calls eagerly")
def test_calls_in_and_out_of_a_users_scope_trace_once_each(rng):
    # On TensorFlow the state is tf.Variables outside a scope and tensors inside
    # one; each kind is traced once, then its traced function is called directly.
    model = _Counting(name="counting")
    x = rng.normal(size=(5, 3)).astype("float32")
    model(x)
    own = [np.array(v) for v in model.get_weights()]
    mapped = [rng.normal(size=v.shape).astype("float32") for v in own]
    mapping = list(zip(model.trainable_variables, [ops.convert_to_tensor(m) for m in mapped]))
    model.calls = 0
    for _ in range(3):
        g = np_(kgrad.grad(model, x, wrt="weights"))[model.d.kernel.path]
        np.testing.assert_allclose(g, _np_kernel_grad(x, *own), rtol=1e-4, atol=1e-5)
        with keras.StatelessScope(state_mapping=mapping):
            g = np_(kgrad.grad(model, x, wrt="weights"))[model.d.kernel.path]
        np.testing.assert_allclose(g, _np_kernel_grad(x, *mapped), rtol=1e-4, atol=1e-5)
    assert model.calls <= 2, model.calls
    # New weights reach the traced function (they are arguments, never constants).
    model.set_weights([w * 2 for w in own])
    g = np_(kgrad.grad(model, x, wrt="weights"))[model.d.kernel.path]
    np.testing.assert_allclose(g, _np_kernel_grad(x, *[w * 2 for w in own]), rtol=1e-4, atol=1e-5)
    assert model.calls <= 2, model.calls


def test_recompiling_the_model_changes_the_compiled_loss(rng):
    # `y` without `loss` uses the compiled loss; `compile()` replaces it, and a
    # new object may reuse a freed one's id.
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp), name="net")
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    w, b = (np.array(v) for v in model.get_weights())
    residual = x @ w + b - y
    want = {
        "mse": x.T @ (2 * residual) / residual.size,
        "mae": x.T @ np.sign(residual) / residual.size,
    }
    for name in ["mse", "mae"] * 4:
        model.compile(loss=name)
        g = np_(kgrad.grad(model, x, wrt="weights", y=y))[model.get_layer("d").kernel.path]
        np.testing.assert_allclose(g, want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_an_inline_lambda_target_reuses_its_compiled_call(rng):
    model = _model()
    x = rng.normal(size=(4, 3)).astype("float32")
    w, b = (np.array(v) for v in model.get_weights())
    kgrad.clear_cache()
    for _ in range(4):
        g = kgrad.grad(model, x, wrt="weights", target=lambda y: y[:, 0])
    select = np.zeros((4, 2), "float32")
    select[:, 0] = 1
    np.testing.assert_allclose(
        np_(g)[model.get_layer("d").kernel.path],
        _np_kernel_grad(x, w, b, select),
        rtol=1e-4,
        atol=1e-5,
    )
    if CACHES:
        assert _compiled.cache_size(model) == 1


def test_a_lambda_whose_captured_value_changed_is_not_reused(rng):
    model = _model()
    x = rng.normal(size=(4, 3)).astype("float32")
    w, b = (np.array(v) for v in model.get_weights())
    kgrad.clear_cache()
    for unit in (0, 1, 0):
        g = np_(kgrad.grad(model, x, wrt="weights", target=lambda y: y[:, unit]))  # noqa: B023
        select = np.zeros((4, 2), "float32")
        select[:, unit] = 1
        np.testing.assert_allclose(
            g[model.get_layer("d").kernel.path],
            _np_kernel_grad(x, w, b, select),
            rtol=1e-4,
            atol=1e-5,
        )
    if CACHES:
        assert _compiled.cache_size(model) == 2
    # A captured array cannot be keyed: the call runs eagerly, with the new values.
    for scale in (1.0, 3.0):
        weights = ops.convert_to_tensor(np.array([scale, 0.0], "float32"))
        g = np_(kgrad.grad(model, x, wrt="weights", target=lambda y: y * weights))  # noqa: B023
        select = np.tile(np_(weights), (4, 1))
        np.testing.assert_allclose(
            g[model.get_layer("d").kernel.path],
            _np_kernel_grad(x, w, b, select),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's retracing warning")
def test_ordinary_calls_do_not_warn_about_retracing(rng, caplog):
    model = _model()
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    with caplog.at_level(logging.WARNING):
        for n in (4, 3, 2):  # new signatures too
            xs, ys = x[:n], y[:n]
            kgrad.grad(model, xs)
            kgrad.grad(model, xs, wrt="weights")
            kgrad.value_and_grad(model, xs, y=ys, loss="mse")
            kgrad.jacobian(model, xs)
            kgrad.hessian(model, xs, target=0)
            kgrad.hvp(model, xs, ops.ones_like(xs), wrt="inputs")
            kgrad.layer_grad(model, xs, ys, loss="mse")
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


def _np_input_grad(x, layers):
    """d sum(model(x)) / dx per sample for a chain of tanh Dense layers (NumPy backprop)."""
    acts = [x.astype("float64")]
    for w, b in layers:
        acts.append(np.tanh(acts[-1] @ w + b))
    upstream = np.ones_like(acts[-1])
    for (w, _), out in zip(reversed(layers), reversed(acts[1:])):
        upstream = ((1 - out**2) * upstream) @ w.T
    return upstream


def _kernels(layers):
    return [(np.asarray(layer.kernel), np.asarray(layer.bias)) for layer in layers]


def test_a_layer_added_after_cached_calls_is_seen(rng):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh")])
    x = rng.normal(size=(5, 3)).astype("float32")
    for _ in range(2):  # the second call is a cached one
        g = np_(kgrad.grad(model, x))
    np.testing.assert_allclose(g, _np_input_grad(x, _kernels(model.layers)), rtol=1e-4, atol=1e-5)
    model.add(keras.layers.Dense(2, activation="tanh"))
    for _ in range(2):
        g = np_(kgrad.grad(model, x))
        np.testing.assert_allclose(
            g, _np_input_grad(x, _kernels(model.layers)), rtol=1e-4, atol=1e-5
        )


class Outer(keras.Model):
    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x)


def test_a_layer_added_to_a_nested_model_is_seen(rng):
    # The new layer sits two levels down: the outer model's own lists do not change.
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh")])
    model = Outer(inner, name="outer")
    x = rng.normal(size=(4, 3)).astype("float32")
    model(x)
    for _ in range(2):
        g = kgrad.grad(model, x, wrt="weights")
    assert len(g) == 2
    inner.add(keras.layers.Dense(3, activation="tanh"))
    for _ in range(2):
        g = np_(kgrad.grad(model, x))
        np.testing.assert_allclose(
            g, _np_input_grad(x, _kernels(inner.layers)), rtol=1e-4, atol=1e-5
        )
    assert len(kgrad.grad(model, x, wrt="weights")) == 4


def test_a_variable_frozen_on_its_own_is_seen(rng):
    # `variable.trainable = False` leaves every layer's flag as it was.
    model = _model()
    x = rng.normal(size=(4, 3)).astype("float32")
    kernel = model.get_layer("d").kernel
    for _ in range(2):
        assert kernel.path in kgrad.grad(model, x, wrt="weights")
    kernel.trainable = False
    try:
        for _ in range(2):
            assert sorted(kgrad.grad(model, x, wrt="weights")) == [model.get_layer("d").bias.path]
    finally:
        kernel.trainable = True
    w, b = (np.asarray(v) for v in model.get_layer("d").weights)
    g = np_(kgrad.grad(model, x, wrt="weights"))[kernel.path]
    np.testing.assert_allclose(g, _np_kernel_grad(x, w, b), rtol=1e-4, atol=1e-5)


def test_the_cache_key_holds_the_variables_not_their_ids(rng):
    from kgrad import _spec

    model = _model()
    x = rng.normal(size=(4, 3)).astype("float32")
    for _ in range(2):
        kgrad.grad(model, x, wrt="weights")
    if not CACHES:
        return
    (spec,) = list(_compiled._cache[model])
    assert isinstance(spec, _spec.Spec)
    held = spec.variables.items
    assert all(a is b for a, b in zip(held, model.variables)) and len(held) == len(model.variables)
    assert spec.model() is model  # weakly
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.fname = "hessian"
