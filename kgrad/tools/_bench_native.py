"""The models and the hand-written native references of ``kgrad bench``.

Each reference is the code an expert would write directly in the framework
Keras runs on (see :mod:`kgrad.tools.bench` for what each one is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------- models


def _mlp():
    import keras

    inputs = keras.Input((2,))
    h = inputs
    for i in range(3):
        h = keras.layers.Dense(64, activation="tanh", name=f"hidden{i}")(h)
    outputs = keras.layers.Dense(1, name="out")(h)
    return keras.Model(inputs, outputs, name="pinn_mlp")


def _cnn():
    import keras

    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = keras.layers.Dense(10, name="out")(h)
    return keras.Model(inputs, outputs, name="small_cnn")


# ------------------------------------------------------------ native references


def _single(model):
    """One sample's output, a function of the weight values (passed as arguments)."""

    def single(tv, ntv, xi):
        out, _ = model.stateless_call(tv, ntv, xi[None], training=False)
        return out[0]

    return single


def _mse(model, lib):
    """The batch's MSE loss, a function of the weight values (``lib``: jnp or torch)."""

    def loss(tv, ntv, xb, yb):
        pred, _ = model.stateless_call(tv, ntv, xb, training=False)
        return lib.mean(lib.square(pred - yb))

    return loss


def _native_jax(kind: str, model, x, y=None) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp

    trainable, non_trainable = model.trainable_variables, model.non_trainable_variables

    def values():
        return [v.value for v in trainable], [v.value for v in non_trainable]

    single = _single(model)
    if kind == "cnn":
        loss = _mse(model, jnp)
        fn = jax.jit(jax.grad(loss))
        paths = [v.path for v in trainable]
        return lambda: dict(zip(paths, fn(*values(), x, y)))
    if kind == "loop":  # what old forum answers do: jax.grad per sample, no jit

        def per_sample():
            tv, ntv = values()
            g = jax.grad(lambda xi: jnp.sum(single(tv, ntv, xi)))
            return jnp.stack([g(x[i]) for i in range(x.shape[0])])

        return per_sample
    if kind == "grad":
        transform = jax.grad(lambda tv, ntv, xi: jnp.sum(single(tv, ntv, xi)), argnums=2)
    elif kind == "jacobian":
        transform = jax.jacrev(single, argnums=2)
    else:
        transform = jax.hessian(lambda tv, ntv, xi: single(tv, ntv, xi)[0], argnums=2)
    fn = jax.jit(jax.vmap(transform, in_axes=(None, None, 0)))
    return lambda: fn(*values(), x)


def _native_torch(kind: str, model, x, y=None) -> Callable[[], Any]:
    import torch
    from torch import func as tfunc

    trainable, non_trainable = model.trainable_variables, model.non_trainable_variables

    def values():
        # Detached: torch.func differentiates; no outer autograd graph is recorded.
        return [v.value.detach() for v in trainable], [v.value.detach() for v in non_trainable]

    single = _single(model)
    if kind == "cnn":
        loss = _mse(model, torch)
        fn = tfunc.grad(loss)
        paths = [v.path for v in trainable]
        return lambda: dict(zip(paths, fn(*values(), x, y)))
    if kind == "loop":  # what old forum answers do: autograd per sample

        def per_sample():
            grads = []
            for i in range(x.shape[0]):
                xi = x[i : i + 1].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(model(xi, training=False).sum(), xi)
                grads.append(g)
            return torch.cat(grads)

        return per_sample
    if kind == "grad":
        transform = tfunc.grad(lambda tv, ntv, xi: single(tv, ntv, xi).sum(), argnums=2)
    elif kind == "jacobian":
        transform = tfunc.jacrev(single, argnums=2)
    else:
        transform = tfunc.hessian(lambda tv, ntv, xi: single(tv, ntv, xi)[0], argnums=2)
    fn = tfunc.vmap(transform, in_dims=(None, None, 0))
    return lambda: fn(*values(), x)


def _native_tensorflow(kind: str, model, x, y=None) -> Callable[[], Any]:
    import tensorflow as tf

    if kind == "cnn":
        paths = [v.path for v in model.trainable_variables]

        @tf.function
        def cnn_grad(xb, yb):
            with tf.GradientTape() as tape:
                pred = model(xb, training=False)
                loss = tf.reduce_mean(tf.square(pred - yb))
            return tape.gradient(loss, model.trainable_variables)

        return lambda: dict(zip(paths, cnn_grad(x, y)))
    if kind == "loop":  # what old forum answers do: one eager tape per sample

        def per_sample():
            grads = []
            for i in range(x.shape[0]):
                xi = x[i : i + 1]
                with tf.GradientTape() as tape:
                    tape.watch(xi)
                    out = tf.reduce_sum(model(xi, training=False))
                grads.append(tape.gradient(out, xi))
            return tf.concat(grads, axis=0)

        return per_sample
    if kind == "grad":

        @tf.function
        def fn(xb):
            with tf.GradientTape() as tape:
                tape.watch(xb)
                out = tf.reduce_sum(model(xb, training=False))
            return tape.gradient(out, xb)

    elif kind == "jacobian":

        @tf.function
        def fn(xb):
            with tf.GradientTape() as tape:
                tape.watch(xb)
                out = model(xb, training=False)
            return tape.batch_jacobian(out, xb)

    else:

        @tf.function
        def fn(xb):
            with tf.GradientTape() as outer:
                outer.watch(xb)
                with tf.GradientTape() as inner:
                    inner.watch(xb)
                    out = tf.reduce_sum(model(xb, training=False)[:, 0])
                g = inner.gradient(out, xb)
            return outer.batch_jacobian(g, xb)

    return lambda: fn(x)


def _forward(backend: str, model, x) -> Callable[[], Any]:
    """One forward pass of the batch, as users run inference on each backend."""
    if backend == "torch":
        import torch

        def forward():
            with torch.no_grad():
                return model(x, training=False)

        return forward
    if backend == "jax":
        import jax

        trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
        fn = jax.jit(lambda tv, ntv, xb: model.stateless_call(tv, ntv, xb, training=False)[0])
        return lambda: fn([v.value for v in trainable], [v.value for v in non_trainable], x)
    import tensorflow as tf

    fn = tf.function(lambda xb: model(xb, training=False))
    return lambda: fn(x)


_NATIVE = {"jax": _native_jax, "torch": _native_torch, "tensorflow": _native_tensorflow}
