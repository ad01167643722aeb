"""Per-sample gradients, their norms and the top Hessian eigenvalue against native code.

Usage::

    KERAS_BACKEND=jax python benchmarks/per_sample.py [--quick] [--repeats R]

Cases, in the same process, kgrad's time over the contender's (below 1: kgrad
is faster):

- ``per_sample_grad``: an MLP 256-256-256-10 (tanh) and a small CNN (28x28x1,
  Conv 16, Conv 32 stride 2, Dense 10) at B = 256 (``--quick``: 64), sparse
  categorical cross-entropy, against a hand-written ``vmap(grad)`` of one
  sample's loss: ``jax.jit(jax.vmap(jax.grad))`` over ``model.stateless_call``;
  ``torch.func.vmap(torch.func.grad)`` (the CNN: a loop of ``torch.func.grad``,
  as ``torch.func.vmap`` cannot map Keras's Conv2D);
  a ``tf.function`` of ``tf.vectorized_map`` over one sample's tape.
- ``per_sample_grad_norm`` at B = 512 (``--quick``: 64) against one ordinary
  batch gradient of the same loss (the native ``jax.grad`` / ``torch.func.grad``
  / tape, compiled likewise): the cost of knowing every sample's norm, against
  the cost of training without it. The memory of materialising the per-sample
  gradients (``B * n * 4`` bytes) is printed for scale.
- ``hessian_eigenvalues(k=1)`` on the MLP's weight Hessian (B = 256) against
  power iteration on the same ``kgrad.hvp`` (PyHessian's method: stop when the
  estimate changes by less than ``1e-3`` relatively, at most 100 products):
  the number of Hessian-vector products, the time, and both estimates (on
  torch, ``hessian_eigenvalues`` linearises the gradient once per call and
  each product is one backward pass, see ``kgrad._hessian.hvp_operator``;
  power iteration here calls ``kgrad.hvp``, all passes each time). Under
  torch with PyHessian installed (``pip install pyhessian``, an optional
  benchmark dependency), PyHessian itself too: ``hessian(model, criterion,
  data=(x, y)).eigenvalues(top_n=1)`` on the same Keras model (a
  ``torch.nn.Module`` on this backend), its setup (one backward pass with
  ``create_graph=True``) included in its time.

Timing: two warm-up calls, then R rounds (default 5), interleaved, each
synchronised; medians (benchmarks/operators.py's ``bench``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from operators import bench, rel_err, table, to_numpy  # noqa: E402

import kgrad  # noqa: E402

BACKEND = keras.backend.backend()
L = keras.layers


def build(name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    if name == "mlp":
        return keras.Sequential(
            [
                keras.Input((256,)),
                L.Dense(256, activation="tanh"),
                L.Dense(256, activation="tanh"),
                L.Dense(10),
            ]
        )
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(16, 3, activation="relu"),
            L.Conv2D(32, 3, strides=2, activation="relu"),
            L.Flatten(),
            L.Dense(10),
        ]
    )


def data(model, batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *model.inputs[0].shape[1:])).astype("float32")
    return x, rng.integers(0, 10, size=(batch,)).astype("int32")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def native(model):
    """``(per_sample, batch_grad)``: hand-written vmap(grad) and batch gradient."""
    trainable = model.trainable_variables
    others = model.non_trainable_variables
    if BACKEND in ("jax", "torch"):
        if BACKEND == "jax":
            import jax

            vmap, grad, jit = jax.vmap, jax.grad, jax.jit
            value = lambda v: v.value  # noqa: E731
        else:
            from torch import func as tfunc

            vmap, grad, jit = tfunc.vmap, tfunc.grad, (lambda f: f)
            # Detached: torch.func differentiates; no outer autograd graph is recorded.
            value = lambda v: v.value.detach()  # noqa: E731
        ntv = [value(v) for v in others]

        def loss(tv, x, y):
            out, _ = model.stateless_call(tv, ntv, x)
            return LOSS(y, out)

        one = lambda tv, x, y: loss(tv, x[None], y[None])  # noqa: E731
        axes = {"in_axes" if BACKEND == "jax" else "in_dims": (None, 0, 0)}
        per = jit(vmap(grad(one), **axes))
        if BACKEND == "torch" and any(isinstance(layer, L.Conv2D) for layer in model.layers):
            # torch.func.vmap cannot map Keras's Conv2D (a channels-last clone): a loop.
            import torch

            single = grad(one)

            def per(tv, x, y):
                grads = [single(tv, x[i], y[i]) for i in range(len(x))]
                return [torch.stack(g) for g in zip(*grads)]

        whole = jit(grad(loss))
        tv = lambda: [value(v) for v in trainable]  # noqa: E731
        conv = keras.ops.convert_to_tensor
        return (lambda x, y: per(tv(), conv(x), conv(y))), (
            lambda x, y: whole(tv(), conv(x), conv(y))
        )
    import tensorflow as tf

    @tf.function
    def per(x, y):
        def one(sample):
            xb, yb = sample[0][None], sample[1][None]
            with tf.GradientTape() as tape:
                value = LOSS(yb, model(xb))
            return tape.gradient(value, trainable)

        return tf.vectorized_map(one, (x, y))

    @tf.function
    def whole(x, y):
        with tf.GradientTape() as tape:
            value = LOSS(y, model(x))
        return tape.gradient(value, trainable)

    return per, whole


def power_iteration(model, x, y, tol=1e-3, max_iters=100):
    """PyHessian's top-eigenvalue method, on kgrad.hvp: ``(estimate, products)``."""
    paths = [v.path for v in model.trainable_variables]
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    rng = np.random.default_rng(0)
    v = [rng.standard_normal(s).astype("float32") for s in shapes]
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in v))
    v = [a / norm for a in v]
    estimate = None
    for i in range(max_iters):
        hv = kgrad.hvp(model, x, dict(zip(paths, v)), y=y, loss=LOSS)
        hv = [np.asarray(to_numpy(hv[p])) for p in paths]
        new = sum(float(np.sum(a * b)) for a, b in zip(hv, v))
        norm = math.sqrt(sum(float(np.sum(a * a)) for a in hv))
        v = [a / norm for a in hv]
        if estimate is not None and abs(new - estimate) / (abs(estimate) + 1e-6) < tol:
            return new, i + 1
        estimate = new
    return estimate, max_iters


