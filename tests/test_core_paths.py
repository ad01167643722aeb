"""Ordinary paths through the core: random state, ``of=`` layers."""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

BACKEND = keras.backend.backend()
ops = keras.ops
L = keras.layers


def _dropout_model():
    return keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(8, activation="tanh", name="h"),
            L.Dropout(0.5, name="drop"),
            L.Dense(2, name="o"),
        ],
        name="dr",
    )


def test_a_training_forward_pass_gives_kgrad_a_new_dropout_mask(rng):
    # kgrad never advances the random state itself, so repeated calls agree; a
    # training-mode forward pass (what `fit`'s step runs) advances it on every
    # backend, and the next kgrad call must draw a new mask.
    model = _dropout_model()
    x = rng.normal(size=(4, 3)).astype("float32")
    first = np_(kgrad.grad(model, x, training=True))
    np.testing.assert_array_equal(np_(kgrad.grad(model, x, training=True)), first)
    model(x, training=True)
    second = np_(kgrad.grad(model, x, training=True))
    assert not np.allclose(second, first)
    np.testing.assert_array_equal(np_(kgrad.grad(model, x, training=True)), second)


def test_dropout_masks_change_from_step_to_step_inside_fit(rng):
    # With a learning rate of 0 the weights stay put, so the loss changes from
    # step to step only through the dropout mask.
    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.h = L.Dense(8, activation="tanh")
            self.drop = L.Dropout(0.5)
            self.o = L.Dense(2)

        def call(self, x, training=False):
            return self.o(self.drop(self.h(x), training=training))

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return ops.mean(kgrad.grad(self, x, training=True) ** 2)

    model = Net()
    x = rng.normal(size=(8, 3)).astype("float32")
    model(x)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    history = model.fit(x, np.zeros((8, 2), "float32"), batch_size=8, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert len(set(np.round(losses, 7))) > 1, losses


def _shared_model():
    inp = keras.Input((3,))
    shared = L.Dense(3, activation="tanh", name="shared")
    unused = L.Dense(3, name="unused")
    unused.build((None, 3))
    out = L.Dense(2, name="out")(shared(shared(inp)))
    model = keras.Model(inp, out)
    return model, unused


@pytest.mark.parametrize("wrt", ["inputs", "weights"])
def test_a_shared_of_layer_is_refused_for_every_wrt(wrt, rng):
    model, _ = _shared_model()
    x = rng.normal(size=(4, 3)).astype("float32")
    with pytest.raises(ValueError, match="called 2 times.*Received"):
        kgrad.grad(model, x, wrt=wrt, of="shared")
    with pytest.raises(ValueError, match="called 2 times"):
        kgrad.jacobian(model, x, wrt=wrt, of="shared")


def test_an_of_layer_that_never_runs_is_refused(rng):
    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.a = L.Dense(3, name="a")
            self.unused = L.Dense(3, name="unused")

        def call(self, x):
            return self.a(x)

    model = Net()
    x = rng.normal(size=(4, 3)).astype("float32")
    model(x)
    for wrt in ("inputs", "weights"):
        with pytest.raises(ValueError, match="was not called.*Received"):
            kgrad.grad(model, x, wrt=wrt, of="unused")
