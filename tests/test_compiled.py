"""Compiled, cached model-level calls: reused, never stale, bounded, not leaking."""

import gc
import weakref

import keras
import numpy as np
import pytest
import reference as ref
from helpers import assert_close, np_

import kgrad
from kgrad import _compiled

BACKEND = keras.backend.backend()
COMPILES = BACKEND in ("jax", "tensorflow")
RT, AT = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _compiling():
    kgrad.clear_cache()
    kgrad.set_jit_compile(True)
    yield
    kgrad.set_jit_compile(True)
    kgrad.clear_cache()


def _expected_input_grad(model, x):
    return ref.input_jacobian(ref.params(model), x.astype("float64")).sum(axis=1)


class Counting(keras.Model):
    """Counts how often Python runs its `call` (tracing runs it, compiled code does not)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(4, activation="tanh")
        self.d2 = keras.layers.Dense(1)
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return self.d2(self.d1(x))


@pytest.mark.skipif(not COMPILES, reason="torch runs eagerly with torch.func")
def test_repeated_calls_reuse_one_compiled_function(rng):
    model = Counting()
    x = rng.normal(size=(6, 3)).astype("float32")
    model(x)
    first = np_(kgrad.hessian(model, x, target=0))
    traced = model.calls
    for _ in range(3):
        np.testing.assert_array_equal(np_(kgrad.hessian(model, x, target=0)), first)
    assert model.calls == traced  # no retrace, no Python re-run of the model
    assert _compiled.cache_size(model) == 1
    kgrad.hessian(model, x[:4], target=0)  # a new shape is a new signature
    assert _compiled.cache_size(model) == 2


def test_input_gradients_follow_set_weights(rng):
    model = ref.mlp()
    x = rng.normal(size=(5, 3)).astype("float32")
    for _ in range(2):
        assert_close(kgrad.grad(model, x), _expected_input_grad(model, x), RT, AT)
    model.set_weights([w * 1.5 - 0.1 for w in model.get_weights()])
    assert_close(kgrad.grad(model, x), _expected_input_grad(model, x), RT, AT)


CALLS = {
    "jacobian": lambda m, x: kgrad.jacobian(m, x),
    "hessian": lambda m, x: kgrad.hessian(m, x, target=0),
    "hvp": lambda m, x: kgrad.hvp(m, x, {"mlp/h1/kernel": np.ones((3, 4), "float32")})[
        "mlp/h1/kernel"
    ],
    "layer_grad": lambda m, x: kgrad.layer_grad(m, x)["h1"].output_grad,
    "weights": lambda m, x: kgrad.grad(m, x, wrt="weights")["mlp/h1/kernel"],
}


@pytest.mark.parametrize("fname", list(CALLS))
def test_results_follow_set_weights(fname, rng):
    # After set_weights, a cached call equals a fresh eager call on the new weights.
    model = ref.mlp()
    x = rng.normal(size=(5, 3)).astype("float32")
    call = CALLS[fname]
    before = [np_(call(model, x)) for _ in range(2)][1]
    model.set_weights([w * 1.5 - 0.1 for w in model.get_weights()])
    after = np_(call(model, x))
    kgrad.set_jit_compile(False)
    fresh = np_(call(model, x))
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, fresh, rtol=RT, atol=AT)


def test_results_follow_fit_and_optimizer_steps(rng):
    model = ref.mlp()
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    for _ in range(2):
        assert_close(kgrad.grad(model, x), _expected_input_grad(model, x), RT, AT)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(x, y, epochs=2, verbose=0)
    assert_close(kgrad.grad(model, x), _expected_input_grad(model, x), RT, AT)
    # A custom-loop optimizer step.
    g = kgrad.grad(model, x, y=y, loss="mse", wrt="weights")
    model.optimizer.apply_gradients([(g[v.path], v) for v in model.trainable_variables])
    assert_close(kgrad.grad(model, x), _expected_input_grad(model, x), RT, AT)
    # The weight gradient of the loss follows too (NumPy backprop of the MSE).
    p = ref.params(model)
    _, _, pred = ref.forward(p, x.astype("float64"))
    expected = ref.backward(p, x.astype("float64"), 2 * (pred - y) / pred.size)
    g = kgrad.grad(model, x, y=y, loss="mse", wrt="weights")
    for k, v in g.items():
        assert_close(v, expected[k.split("/", 1)[1]], RT, AT)


def test_recompiling_the_loss_is_seen(rng):
    model = ref.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    model.compile(loss="mse")
    mse = [np_(kgrad.grad(model, x, y=y)) for _ in range(2)][1]
    model.compile(loss="mae")
    mae = np_(kgrad.grad(model, x, y=y))
    kgrad.set_jit_compile(False)
    np.testing.assert_allclose(mae, np_(kgrad.grad(model, x, y=y)), rtol=RT, atol=AT)
    assert np.abs(mae - mse).max() > 1e-4


def test_freezing_a_layer_changes_the_weights_differentiated(rng):
    model = ref.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    for _ in range(2):
        assert "mlp/h1/kernel" in kgrad.grad(model, x, wrt="weights")
    model.get_layer("h1").trainable = False
    g = kgrad.grad(model, x, wrt="weights")
    assert "mlp/h1/kernel" not in g and "mlp/out/kernel" in g


def test_the_memory_budget_is_checked_on_cached_calls(rng):
    model = ref.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    for _ in range(2):
        kgrad.hessian(model, x, wrt="weights", layers="out")
    old = kgrad.get_memory_budget()
    try:
        kgrad.set_memory_budget(64)
        with pytest.raises(ValueError, match="chunk_size"):
            kgrad.hessian(model, x, wrt="weights", layers="out")
    finally:
        kgrad.set_memory_budget(old)


def test_the_cache_does_not_keep_models_alive(rng):
    model = ref.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    for _ in range(2):
        kgrad.grad(model, x)
        kgrad.hessian(model, x, target=0)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert _compiled.cache_size() == 0


def test_the_cache_is_bounded(rng):
    model = ref.mlp()
    n = _compiled.MAX_ENTRIES_PER_MODEL + 5
    for b in range(1, n + 1):  # weight gradients are never padded: one signature per size
        kgrad.grad(model, rng.normal(size=(b, 3)).astype("float32"), wrt="weights")
    expected = min(n, _compiled.MAX_ENTRIES_PER_MODEL) if COMPILES else 0
    assert _compiled.cache_size(model) == expected


def test_jit_compile_off_runs_eagerly_and_agrees(rng):
    model = ref.mlp()
    x = rng.normal(size=(5, 3)).astype("float32")
    compiled = [np_(kgrad.hessian(model, x, target=1)) for _ in range(2)][1]
    kgrad.clear_cache()
    kgrad.set_jit_compile(False)
    assert not kgrad.get_jit_compile()
    eager = np_(kgrad.hessian(model, x, target=1))
    assert _compiled.cache_size(model) == 0
    np.testing.assert_allclose(compiled, eager, rtol=RT, atol=AT)
    with pytest.raises(TypeError, match="Received: enabled='yes'"):
        kgrad.set_jit_compile("yes")


def test_errors_are_raised_on_cached_signatures_too(rng):
    model = ref.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    for _ in range(2):
        with pytest.raises(ValueError, match="out of range"):
            kgrad.grad(model, x, target=7)


def test_a_custom_training_loop_differentiates_through_cached_calls(rng):
    # Gradient penalty in a hand-written loop: the loop's own autodiff must see
    # through kgrad's (compiled) call, and agree with the eager computation.
    model = ref.mlp()
    x = rng.normal(size=(6, 3)).astype("float32")

    def penalty(m):
        return keras.ops.sum(kgrad.grad(m, x) ** 2)

    def weight_grads(enabled):
        kgrad.set_jit_compile(enabled)
        weights = kgrad.func.weights_of(model)
        if BACKEND == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                value = penalty(model)
            sources = [v.value for v in model.trainable_variables]  # the tf.Variables
            grads = tape.gradient(
                value, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            return [np_(g) for g in grads]

        def f(w):
            with keras.StatelessScope(
                state_mapping=[(v, w[v.path]) for v in model.trainable_variables]
            ):
                return penalty(model)

        g = kgrad.func.grad(f)(weights)
        return [np_(g[v.path]) for v in model.trainable_variables]

    eager = weight_grads(False)
    for _ in range(2):
        compiled = weight_grads(True)
        for a, b in zip(compiled, eager):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert max(np.abs(g).max() for g in eager) > 1e-3