def pyhessian_rows(model, x, y) -> list:
    """PyHessian's ``eigenvalues(top_n=1)`` at its default and at kgrad's tolerance."""
    try:
        import pyhessian  # noqa: F401  (its package rebinds `pyhessian.hessian` to a class)

        ph = sys.modules["pyhessian.hessian"]
    except ImportError:
        print("PyHessian is not installed (pip install pyhessian): its rows are left out")
        return []
    import torch

    calls = []
    product = ph.hessian_vector_product

    def counting(*a, **kw):
        calls.append(1)
        return product(*a, **kw)

    inputs = torch.as_tensor(x)
    targets = torch.as_tensor(y).long()
    criterion = torch.nn.CrossEntropyLoss()  # LOSS: sparse cross-entropy of logits
    rows = []
    ph.hessian_vector_product = counting
    try:
        for tol in (1e-3, 1e-4):
            torch.manual_seed(0)
            calls.clear()
            start = time.perf_counter()
            top = ph.hessian(model, criterion, data=(inputs, targets), cuda=False)
            value = top.eigenvalues(maxIter=100, tol=tol, top_n=1)[0][0]
            seconds = time.perf_counter() - start
            rows.append([f"PyHessian 0.1, tol={tol:g}", value, len(calls), seconds])
            model.zero_grad(set_to_none=True)
    finally:
        ph.hessian_vector_product = product
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"backend {BACKEND}, keras {keras.__version__}, kgrad {kgrad.__version__}")
    rows = []
    for name in ("mlp", "cnn"):
        model = build(name)
        x, y = data(model, 64 if args.quick else 256)
        per, _ = native(model)
        fns = {
            "kgrad": lambda m=model, x=x, y=y: kgrad.per_sample_grad(m, x, y, loss=LOSS),
            "native": lambda x=x, y=y, per=per: per(x, y),
        }
        t = bench(fns, args.repeats)
        k = kgrad.per_sample_grad(model, x, y, loss=LOSS)
        n = native_first = per(x, y)
        err = max(rel_err(k[v.path], n[i]) for i, v in enumerate(model.trainable_variables))
        del native_first
        rows.append([name, len(x), t["kgrad"], t["native"], t["kgrad"] / t["native"], err])
    table(
        "per_sample_grad against vmap(grad)",
        ["model", "B", "kgrad s", "native s", "ratio", "max rel diff"],
        rows,
    )
    rows = []
    for name in ("mlp", "cnn"):
        model = build(name)
        x, y = data(model, 64 if args.quick else 512)
        _, whole = native(model)
        fns = {
            "kgrad": lambda m=model, x=x, y=y: kgrad.per_sample_grad_norm(m, x, y, loss=LOSS),
            "batch": lambda x=x, y=y, whole=whole: whole(x, y),
        }
        t = bench(fns, args.repeats)
        n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        mib = len(x) * n * 4 / 2**20
        rows.append([name, len(x), t["kgrad"], t["batch"], t["kgrad"] / t["batch"], mib])
    table(
        "per_sample_grad_norm against one batch gradient",
        ["model", "B", "kgrad s", "batch grad s", "ratio", "materialised MiB"],
        rows,
    )
    model = build("mlp")
    x, y = data(model, 64 if args.quick else 256)
    from kgrad import _curvature

    calls = []
    product = _curvature._Operator.__call__  # every product of the Lanczos runs
    public_hvp = kgrad.hvp  # every product of power iteration

    def counting_product(self, v):
        calls.append(1)
        return product(self, v)

    def counting_hvp(*a, **kw):
        calls.append(1)
        return public_hvp(*a, **kw)

    def timed(fn):
        calls.clear()
        start = time.perf_counter()
        value = fn()
        return value, len(calls), time.perf_counter() - start

    kgrad.hessian_eigenvalues(model, x, y, loss=LOSS, seed=0)  # compiles the hvp
    power_iteration(model, x, y, max_iters=2)  # compiles kgrad.hvp's own call
    _curvature._Operator.__call__ = counting_product
    kgrad.hvp = counting_hvp
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference, n_ref, _ = timed(
                lambda: kgrad.hessian_eigenvalues(
                    model, x, y, loss=LOSS, seed=1, iters=150, tol=1e-7
                )[0]
            )
            results = []
            for tol in (1e-4, 1e-3, 1e-2):
                label = f"Lanczos, tol={tol:g}" + (" (default)" if tol == 1e-4 else "")
                run = lambda tol=tol: kgrad.hessian_eigenvalues(  # noqa: E731
                    model, x, y, loss=LOSS, seed=0, tol=tol
                )[0]
                results.append([label, *timed(run)])
        (power, _), n_power, t_power = timed(lambda: power_iteration(model, x, y))
    finally:
        _curvature._Operator.__call__ = product
        kgrad.hvp = public_hvp
    results.append(["power iteration, tol=1e-3 (PyHessian's)", power, n_power, t_power])
    if BACKEND == "torch":
        results.extend(pyhessian_rows(model, x, y))
    table(
        "hessian_eigenvalues(k=1) against power iteration (both on kgrad.hvp)",
        ["method", "Hessian-vector products", "s", "top eigenvalue", "rel. error"],
        [
            [name, n, t, float(value), abs(float(value) - float(reference)) / abs(float(reference))]
            for name, value, n, t in results
        ],
        note=f"reference: Lanczos with {n_ref} products, tol=1e-7: {float(reference):.6g}",
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
