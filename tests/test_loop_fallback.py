"""Loop fallbacks are announced once per model (and once for ``kgrad.func`` calls)."""

import warnings

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad
from kgrad import _errors
from kgrad.backends import _loop

L = keras.layers
BACKEND = keras.backend.backend()


def _loop_warnings(calls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in calls:
            call()
    return [str(w.message) for w in caught if "one at a time" in str(w.message)]


def _dense(name):
    return keras.Sequential([keras.Input((2,)), L.Dense(1)], name=name)


def test_each_model_is_warned_once_per_reason():
    _loop._warned.clear()
    a, b = _dense("model_a"), _dense("model_b")

    def under(model):
        def call():
            with _errors.public_call("jacobian", model):
                _loop.warn_loop("a test reason", 5)

        return call

    plain = lambda: _loop.warn_loop("a test reason", 5)
    messages = _loop_warnings([under(a), under(a), under(b), under(b), plain, plain])
    assert len(messages) == 3, messages
    assert "model 'model_a'" in messages[0] and "model 'model_b'" in messages[1]
    assert "model '" not in messages[2] and "Shown once per model" in messages[2]


@pytest.mark.skipif(BACKEND != "torch", reason="torch.func.vmap cannot map Keras's Conv2D")
def test_a_conv_hessian_loop_warns_once_for_each_model(rng, monkeypatch):
    from helpers import ensure_torch_loop_fallback

    def conv(name):
        inp = keras.Input((4, 4, 2))  # two channels: torch's vmap fails on the clone
        h = L.Conv2D(2, 3, activation="tanh")(inp)
        return keras.Model(inp, L.Dense(1)(L.Flatten()(h)), name=name)

    first, second = conv("first"), conv("second")
    x = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    ensure_torch_loop_fallback(monkeypatch, conv("probe"), x)
    results = {}

    def run(model):
        results.setdefault(model.name, np_(kgrad.hessian(model, x, target=0)))

    messages = _loop_warnings([lambda: run(first), lambda: run(first), lambda: run(second)])
    assert len(messages) == 2, messages
    assert "model 'first'" in messages[0] and "model 'second'" in messages[1]
    # The loop gives the numbers of a one-sample-at-a-time computation.
    for model in (first, second):
        alone = [np_(kgrad.hessian(model, x[i : i + 1], target=0)) for i in range(2)]
        np.testing.assert_allclose(results[model.name], np.concatenate(alone), rtol=1e-5, atol=1e-6)
