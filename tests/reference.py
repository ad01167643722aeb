"""A small Keras MLP and its hand-derived NumPy forward and backward passes (float64)."""

import keras
import numpy as np

from kgrad import func


def mlp(name="mlp"):
    """x(3) -> Dense(4, tanh) -> Dropout -> Dense(3, tanh) -> Dense(2)."""
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="h1"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(3, activation="tanh", name="h2"),
            keras.layers.Dense(2, name="out"),
        ],
        name=name,
    )


def params(model):
    w = {
        k: np.asarray(keras.ops.convert_to_numpy(v), "float64")
        for k, v in func.weights_of(model).items()
    }
    n = model.name
    return [(w[f"{n}/{layer}/kernel"], w[f"{n}/{layer}/bias"]) for layer in ("h1", "h2", "out")]


def forward(p, x):
    (W1, b1), (W2, b2), (W3, b3) = p
    a1 = np.tanh(x @ W1 + b1)
    a2 = np.tanh(a1 @ W2 + b2)
    y = a2 @ W3 + b3
    return a1, a2, y


def backward(p, x, dy):
    """Given dObjective/dy, returns grads of inputs, activations and weights."""
    (W1, b1), (W2, b2), (W3, b3) = p
    a1, a2, _ = forward(p, x)
    g = {"out/kernel": a2.T @ dy, "out/bias": dy.sum(0)}
    da2 = dy @ W3.T
    dz2 = da2 * (1 - a2**2)
    g["h2/kernel"], g["h2/bias"] = a1.T @ dz2, dz2.sum(0)
    da1 = dz2 @ W2.T
    dz1 = da1 * (1 - a1**2)
    g["h1/kernel"], g["h1/bias"] = x.T @ dz1, dz1.sum(0)
    g["x"] = dz1 @ W1.T
    g["act/h1"] = da1
    g["act/drop"] = da1
    g["act/h2"] = da2
    g["act/out"] = dy
    return g


def input_jacobian(p, x):
    """Per-sample dy/dx: (B, 2, 3)."""
    (W1, b1), (W2, b2), (W3, b3) = p
    a1, a2, _ = forward(p, x)
    d1 = 1 - a1**2
    d2 = 1 - a2**2
    return np.einsum("ok,bk,kj,bj,ji->boi", W3.T, d2, W2.T, d1, W1.T)
