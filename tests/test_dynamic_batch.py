"""A batch axis of unknown size: the smaller last batch of ``fit``, ``tf.data``, ``func.jit``.

TensorFlow traces ``fit``'s step with a ``None`` batch axis whenever the batch
size does not divide the data. Every model-level function must work there, on
every backend. References are independent of the graph path: the weights after
``fit`` are replayed outside ``fit`` with central-difference gradients, batch by
batch, and graph results are compared with eager results at a static shape.
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

BACKEND = keras.backend.backend()
ops = keras.ops


def _losses():
    return {
        "grad": lambda m, x: ops.mean(kgrad.grad(m, x) ** 2),
        "weights": lambda m, x: sum(
            ops.sum(g**2) for g in kgrad.grad(m, x, wrt="weights", layers="h").values()
        ),
        "jacobian": lambda m, x: ops.mean(kgrad.jacobian(m, x) ** 2),
        "jacobian_fwd": lambda m, x: ops.mean(kgrad.jacobian(m, x, mode="fwd") ** 2),
        "hessian": lambda m, x: ops.mean(kgrad.hessian(m, x, target=0) ** 2),
        "hvp": lambda m, x: ops.mean(kgrad.hvp(m, x, ops.ones_like(x), wrt="inputs") ** 2),
        "layer_grad": lambda m, x: ops.mean(
            kgrad.layer_grad(m, x, layers="h")["h"].output_grad ** 2
        ),
        "laplacian": lambda m, x: ops.mean(kgrad.laplacian(m, x) ** 2),
        "partial": lambda m, x: sum(
            ops.mean(p**2) for p in kgrad.partial(m, x, {"t": (0,), "xx": (1, 1)}).values()
        ),
        "divergence": lambda m, x: ops.mean(kgrad.divergence(m, x, of="h") ** 2),
        "taylor": lambda m, x: sum(
            ops.mean(t**2) for t in kgrad.taylor(m, x, ops.ones((3,)), 3)[1:]
        ),
    }


class LossNet(keras.Model):
    def __init__(self, loss_fn, **kwargs):
        super().__init__(**kwargs)
        self.loss_fn = loss_fn
        self.h = keras.layers.Dense(3, activation="tanh", name="h")
        self.out = keras.layers.Dense(2, activation="tanh", name="out")

    def call(self, x):
        return self.out(self.h(x))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.loss_fn(self, x)


def _fd_grad(model, loss_fn, x, eps=3e-3):
    base = [np.array(w, dtype="float64") for w in model.get_weights()]
    grads = []
    for i, w in enumerate(base):
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            values = []
            for step in (1, -1):
                trial = [b.copy() for b in base]
                trial[i][idx] += step * eps
                model.set_weights([t.astype("float32") for t in trial])
                values.append(float(np_(loss_fn(model, x))))
            g[idx] = (values[0] - values[1]) / (2 * eps)
        grads.append(g)
    model.set_weights([b.astype("float32") for b in base])
    return grads


# TensorFlow traces a None batch axis with and without XLA; JAX and torch see
# static shapes (a new trace per size), checked in their default step.
JIT_FLAGS = {"tensorflow": [False, True], "jax": [True], "torch": [False]}.get(BACKEND, [False])


@pytest.mark.parametrize("jit_compile", JIT_FLAGS, ids=[f"jit_compile={f}" for f in JIT_FLAGS])
@pytest.mark.parametrize("name", list(_losses()))
def test_fit_with_a_smaller_last_batch(name, jit_compile, rng):
    # 10 samples in batches of 4: the last batch has 2, so TensorFlow traces the
    # step with a None batch axis. Three SGD steps are replayed outside `fit`.
    loss_fn = _losses()[name]
    x = rng.uniform(-1, 1, size=(10, 3)).astype("float32")
    model = LossNet(loss_fn)
    model(x[:1])
    lr = 0.5
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), jit_compile=jit_compile)
    start = [np.array(w) for w in model.get_weights()]
    model.fit(x, np.zeros((10, 2), "float32"), batch_size=4, shuffle=False, epochs=1, verbose=0)
    trained = [np.array(w) for w in model.get_weights()]

    model.set_weights(start)
    for batch in (x[0:4], x[4:8], x[8:10]):
        g = _fd_grad(model, loss_fn, batch)
        model.set_weights(
            [(w - lr * gw).astype("float32") for w, gw in zip(model.get_weights(), g)]
        )
    replayed = [np.array(w) for w in model.get_weights()]
    moved = max(np.abs(a - b).max() for a, b in zip(replayed, start))
    assert moved > 1e-3  # the loss really moves the weights
    for got, want in zip(trained, replayed):
        # float32 losses differenced with eps=3e-3, three steps: about 1e-3 of the step.
        np.testing.assert_allclose(got, want, atol=3e-3 * max(moved, 1e-2))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="only TensorFlow traces unknown batch sizes")
def test_tf_function_with_a_none_batch_axis_matches_eager(rng):
    import tensorflow as tf

    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, activation="tanh", name="out")(h))
    x = rng.uniform(-1, 1, size=(5, 3)).astype("float32")
    y = rng.uniform(-1, 1, size=(5, 2)).astype("float32")
    calls = {
        "grad": lambda x, y: kgrad.grad(model, x),
        "value_and_grad": lambda x, y: kgrad.value_and_grad(model, x, y=y, loss="mse"),
        "weights": lambda x, y: kgrad.grad(model, x, wrt="weights"),
        "activations": lambda x, y: kgrad.grad(model, x, wrt="activations", layers="h"),
        "jacobian": lambda x, y: kgrad.jacobian(model, x),
        "jacobian_fwd": lambda x, y: kgrad.jacobian(model, x, mode="fwd"),
        "jacobian_weights": lambda x, y: kgrad.jacobian(model, x, wrt="weights", layers="out"),
        "jacobian_full": lambda x, y: kgrad.jacobian(model, x, per_sample=False),
        "hessian": lambda x, y: kgrad.hessian(model, x),
        "hessian_loss": lambda x, y: kgrad.hessian(model, x, y=y, loss="mse"),
        "hessian_weights": lambda x, y: kgrad.hessian(model, x, wrt="weights", layers="out"),
        "hvp": lambda x, y: kgrad.hvp(model, x, ops.ones_like(x), wrt="inputs"),
        "layer_grad": lambda x, y: {
            k: (v.output, v.output_grad, v.weight_grads)
            for k, v in kgrad.layer_grad(model, x, y, loss="mse").items()
        },
        "partial": lambda x, y: kgrad.partial(model, x, {"a": (0,), "b": (1, 2, 2)}),
        "laplacian": lambda x, y: kgrad.laplacian(model, x),
        "laplacian_stochastic": lambda x, y: kgrad.laplacian(
            model, x, method="stochastic", samples=3, seed=1
        ),
        "taylor": lambda x, y: kgrad.taylor(model, x, ops.ones((3,)), 4),
    }
    spec = [tf.TensorSpec((None, 3), tf.float32), tf.TensorSpec((None, 2), tf.float32)]
    for name, fn in calls.items():
        graph = tf.function(fn, input_signature=spec, autograph=False)
        got, want = np_(graph(x, y)), np_(fn(x, y))
        got, want = keras.tree.flatten(got), keras.tree.flatten(want)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            if a.dtype == object or b.dtype == object:  # None: a layer without an output grad
                assert a.tolist() is None and b.tolist() is None, name
                continue
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.data with a partial last batch")
def test_fit_on_tf_data_without_drop_remainder(rng):
    import tensorflow as tf

    model = LossNet(_losses()["hessian"])
    x = rng.uniform(-1, 1, size=(10, 3)).astype("float32")
    model(x[:1])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros((10, 2), "float32"))).batch(4)
    history = model.fit(data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_func_jit_over_several_batch_sizes(rng):
    # TensorFlow relaxes the traced shape to a None batch axis on the second size.
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2, activation="tanh")(inp))
    jitted = kgrad.func.jit(
        lambda x: (kgrad.grad(model, x), kgrad.jacobian(model, x), kgrad.hessian(model, x))
    )
    for n in (4, 2, 3, 7):
        x = rng.uniform(-1, 1, size=(n, 3)).astype("float32")
        got = np_(jitted(x))
        want = np_((kgrad.grad(model, x), kgrad.jacobian(model, x), kgrad.hessian(model, x)))
        for a, b in zip(got, want):
            assert a.shape[0] == n
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
