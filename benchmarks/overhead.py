"""Per-call overhead of a cached kgrad call against the same native compiled call.

Usage::

    KERAS_BACKEND=jax python benchmarks/overhead.py [--calls 2000] [--rounds 7]

Times ``kgrad.grad(model, x)`` (per-sample input gradients) and
``kgrad.grad(model, x, wrt="weights")`` on a tiny model (2-8-1 tanh MLP,
batch 4), and the input gradient of a deep one (50 tanh Dense layers of width 8,
102 variables, where per-variable and per-layer work shows), after the first
call has compiled them, against the native compiled function an expert would
write for the same model, in the same process:

- JAX: ``jax.jit`` of ``jax.grad`` of the model's ``stateless_call``, called
  with the variable values as arguments (kgrad passes them as arguments too);
- TensorFlow: a ``tf.function`` around a ``GradientTape``;
- PyTorch: ``torch.autograd.grad`` of ``model(x).sum()``, eagerly (kgrad
  runs eagerly on PyTorch).

Before timing, each native result is checked against kgrad's, so a native
baseline that computes something else cannot pass for a fast one.

The model is tiny, so the time is almost all dispatch: the difference is
kgrad's own per-call overhead (building the cache key, reading the
variables). Prints the best round's microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kgrad  # noqa: E402


def _model(depth: int = 1, width: int = 2):
    keras.utils.set_random_seed(0)
    inp = keras.Input((width,))
    h = inp
    for _ in range(depth):
        h = keras.layers.Dense(8, activation="tanh")(h)
    return keras.Model(inp, keras.layers.Dense(1)(h))


def _native(model, x):
    """Two native callables: per-sample input gradient and weight gradient."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        ntv = [v.value for v in model.non_trainable_variables]

        def out_sum(tv, ntv, x):
            y, _ = model.stateless_call(tv, ntv, x)
            return y.sum()

        gx = jax.jit(jax.grad(out_sum, argnums=2))
        gw = jax.jit(jax.grad(out_sum, argnums=0))

        def inputs():
            return gx([v.value for v in model.trainable_variables], ntv, x)

        def weights():
            return gw([v.value for v in model.trainable_variables], ntv, x)

        return inputs, weights
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)

        @tf.function
        def gx(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tf.reduce_sum(model(x))
            return tape.gradient(y, x)

        @tf.function
        def gw(x):
            with tf.GradientTape() as tape:
                y = tf.reduce_sum(model(x))
            return tape.gradient(y, model.trainable_variables)

        return (lambda: gx(xt)), (lambda: gw(xt))
    import torch

    xt = torch.as_tensor(x)
    params = list(model.parameters())

    # Plain autograd, as one writes it by hand. (`torch.func.functional_call`
    # cannot swap a Keras model's weights: its layers read their variables, not
    # the module's parameters, so its weight gradient is all zeros.)
    def inputs():
        xr = xt.detach().requires_grad_(True)
        return torch.autograd.grad(model(xr).sum(), xr)[0]

    def weights():
        return torch.autograd.grad(model(xt).sum(), params)

    return inputs, weights


def _time(fns, calls: int, rounds: int) -> list[float]:
    """Best round's microseconds per call of each function, rounds interleaved.

    Interleaving puts both functions under the same load on a shared machine.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return [b * 1e6 for b in best]


def _check(ours, theirs) -> None:
    """Raises unless every native array equals one of kgrad's (weights come in any order)."""
    ours = [np.asarray(keras.ops.convert_to_numpy(a)) for a in keras.tree.flatten(ours)]
    theirs = [np.asarray(keras.ops.convert_to_numpy(a)) for a in keras.tree.flatten(theirs)]
    for a in theirs:
        if not any(b.shape == a.shape and np.allclose(a, b, rtol=1e-4, atol=1e-6) for b in ours):
            raise AssertionError(f"A native result of shape {a.shape} is not kgrad's.")
    if len(ours) != len(theirs):
        raise AssertionError(f"kgrad gives {len(ours)} arrays, native code {len(theirs)}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    model = _model()
    x = np.random.default_rng(0).normal(size=(4, 2)).astype("float32")
    native_x, native_w = _native(model, x)
    xk = keras.ops.convert_to_tensor(x)
    deep = _model(depth=50, width=8)
    xd = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(size=(4, 8)), "float32")
    native_deep, _ = _native(deep, keras.ops.convert_to_numpy(xd))
    cases = [
        ("grad wrt inputs", lambda: kgrad.grad(model, xk), native_x),
        ("grad wrt weights", lambda: kgrad.grad(model, xk, wrt="weights"), native_w),
        ("50 layers, inputs", lambda: kgrad.grad(deep, xd), native_deep),
    ]
    for _, ours, theirs in cases:
        _check(ours(), theirs())
    print(f"backend {keras.backend.backend()}, {args.calls} calls x {args.rounds} rounds")
    print(f"{'case':<18} {'kgrad us':>9} {'native us':>10} {'overhead us':>12}")
    for name, ours, theirs in cases:
        t_ours, t_native = _time([ours, theirs], args.calls, args.rounds)
        print(f"{name:<18} {t_ours:9.1f} {t_native:10.1f} {t_ours - t_native:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
