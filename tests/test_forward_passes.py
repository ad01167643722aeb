"""Jacobians run the model once per ``wrt`` kind, not once per leaf.

A ``Count`` layer (the identity) counts how often the model runs in eager mode
(``kgrad.set_jit_compile(False)``); a traced or mapped pass counts once. The
numbers are checked against central differences of a float64 NumPy forward
pass of the same weights.
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

L = keras.layers


class Count(L.Layer):
    """The identity, counting its calls."""

    calls = 0

    def call(self, x):
        Count.calls += 1
        return x


@pytest.fixture(autouse=True)
def _eager():
    previous = kgrad.get_jit_compile()
    kgrad.set_jit_compile(False)
    yield
    kgrad.set_jit_compile(previous)


def _mlp():
    return keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(5, activation="tanh", name="d1"),
            Count(name="count"),
            L.Dense(5, activation="tanh", name="d2"),
            L.Dense(3, name="d3"),
        ],
        name="mlp",
    )


def _np_mlp(w, x):
    """The MLP in float64 NumPy; ``w`` maps variable paths to arrays."""
    h = np.tanh(x @ w["mlp/d1/kernel"] + w["mlp/d1/bias"])
    h = np.tanh(h @ w["mlp/d2/kernel"] + w["mlp/d2/bias"])
    return h @ w["mlp/d3/kernel"] + w["mlp/d3/bias"]


def _central(f, value, eps=1e-6):
    """d f / d value by central differences: (*f.shape, *value.shape)."""
    base = f(value)
    jac = np.zeros(base.shape + value.shape)
    for idx in np.ndindex(value.shape):
        step = np.zeros_like(value)
        step[idx] = eps
        jac[(Ellipsis, *idx)] = (f(value + step) - f(value - step)) / (2 * eps)
    return jac


def _count(call):
    Count.calls = 0
    out = call()
    return out, Count.calls


@pytest.mark.parametrize("mode", ["auto", "rev"])
def test_weight_jacobian_runs_the_model_once(mode):
    model = _mlp()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    model(x)  # built; the count starts below
    jac, calls = _count(lambda: kgrad.jacobian(model, x, wrt="weights", mode=mode))
    assert calls == 1, f"{calls} forward passes for one Jacobian over 6 weights"
    w = {v.path: np_(v).astype("float64") for v in model.trainable_variables}
    x64 = x.astype("float64")
    assert list(jac) == list(w)
    for path, value in w.items():

        def f(v, path=path):
            return _np_mlp({**w, path: v}, x64)

        np.testing.assert_allclose(np_(jac[path]), _central(f, value), rtol=1e-4, atol=1e-5)


def test_forward_mode_weight_jacobian_runs_one_mapped_pass():
    model = _mlp()
    x = np.random.default_rng(1).normal(size=(2, 4)).astype("float32")
    model(x)
    jac, calls = _count(lambda: kgrad.jacobian(model, x, wrt="weights", mode="fwd", layers=["d3"]))
    # One pass for the output's shape, one mapped pass for every column of both
    # weights (d3's kernel and bias), not one per weight.
    assert calls <= 2, calls
    w = {v.path: np_(v).astype("float64") for v in model.trainable_variables}
    for path in ("mlp/d3/kernel", "mlp/d3/bias"):
        ref = _central(lambda v, path=path: _np_mlp({**w, path: v}, x.astype("float64")), w[path])
        np.testing.assert_allclose(np_(jac[path]), ref, rtol=1e-4, atol=1e-5)


def _two_inputs():
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    h = L.Concatenate()([a, b])
    h = L.Dense(4, activation="tanh", name="d1")(h)
    h = Count(name="count")(h)
    return keras.Model([a, b], L.Dense(2, name="d2")(h), name="two")


def _built_two_inputs(seed):
    """The two-input model, built, and a batch of 3 for each input."""
    model = _two_inputs()
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, 6)).astype("float32")
    b = rng.normal(size=(3, 4)).astype("float32")
    model([a, b])
    return model, a, b


def _np_two(w, a, b):
    h = np.tanh(np.concatenate([a, b], -1) @ w["d1/kernel"] + w["d1/bias"])
    return h @ w["d2/kernel"] + w["d2/bias"]


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_per_sample_input_jacobian_of_two_inputs_runs_the_model_once_per_mode(mode):
    model, a, b = _built_two_inputs(seed=2)
    kgrad.jacobian(model, [a, b], mode=mode)  # once: the cached check that samples are apart
    jac, calls = _count(lambda: kgrad.jacobian(model, [a, b], mode=mode))
    # Reverse mode: the vjp's forward pass. Forward mode: one pass for the
    # output's shape and one mapped pass for the 10 features of both inputs.
    assert calls == (1 if mode == "rev" else 2), calls
    w = {v.path: np_(v).astype("float64") for v in model.trainable_variables}
    a64, b64 = a.astype("float64"), b.astype("float64")
    for i in range(len(a)):  # each sample's Jacobian against differences of that sample
        ai, bi = a64[i : i + 1], b64[i : i + 1]
        ja = _central(lambda v, bi=bi: _np_two(w, v, bi)[0], ai)[:, 0]
        jb = _central(lambda v, ai=ai: _np_two(w, ai, v)[0], bi)[:, 0]
        np.testing.assert_allclose(np_(jac[0])[i], ja, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np_(jac[1])[i], jb, rtol=1e-4, atol=1e-5)


def test_full_input_jacobian_of_two_inputs_runs_the_model_once():
    model = _two_inputs()
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 6)).astype("float32")
    b = rng.normal(size=(2, 4)).astype("float32")
    model([a, b])
    jac, calls = _count(lambda: kgrad.jacobian(model, [a, b], per_sample=False, mode="rev"))
    assert calls == 1, calls
    w = {v.path: np_(v).astype("float64") for v in model.trainable_variables}
    a64, b64 = a.astype("float64"), b.astype("float64")
    np.testing.assert_allclose(
        np_(jac[0]), _central(lambda v: _np_two(w, v, b64), a64), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        np_(jac[1]), _central(lambda v: _np_two(w, a64, v), b64), rtol=1e-4, atol=1e-5
    )


def _second_differences(f, value, eps=1e-4):
    """d2 f / d value2 by central differences of a float64 ``f``: (*f.shape, *v.shape, *v.shape)."""
    base = f(value)
    hess = np.zeros(base.shape + value.shape + value.shape)
    for i in np.ndindex(value.shape):
        for j in np.ndindex(value.shape):
            ei, ej = np.zeros_like(value), np.zeros_like(value)
            ei[i], ej[j] = eps, eps
            d = f(value + ei + ej) - f(value + ei - ej) - f(value - ei + ej) + f(value - ei - ej)
            hess[(Ellipsis, *i, *j)] = d / (4 * eps**2)
    return hess


@pytest.mark.parametrize("target", [0, None])
def test_per_sample_input_hessian_of_two_inputs_runs_the_model_once(target):
    model, a, b = _built_two_inputs(seed=4)
    kgrad.hessian(model, [a, b], target=target)  # once: the cached check that samples are apart
    hess, calls = _count(lambda: kgrad.hessian(model, [a, b], target=target))
    # One pass for the output's shape and one (mapped) pass for the second
    # derivatives of both inputs, not one per input.
    assert calls == 2, calls
    w = {v.path: np_(v).astype("float64") for v in model.trainable_variables}
    a64, b64 = a.astype("float64"), b.astype("float64")
    pick = (lambda y: y[0]) if target is None else (lambda y: y[0, 0])
    for i in range(len(a)):  # each sample's blocks against second differences of that sample
        ai, bi = a64[i : i + 1], b64[i : i + 1]
        ha = _second_differences(lambda v, bi=bi: pick(_np_two(w, v, bi)), ai)[..., 0, :, 0, :]
        hb = _second_differences(lambda v, ai=ai: pick(_np_two(w, ai, v)), bi)[..., 0, :, 0, :]
        np.testing.assert_allclose(np_(hess[0])[i], ha, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np_(hess[1])[i], hb, rtol=1e-3, atol=1e-4)
