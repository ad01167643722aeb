"""Watched layers' output shapes come from the model's graph, without an extra forward pass.

References: NumPy backprop of ``y = tanh(x @ W1 + b1) @ W2 + b2`` and of a
two-input model.
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad


@pytest.fixture(autouse=True)
def _eager():
    # Every call runs eagerly, so the model's Python `call` runs once per forward pass.
    kgrad.set_jit_compile(False)
    yield
    kgrad.set_jit_compile(True)


class Counting(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return x


def _mlp():
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    out = keras.layers.Dense(2, name="o")(Counting(name="count")(h))
    return keras.Model(inp, out, name="mlp")


def _calls(model, **kwargs):
    counter = model.get_layer("count")
    before = counter.calls
    kgrad.grad(model, np.ones((5, 3), "float32"), **kwargs)
    return counter.calls - before


def test_activation_gradients_need_no_extra_forward_pass():
    model = _mlp()
    for wrt in ("inputs", "activations"):  # the first calls probe for interacting samples
        _calls(model, wrt=wrt)
    assert _calls(model, wrt="activations") == _calls(model, wrt="inputs")


def test_activation_gradients_from_the_graph_match_numpy(rng):
    model = _mlp()
    x = rng.normal(size=(5, 3)).astype("float32")
    (w1, b1), (w2, _) = (model.get_layer(n).weights for n in ("h", "o"))
    w1, b1, w2 = (np.asarray(v) for v in (w1, b1, w2))
    h = np.tanh(x @ w1 + b1)
    g = kgrad.grad(model, x, wrt="activations", layers=["h", "o"])
    np.testing.assert_allclose(np_(g["o"]), np.ones((5, 2)), atol=1e-6)
    np.testing.assert_allclose(np_(g["h"]), np.tile(w2.sum(axis=1), (5, 1)), atol=1e-5)
    gx = np_(kgrad.grad(model, x, wrt="inputs"))
    np.testing.assert_allclose(gx, ((1 - h**2) * w2.sum(axis=1)) @ w1.T, rtol=1e-4, atol=1e-5)


def test_a_two_input_model_and_a_subclassed_model_still_work(rng):
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    da = keras.layers.Dense(2, name="da")(a)
    joined = keras.layers.Concatenate(name="cat")([da, b])
    model = keras.Model([a, b], keras.layers.Dense(1, name="out")(joined))
    xa = rng.normal(size=(4, 2)).astype("float32")
    xb = rng.normal(size=(4, 3)).astype("float32")
    g = kgrad.grad(model, [xa, xb], wrt="activations", layers=["da", "cat"])
    w = np.asarray(model.get_layer("out").kernel)[:, 0]
    np.testing.assert_allclose(np_(g["cat"]), np.tile(w, (4, 1)), atol=1e-6)
    np.testing.assert_allclose(np_(g["da"]), np.tile(w[:2], (4, 1)), atol=1e-6)

    class Sub(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.d = keras.layers.Dense(2, name="d")

        def call(self, x):
            return keras.ops.sum(self.d(x) ** 2, axis=-1, keepdims=True)

    sub = Sub(name="sub")
    sub(xb)
    g = np_(kgrad.grad(sub, xb, wrt="activations", layers="d"))
    wd, bd = (np.asarray(v) for v in sub.d.weights)
    np.testing.assert_allclose(g, 2 * (xb @ wd + bd), rtol=1e-4, atol=1e-5)
