"""Attribution: kgrad's integrated gradients and Grad-CAM against native code and the peers.

Usage::

    KERAS_BACKEND=torch python benchmarks/attribution.py [--quick] [--repeats R]
        [--models cnn,mobilenet]

Workloads (the issue's): integrated gradients with 50 Gauss-Legendre steps on
a batch of 32, one class per sample, on

- ``cnn``: a small CNN on 32x32x3 (Conv 16, Conv 32, max-pool, Conv 64, global
  average pooling, Dense 10);
- ``mobilenet``: ``keras.applications.MobileNetV3Small`` at 96x96x3 with
  random weights and 10 classes (the 1,600 interpolated images are evaluated
  in chunks of 320 by every contender, so that memory stays bounded).

``--quick``: 8 steps on a batch of 8. Contenders, in the same process:

- JAX: ``jax.jit`` of the interpolation, ``jax.vmap(jax.grad)`` of one
  sample's class score through ``model.stateless_call``, and the weighted sum;
- TensorFlow: a ``tf.function`` with one ``tf.GradientTape`` over the batched
  interpolated inputs ("batched tape");
- PyTorch: Captum's ``IntegratedGradients`` (if installed) and the same
  batched computation with ``torch.autograd.grad``.

Grad-CAM (TensorFlow, both models): ``kgrad.attribution.gradcam`` against the
keras.io snippet (a model with two outputs and a ``tf.GradientTape``, eager as
on keras.io, and the same under ``tf.function``), both with per-sample channel
weights, without resizing (keras.io resizes with PIL afterwards).

Timing: two warm-up calls (compiling), then R rounds (default 5) calling each
contender once, interleaved, each synchronised. Medians; ratios are kgrad's
median over the contender's (below 1: kgrad is faster).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from operators import bench  # noqa: E402  (benchmarks/operators.py: the same timing)

import kgrad  # noqa: E402

BACKEND = keras.backend.backend()
A = kgrad.attribution


def build(name: str) -> tuple[keras.Model, tuple, str]:
    keras.utils.set_random_seed(0)
    L = keras.layers
    if name == "cnn":
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                L.Conv2D(16, 3, padding="same", activation="relu"),
                L.Conv2D(32, 3, padding="same", activation="relu"),
                L.MaxPooling2D(2),
                L.Conv2D(64, 3, padding="same", activation="relu", name="last_conv"),
                L.GlobalAveragePooling2D(),
                L.Dense(10),
            ]
        )
        return model, (32, 32, 3), "last_conv"
    model = keras.applications.MobileNetV3Small(
        input_shape=(96, 96, 3), weights=None, classes=10, include_preprocessing=False
    )
    conv = [layer.name for layer in model.layers if len(getattr(layer.output, "shape", ())) == 4]
    return model, (96, 96, 3), conv[-1]


def rel(a, b) -> float:
    a = np.asarray(keras.ops.convert_to_numpy(a), "float64")
    b = np.asarray(keras.ops.convert_to_numpy(b), "float64")
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


def nodes(steps):
    t, v = np.polynomial.legendre.leggauss(steps)
    return ((1 + t) / 2).astype("float32"), (v / 2).astype("float32")


# --------------------------------------------------------------------------- natives


def native_ig_jax(model, steps, chunk_steps):
    import jax
    import jax.numpy as jnp

    a, w = nodes(steps)
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def score(xi, t):
        out, _ = model.stateless_call(tv, ntv, xi[None], training=False)
        return out[0, t]

    per_sample = jax.vmap(jax.grad(score))

    @jax.jit
    def chunk(x, t, ak, wk):
        pts = (ak[:, None, None, None, None] * x[None]).reshape((-1,) + x.shape[1:])
        g = per_sample(pts, jnp.tile(t, ak.shape[0])).reshape((ak.shape[0],) + x.shape)
        return jnp.tensordot(wk, g, axes=1)

    def ig(x, t):
        total = 0
        for k in range(0, steps, chunk_steps):
            total = total + chunk(x, t, a[k : k + chunk_steps], w[k : k + chunk_steps])
        return total * x

    return ig


def native_ig_tf(model, steps, chunk_steps):
    import tensorflow as tf

    a, w = nodes(steps)

    @tf.function
    def chunk(x, t, ak, wk):
        pts = tf.reshape(ak[:, None, None, None, None] * x[None], (-1,) + tuple(x.shape[1:]))
        with tf.GradientTape() as tape:
            tape.watch(pts)
            out = model(pts, training=False)
            score = tf.reduce_sum(out * tf.one_hot(tf.tile(t, [tf.shape(ak)[0]]), out.shape[-1]))
        g = tf.reshape(tape.gradient(score, pts), (-1,) + tuple(x.shape))
        return tf.tensordot(wk, g, axes=1)

    def ig(x, t):
        total = 0
        for k in range(0, steps, chunk_steps):
            total = total + chunk(x, t, a[k : k + chunk_steps], w[k : k + chunk_steps])
        return total * x

    return ig


def native_ig_torch(model, steps, chunk_steps):
    import torch

    a, w = nodes(steps)
    a, w = torch.tensor(a), torch.tensor(w)

    def ig(x, t):
        total = 0
        for k in range(0, steps, chunk_steps):
            ak, wk = a[k : k + chunk_steps], w[k : k + chunk_steps]
            pts = (ak[:, None, None, None, None] * x[None]).reshape((-1,) + tuple(x.shape[1:]))
            pts.requires_grad_(True)
            out = model(pts, training=False)
            score = out.gather(1, t.repeat(len(ak))[:, None]).sum()
            (g,) = torch.autograd.grad(score, pts)
            total = total + torch.tensordot(wk, g.reshape((len(ak),) + tuple(x.shape)), dims=1)
        return total * x

    return ig


def captum_ig(model, steps, rows):
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        return None
    ig = IntegratedGradients(model)

    def run(x, t):
        return ig.attribute(x, target=t, n_steps=steps, internal_batch_size=rows)

    return run


# --------------------------------------------------------------------------- sections


def section_ig(name, batch, steps, repeats):
    model, shape, _ = build(name)
    rows = batch * steps if name == "cnn" else 320
    chunk_steps = max(1, rows // batch)
    x_np = np.random.default_rng(0).uniform(size=(batch, *shape)).astype("float32")
    t_np = np.arange(batch) % 10
    x = keras.ops.convert_to_tensor(x_np)
    t = keras.ops.convert_to_tensor(t_np.astype("int64" if BACKEND == "torch" else "int32"))
    size = None if rows >= batch * steps else rows

    def ours():
        return A.integrated_gradients(model, x, target=t_np, steps=steps, batch_size=size)

    fns = {"kgrad": ours}
    if BACKEND == "jax":
        native = native_ig_jax(model, steps, chunk_steps)
        fns["jax.vmap(jax.grad)"] = lambda: native(x, t)
    elif BACKEND == "tensorflow":
        native = native_ig_tf(model, steps, chunk_steps)
        fns["batched tape"] = lambda: native(x, t)
    else:
        native = native_ig_torch(model, steps, chunk_steps)
        fns["torch.autograd"] = lambda: native(x, t)
        captum = captum_ig(model, steps, rows if size else None)
        if captum is not None:
            fns["Captum"] = lambda: captum(x, t)
    reference = fns[list(fns)[1]]()
    err = rel(ours(), reference)
    times = bench(fns, repeats)
    print(f"\n### integrated gradients, {name}, B={batch}, {steps} steps ({BACKEND})")
    print(f"max relative difference kgrad vs {list(fns)[1]}: {err:.1e}")
    print("| contender | seconds | kgrad / contender |\n|---|---:|---:|")
    for k, s in times.items():
        print(f"| {k} | {s:.4f} | {times['kgrad'] / s:.2f} |")
    sys.stdout.flush()


def section_gradcam(name, batch, repeats):
    import tensorflow as tf

    model, shape, layer = build(name)
    x = tf.constant(np.random.default_rng(0).uniform(size=(batch, *shape)).astype("float32"))
    t_np = np.arange(batch) % 10
    grad_model = keras.Model(model.inputs, [model.get_layer(layer).output, model.outputs[0]])

    def snippet(x):  # keras.io's make_gradcam_heatmap, per-sample weights, no normalisation
        with tf.GradientTape() as tape:
            conv, preds = grad_model(x)
            score = tf.reduce_sum(preds * tf.one_hot(t_np, preds.shape[-1]))
        grads = tape.gradient(score, conv)
        pooled = tf.reduce_mean(grads, axis=(1, 2))
        return tf.nn.relu(tf.einsum("bhwc,bc->bhw", conv, pooled))

    compiled = tf.function(snippet)
    fns = {
        "kgrad": lambda: A.gradcam(model, x, target=t_np, layer=layer, resize=False),
        "keras.io (eager)": lambda: snippet(x),
        "keras.io (tf.function)": lambda: compiled(x),
    }
    err = rel(fns["kgrad"](), snippet(x))
    times = bench(fns, repeats)
    print(f"\n### Grad-CAM, {name}, B={batch} (tensorflow)")
    print(f"max relative difference kgrad vs keras.io: {err:.1e}")
    print("| contender | seconds | kgrad / contender |\n|---|---:|---:|")
    for k, s in times.items():
        print(f"| {k} | {s:.4f} | {times['kgrad'] / s:.2f} |")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="cnn,mobilenet")
    args = parser.parse_args(argv)
    batch, steps = (8, 8) if args.quick else (32, 50)
    print(f"kgrad attribution benchmark: backend {BACKEND}, keras {keras.__version__}")
    for name in args.models.split(","):
        section_ig(name, batch, steps, args.repeats)
        if BACKEND == "tensorflow":
            section_gradcam(name, batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
