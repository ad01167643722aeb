"""Second derivatives written directly in the backend's own autodiff, without kgrad.

The references for kgrad's Hessians and Hessian-vector products:

- JAX: ``jax.hessian`` (forward over reverse) and ``jax.grad`` of
  ``<grad f, v>`` (reverse over reverse), both under ``jax.jit``;
- TensorFlow: nested gradient tapes, one outer ``gradient`` per row of
  the inner gradient. ``tf.nn.moments``, which Keras's normalization layers use
  on TensorFlow, stops the gradient through the mean inside the variance: first
  derivatives stay right, second ones do not. The reference computes moments in
  the textbook form instead (:func:`_textbook_moments`);
- PyTorch: ``torch.autograd.grad`` with ``create_graph=True``, one backward per
  row.

``f`` takes a list of backend tensors and returns a scalar tensor; it may call a
Keras model (``model(x)``, ``model.stateless_call(...)``). Results are NumPy
float64 arrays: ``hessian(f, args)[i][j]`` has shape
``args[i].shape + args[j].shape``.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np


def _np(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t), "float64")


@contextlib.contextmanager
def _textbook_moments():
    """Keras's TensorFlow moments as ``mean(x)`` and ``mean((x - mean(x))**2)``."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn

    def moments(x, axes, keepdims):
        mean = tf.reduce_mean(x, axes, keepdims=True)
        variance = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
        if not keepdims:
            mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        return mean, variance

    original = nn._compute_moments
    nn._compute_moments = moments
    try:
        yield
    finally:
        nn._compute_moments = original


def _blocks(rows, shapes):
    """``rows[r][j]``: the gradient of row r of the gradient wrt args[j] -> ``H[i][j]``."""
    sizes = [int(np.prod(s)) for s in shapes]
    starts = np.cumsum([0, *sizes])
    return [
        [
            np.stack(
                [_np(rows[r][j]).reshape(-1) for r in range(starts[i], starts[i + 1])]
            ).reshape(*shapes[i], *shapes[j])
            for j in range(len(shapes))
        ]
        for i in range(len(shapes))
    ]


def hessian(f, args) -> list[list[np.ndarray]]:
    """The Hessian blocks of scalar ``f`` at ``args`` (a list of arrays)."""
    args = [np.asarray(a, "float32") for a in args]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        n = len(args)
        h = jax.jit(jax.hessian(lambda *a: f(list(a)), argnums=tuple(range(n))))(*args)
        return [[_np(h[i][j]) for j in range(n)] for i in range(n)]
    shapes = [a.shape for a in args]
    if backend == "tensorflow":
        import tensorflow as tf

        ts = [tf.constant(a) for a in args]
        with _textbook_moments(), tf.GradientTape(persistent=True) as outer:
            outer.watch(ts)
            with tf.GradientTape() as inner:
                inner.watch(ts)
                value = f(ts)
            grads = inner.gradient(value, ts, unconnected_gradients="zero")
            flat = tf.unstack(tf.concat([tf.reshape(g, [-1]) for g in grads], 0))
        rows = [outer.gradient(g, ts, unconnected_gradients="zero") for g in flat]
        return _blocks(rows, shapes)
    if backend == "torch":
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in args]
        grads = torch.autograd.grad(f(ts), ts, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for g in flat:
            if g.requires_grad:
                row = torch.autograd.grad(g, ts, retain_graph=True, allow_unused=True)
            else:  # a gradient entry that does not depend on any argument
                row = (None,) * len(ts)
            rows.append([torch.zeros_like(t) if r is None else r for r, t in zip(row, ts)])
        return _blocks(rows, shapes)
    raise NotImplementedError(backend)


def hvp(f, args, vectors) -> list[np.ndarray]:
    """``H v`` for scalar ``f`` at ``args``: the gradient of ``<grad f, v>``."""
    args = [np.asarray(a, "float32") for a in args]
    vectors = [np.asarray(v, "float32") for v in vectors]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def inner(a):
            g = jax.grad(lambda a: f(list(a)))(a)
            return sum(jnp.vdot(gi, vi) for gi, vi in zip(g, vectors))

        return [_np(h) for h in jax.jit(jax.grad(inner))(args)]
    if backend == "tensorflow":
        import tensorflow as tf

        ts = [tf.constant(a) for a in args]
        with _textbook_moments(), tf.GradientTape() as outer:
            outer.watch(ts)
            with tf.GradientTape() as inner:
                inner.watch(ts)
                value = f(ts)
            grads = inner.gradient(value, ts, unconnected_gradients="zero")
            dot = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, vectors)])
        return [_np(h) for h in outer.gradient(dot, ts, unconnected_gradients="zero")]
    if backend == "torch":
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in args]
        grads = torch.autograd.grad(f(ts), ts, create_graph=True)
        dot = sum((g * torch.from_numpy(v)).sum() for g, v in zip(grads, vectors))
        out = torch.autograd.grad(dot, ts, allow_unused=True)
        return [_np(torch.zeros_like(t) if h is None else h) for h, t in zip(out, ts)]
    raise NotImplementedError(backend)


def stateless_output(model, paths, values, x):
    """``model(x)`` with the trainable weights named in ``paths`` set to ``values``."""
    given = dict(zip(paths, values))
    trainable = [given.get(v.path, v.value) for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    out, _ = model.stateless_call(trainable, non_trainable, x)
    return out
