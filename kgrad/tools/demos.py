"""Built-in demo models for ``kgrad compare``: small, deterministic, varied.

Each demo is a function returning ``(model, x, y, extra)``: a built Keras model
with non-trivial weights, an input batch, targets for a loss, and extra
requests (layers whose activation gradients to compare).
"""

from __future__ import annotations

import keras
import numpy as np

L = keras.layers


def _randomize_bn(model, rng):
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32") * 0.1)
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=n).astype("float32"))


def mlp(rng):
    """A PINN-style tanh MLP: small enough for input Hessians."""
    model = keras.Sequential(
        [
            keras.Input((2,)),
            L.Dense(16, activation="tanh", name="h1"),
            L.Dense(16, activation="tanh", name="h2"),
            L.Dense(1, name="u"),
        ],
        name="mlp",
    )
    x = rng.uniform(-1, 1, size=(8, 2)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    return model, x, y, {"activations": ["h2"], "hessian": True}


def cnn(rng):
    """Conv2D + BatchNormalization (inference) + pooling."""
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(4, 3, padding="same", name="conv1"),
            L.BatchNormalization(name="bn1"),
            L.Activation("tanh", name="act1"),
            L.AveragePooling2D(2, name="pool"),
            L.Conv2D(4, 3, activation="tanh", name="conv2"),
            L.Flatten(name="flat"),
            L.Dense(3, name="logits"),
        ],
        name="cnn",
    )
    _randomize_bn(model, rng)
    x = rng.normal(size=(4, 8, 8, 2)).astype("float32")
    y = rng.normal(size=(4, 3)).astype("float32")
    return model, x, y, {"activations": ["conv2"], "hessian": False}


def lstm(rng):
    """Embedding + LSTM: integer inputs, so gradients go to the embedding's output."""
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            L.Embedding(20, 5, name="emb"),
            L.LSTM(8, name="lstm"),
            L.Dense(2, name="head"),
        ],
        name="lstm_net",
    )
    x = rng.integers(0, 20, size=(4, 6)).astype("int32")
    y = rng.normal(size=(4, 2)).astype("float32")
    return model, x, y, {"activations": ["emb"], "hessian": False}


def attention(rng):
    """A transformer block: multi-head self-attention, residual, LayerNorm."""
    inp = keras.Input((5, 8), name="tokens")
    att = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(inp, inp)
    h = L.LayerNormalization(name="ln")(L.Add(name="res")([inp, att]))
    h = L.Dense(8, activation="gelu", name="ff")(h)
    out = L.Dense(2, name="head")(L.GlobalAveragePooling1D(name="gap")(h))
    model = keras.Model(inp, out, name="attention")
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    y = rng.normal(size=(3, 2)).astype("float32")
    return model, x, y, {"activations": ["mha"], "hessian": False}


def mobilenet(rng):
    """keras.applications.MobileNetV3Small at 32x32, random weights, logits out."""
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3),
        weights=None,
        classes=3,
        include_preprocessing=False,
        classifier_activation=None,
    )
    _randomize_bn(model, rng)
    conv = [layer.name for layer in model.layers if isinstance(layer, L.Conv2D)][-2]
    x = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[[0, 2]]
    return model, x, y, {"activations": [conv], "hessian": False}


#: name -> builder. ``kgrad compare`` with no model runs all of them.
DEMOS = {"mlp": mlp, "cnn": cnn, "lstm": lstm, "attention": attention, "mobilenet": mobilenet}
#: The quick set for ``kgrad compare --quick``.
QUICK = ("mlp", "cnn", "lstm")
