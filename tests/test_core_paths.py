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


def _centering_model():
    # Each sample minus the batch mean: samples interact in inference mode too,
    # and no layer type says so.
    inp = keras.Input((3,))
    centred = L.Lambda(lambda t: t - ops.mean(t, axis=0, keepdims=True), name="centre")(inp)
    return keras.Model(inp, L.Dense(2, activation="tanh", name="o")(centred))


def test_samples_that_interact_are_found_without_knowing_the_layer(rng):
    model = _centering_model()
    x = rng.normal(size=(4, 3)).astype("float32")
    for call in (
        lambda: kgrad.jacobian(model, x),
        lambda: kgrad.jacobian(model, x, mode="fwd"),
        lambda: kgrad.hessian(model, x, target=0),
        lambda: kgrad.grad(model, x),
    ):
        with pytest.raises(ValueError, match="depends on the other samples.*Received: training"):
            call()
    # Well defined: the full Jacobian, a batch loss, weight gradients, one sample.
    full = np_(kgrad.jacobian(model, x, per_sample=False))
    assert full.shape == (4, 2, 4, 3)
    assert np.abs(full[1, :, 0, :]).max() > 1e-3  # sample 0 moves sample 1's output
    kgrad.grad(model, x, y=np.zeros((4, 2), "float32"), loss="mse")
    kgrad.grad(model, x, wrt="weights")
    np.testing.assert_allclose(np_(kgrad.jacobian(model, x[:1])), 0.0, atol=1e-7)


def test_independent_samples_are_not_refused(rng):
    # BatchNormalization in inference mode, LayerNormalization, attention over a
    # sequence: each sample on its own.
    inp = keras.Input((4, 3))
    h = L.BatchNormalization(name="bn")(inp)
    h = L.LayerNormalization(name="ln")(h)
    h = L.MultiHeadAttention(num_heads=1, key_dim=2, name="att")(h, h)
    model = keras.Model(inp, L.Dense(1, name="o")(L.Flatten()(h)))
    x = rng.normal(size=(3, 4, 3)).astype("float32")
    per_sample = np_(kgrad.jacobian(model, x))
    one_by_one = np.concatenate([np_(kgrad.jacobian(model, x[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(per_sample, one_by_one, rtol=1e-5, atol=1e-6)


def test_interaction_inside_fit_is_refused(rng):
    class Net(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return ops.mean(kgrad.jacobian(self, x) ** 2)

    inp = keras.Input((3,))
    centred = L.Lambda(lambda t: t - ops.mean(t, axis=0, keepdims=True))(inp)
    model = Net(inp, L.Dense(2)(centred))
    model.compile(optimizer="sgd")
    x = rng.normal(size=(4, 3)).astype("float32")
    with pytest.raises(ValueError, match="depends on the other samples"):
        model.fit(x, np.zeros((4, 2), "float32"), batch_size=4, epochs=1, verbose=0)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.func.vmap cannot map Keras's Conv2D")
def test_a_loop_fallback_is_announced_once(rng, monkeypatch):
    import warnings

    from helpers import ensure_torch_loop_fallback

    from kgrad.backends import _loop

    inp = keras.Input((4, 4, 2))  # two channels: torch's vmap fails on the channels-last clone
    h = L.Conv2D(2, 3, activation="tanh", name="conv")(inp)
    model = keras.Model(inp, L.Dense(1, name="o")(L.Flatten()(h)))
    x = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    y = rng.normal(size=(2, 1)).astype("float32")
    ensure_torch_loop_fallback(monkeypatch, model, x)
    _loop._warned.clear()
    # A loss Hessian loops (a loss averages over the batch, so its directions
    # cannot be folded into the batch; tests/test_loop_fallback.py has the fold).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = np_(kgrad.hessian(model, x, y=y, loss="mse"))
        kgrad.hessian(model, x, y=y, loss="mse")
    loops = [w for w in caught if "one at a time" in str(w.message)]
    assert len(loops) == 1, [str(w.message) for w in caught]
    # The loop gives the numbers of a one-sample-at-a-time computation (each
    # sample's block of the mean loss's Hessian is 1/B of its own loss's).
    alone = [np_(kgrad.hessian(model, x[i : i + 1], y=y[i : i + 1], loss="mse")) for i in range(2)]
    np.testing.assert_allclose(first, np.concatenate(alone) / 2, rtol=1e-5, atol=1e-6)
