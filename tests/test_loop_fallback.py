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


def _conv(name):
    inp = keras.Input((4, 4, 2))  # two channels: torch's vmap fails on the clone
    h = L.Conv2D(2, 3, activation="tanh")(inp)
    return keras.Model(inp, L.Dense(2)(L.Flatten()(h)), name=name)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.func.vmap cannot map Keras's Conv2D")
def test_a_conv_hessian_loop_warns_once_for_each_model(rng, monkeypatch):
    from helpers import ensure_torch_loop_fallback

    first, second = _conv("first"), _conv("second")
    x = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    y = rng.normal(size=(2, 2)).astype("float32")
    ensure_torch_loop_fallback(monkeypatch, _conv("probe"), x)
    results = {}

    def run(model):
        # A loss Hessian: the loss averages over the batch, so the directions
        # cannot be folded into the batch; they are looped over.
        results.setdefault(model.name, np_(kgrad.hessian(model, x, y=y, loss="mse")))

    messages = _loop_warnings([lambda: run(first), lambda: run(first), lambda: run(second)])
    assert len(messages) == 2, messages
    assert "model 'first'" in messages[0] and "model 'second'" in messages[1]
    # The loop gives the numbers of a one-sample-at-a-time computation: each
    # sample's block of the batch loss's Hessian is 1/B of its own loss's Hessian.
    for model in (first, second):
        alone = [
            np_(kgrad.hessian(model, x[i : i + 1], y=y[i : i + 1], loss="mse")) for i in range(2)
        ]
        np.testing.assert_allclose(
            results[model.name], np.concatenate(alone) / 2, rtol=1e-5, atol=1e-6
        )


def test_per_sample_input_derivatives_of_a_conv_model_fold_directions_into_the_batch(
    rng, monkeypatch
):
    # torch.func.vmap cannot map Keras's Conv2D; per-sample input Jacobians
    # (forward mode) and Hessians without a loss then run every direction as a
    # copy of the batch in one pass, not one pass per direction. On every
    # backend the numbers equal the same calls on one sample at a time.
    from kgrad import _jac

    model = _conv("folded")
    x = rng.normal(size=(3, 4, 4, 2)).astype("float32")
    folds = []
    if BACKEND == "torch":
        from helpers import ensure_torch_loop_fallback

        ensure_torch_loop_fallback(monkeypatch, _conv("probe"), x)
        real = _jac._folded_jvp
        monkeypatch.setattr(_jac, "_folded_jvp", lambda *a, **k: folds.append(1) or real(*a, **k))
    calls = {
        "jacobian_fwd": lambda v: kgrad.jacobian(model, v, mode="fwd"),
        "hessian": lambda v: kgrad.hessian(model, v),
        "hessian_target": lambda v: kgrad.hessian(model, v, target=1, chunk_size=5),
    }
    for name, call in calls.items():
        got = []
        messages = _loop_warnings([lambda call=call, got=got: got.append(np_(call(x)))])
        assert not messages, messages
        alone = np.concatenate([np_(call(x[i : i + 1])) for i in range(3)])
        np.testing.assert_allclose(got[0], alone, rtol=1e-5, atol=1e-6, err_msg=name)
    if BACKEND == "torch":
        # One fold per chunk of directions: 1 + 1 + ceil(32 / 5) over the three calls
        # (the batch-of-one calls fold too).
        assert len(folds) >= 9, len(folds)
