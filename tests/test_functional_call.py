"""functional_call and weights_of: weight gradients against hand-derived NumPy backprop."""

import keras
import numpy as np
import pytest
from helpers import assert_close, np_

from kgrad import func

ops = keras.ops


def _mlp():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="mlp",
    )
    return model


def _numpy_backprop(params, x):
    """Gradient of sum(out**2) for the tanh MLP above, derived by hand."""
    W1, b1, W2, b2 = (params[k] for k in ("W1", "b1", "W2", "b2"))
    h = np.tanh(x @ W1 + b1)
    y = h @ W2 + b2
    dy = 2 * y
    dW2 = h.T @ dy
    db2 = dy.sum(0)
    dh = dy @ W2.T
    dz = dh * (1 - h**2)
    return {"W1": x.T @ dz, "b1": dz.sum(0), "W2": dW2, "b2": db2}


def test_weight_gradients_match_numpy_backprop(rng):
    model = _mlp()
    x = rng.normal(size=(5, 3)).astype("float32")
    w = func.weights_of(model)
    assert list(w) == [v.path for v in model.trainable_variables]
    loss = lambda w: ops.sum(func.functional_call(model, w, x) ** 2)
    g = func.grad(loss)(w)
    params = {
        "W1": np_(w["mlp/hidden/kernel"]).astype("float64"),
        "b1": np_(w["mlp/hidden/bias"]).astype("float64"),
        "W2": np_(w["mlp/out/kernel"]).astype("float64"),
        "b2": np_(w["mlp/out/bias"]).astype("float64"),
    }
    ref = _numpy_backprop(params, x.astype("float64"))
    assert_close(g["mlp/hidden/kernel"], ref["W1"], rtol=1e-4, atol=1e-5)
    assert_close(g["mlp/hidden/bias"], ref["b1"], rtol=1e-4, atol=1e-5)
    assert_close(g["mlp/out/kernel"], ref["W2"], rtol=1e-4, atol=1e-5)
    assert_close(g["mlp/out/bias"], ref["b2"], rtol=1e-4, atol=1e-5)
    # The gradient is not all zeros (torch.func.functional_call gives zeros here).
    assert np.abs(np_(g["mlp/hidden/kernel"])).sum() > 1e-3


def test_functional_call_uses_the_given_weights_not_the_variables(rng):
    model = _mlp()
    x = rng.normal(size=(2, 3)).astype("float32")
    w = {k: ops.zeros_like(v) for k, v in func.weights_of(model).items()}
    assert_close(func.functional_call(model, w, x), np.zeros((2, 2)))
    # Missing keys fall back to the variables' current values.
    assert_close(func.functional_call(model, {}, x), np_(model(x)))
    # Variables are untouched.
    assert np.abs(np_(model.layers[0].kernel)).sum() > 0


def test_weights_of_all_and_batchnorm_state_is_not_updated(rng):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1)],
        name="bnnet",
    )
    every = func.weights_of(model, trainable=False)
    assert "bnnet/bn/moving_mean" in every and "bnnet/bn/gamma" in every
    assert "bnnet/bn/moving_mean" not in func.weights_of(model)
    before = [np_(v.value).copy() for v in model.variables]
    x = rng.normal(size=(8, 3)).astype("float32") * 5 + 3
    out = func.functional_call(model, func.weights_of(model), x, training=True)
    # training=True normalises with the batch statistics ...
    bn_out = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    kernel, bias = np_(model.layers[1].kernel), np_(model.layers[1].bias)
    assert_close(out, bn_out @ kernel + bias, rtol=1e-3, atol=1e-4)
    # ... and leaves every variable, moving statistics included, unchanged.
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, np_(v.value))


def test_weights_of_is_a_snapshot(rng):
    model = _mlp()
    w = func.weights_of(model)
    before = np_(w["mlp/out/bias"]).copy()
    model.layers[1].bias.assign(ops.ones((2,)))
    np.testing.assert_array_equal(np_(w["mlp/out/bias"]), before)
    np.testing.assert_array_equal(np_(func.weights_of(model)["mlp/out/bias"]), 1.0)


def test_functional_call_errors(rng):
    model = _mlp()
    x = rng.normal(size=(2, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"Received: \['mlp/hiden/kernel'\].*Did you mean"):
        func.functional_call(model, {"mlp/hiden/kernel": np.zeros((3, 4))}, x)
    with pytest.raises(ValueError, match=r"wrong shape.*Received: shape \(4, 3\)"):
        func.functional_call(model, {"mlp/hidden/kernel": np.zeros((4, 3), "float32")}, x)
    with pytest.raises(TypeError, match="dict"):
        func.functional_call(model, [1, 2], x)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        func.weights_of(unbuilt)


def test_second_order_through_functional_call(rng):
    """d/dx of the weight gradient: mixed second derivatives through the model."""
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, name="lin")], name="lin"
    )
    k = float(np_(model.layers[0].kernel)[0, 0])
    # f(w, x) = (w x)^3 ; d^2 f / dw dx = 9 w^2 x^2
    f = lambda w, x: ops.sum(func.functional_call(model, w, x) ** 3)
    dfdw = lambda x, w: func.grad(f)(w, x)["lin/lin/kernel"][0, 0]
    x0 = np.array([[0.7]], dtype="float32")
    mixed = func.grad(dfdw)(x0, func.weights_of(model))
    assert_close(mixed, [[9 * k**2 * 0.7**2]], rtol=1e-4)


class _NoTrainingArg(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.d = keras.layers.Dense(2, name="d")

    def call(self, x):  # no `training` argument, as many subclassed models
        return self.d(x)


def test_functional_call_on_a_subclassed_model_without_training_arg(rng):
    model = _NoTrainingArg()
    x = rng.normal(size=(3, 4)).astype("float32")
    model(x)
    w = func.weights_of(model)
    out = func.functional_call(model, w, x, training=True)
    assert_close(out, np_(model(x)))
    g = func.grad(lambda w: ops.sum(func.functional_call(model, w, x)))(w)
    assert_close(g[model.d.bias.path], [3.0, 3.0])
