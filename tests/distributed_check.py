"""Every public function under ``keras.distribution`` on 8 simulated CPU devices (JAX).

Run by tests/test_distribution.py in a process of its own (the device count
is fixed when JAX starts)::

    python tests/distributed_check.py DataParallel ModelParallel

For each function: the result on one device (no distribution), then under the
distribution on a model with the same weights (an MLP with a LayerNormalization;
Grad-CAM on a small CNN). Prints one JSON line: per
function, the largest difference, and for each result array whether it is
laid out as expected: per-sample results split along the batch axis over the
mesh's batch dimension, weight-shaped results with their weight's layout.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import kgrad  # noqa: E402

L = keras.layers
A = kgrad.attribution
B = 16  # two samples per device along the batch dimension (8 or 4 devices)


def build():
    inputs = keras.Input((6,))
    h = L.Dense(8, activation="tanh", name="h")(inputs)
    h = L.LayerNormalization(name="norm")(h)
    return keras.Model(inputs, L.Dense(6, name="o")(h), name="net")


def build_conv():
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    return keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(h)), name="cnn")


def report_numbers(report):
    """A grad report's numbers, layer by layer, as arrays."""
    out = {}
    for name, stats in report.layers.items():
        norms = [stats.activation_norm, stats.output_grad_norm, *stats.weight_grad_norms.values()]
        out[name] = np.array([np.nan if v is None else v for v in norms], "float64")
    return out


def calls(model, x, y, loss, conv, images):
    """name -> (result, kind): kind says which results are per-sample or weight-shaped."""
    v = {w.path: np.full(w.shape, 0.1, "float32") for w in model.trainable_variables}
    direction = np.ones_like(x)
    value, g = kgrad.value_and_grad(model, x, wrt="weights", y=y, loss=loss)
    report = kgrad.layer_grad(model, x, y, loss=loss, layers="h")["h"]
    top, bottom = kgrad.hessian_eigenvalues(model, x, y, loss=loss, k=1, which="both", seed=0)
    return {
        "grad inputs": (kgrad.grad(model, x), "batch"),
        # 24 samples: a size that kgrad's batch-size buckets would pad on one device.
        "grad inputs, 24 samples": (kgrad.grad(model, np.concatenate([x, x[:8]])), "batch"),
        "grad weights": (kgrad.grad(model, x, wrt="weights", y=y, loss=loss), "weights"),
        "value_and_grad": ((value, g), "weights"),
        "jacobian inputs": (kgrad.jacobian(model, x), "batch"),
        "jacobian weights": (kgrad.jacobian(model, x, wrt="weights", target=0), "batch"),
        "hessian inputs": (kgrad.hessian(model, x, target=0), "batch"),
        "hvp weights": (kgrad.hvp(model, x, v, y=y, loss=loss), "weights"),
        "layer_grad": (
            {"out": report.output_grad, **{f"h/{k}": g for k, g in report.weight_grads.items()}},
            "mixed",
        ),
        "per_sample_grad": (kgrad.per_sample_grad(model, x, y, loss=loss), "batch"),
        "per_sample_grad_norm": (kgrad.per_sample_grad_norm(model, x, y, loss=loss), "batch"),
        "hessian_eigenvalues": ((np.asarray(top), np.asarray(bottom)), "host"),
        "hessian_trace": (kgrad.hessian_trace(model, x, y, loss=loss, samples=8, seed=0), "host"),
        "partial": (kgrad.partial(model, x, (0, 1), target=0), "batch"),
        "laplacian": (kgrad.laplacian(model, x), "batch"),
        "divergence": (kgrad.divergence(model, x), "batch"),
        "taylor": (kgrad.taylor(model, x, direction, 2, target=0), "batch"),
        "saliency": (A.saliency(model, x, target=1), "batch"),
        # A stream: each batch laid out on its own, the results concatenated.
        "saliency of a stream": (A.saliency(model, iter([x[:8], x[8:]]), target=1), "batch"),
        "input_x_gradient": (A.input_x_gradient(model, x, target=1), "batch"),
        "integrated_gradients": (A.integrated_gradients(model, x, target=1, steps=8), "batch"),
        "smoothgrad": (A.smoothgrad(model, x, target=1, samples=4, seed=0), "batch"),
        "check_grad": (np.float32(kgrad.check_grad(model, x).ok), "host"),
        "grad_report": (report_numbers(kgrad.grad_report(model, x, y, loss=loss)), "host"),
        "gradcam": (A.gradcam(conv, images, target=1, layer="conv"), "batch"),
    }


def laid_out(t, kind, path, model, batch_axis) -> bool:
    """Whether ``t`` is placed as ``kind`` says (host results: always)."""
    if kind == "host" or not isinstance(t, jax.Array):
        return True
    if kind == "mixed":
        kind = "weights" if path in {w.path for w in model.weights} else "batch"
    if kind == "weights":
        if not path:  # a scalar value beside the weights (value_and_grad)
            return t.ndim == 0
        variable = {w.path: w for w in model.weights}[path]
        return t.sharding.is_equivalent_to(variable.value.sharding, t.ndim)
    spec = getattr(t.sharding, "spec", ())
    return len(spec) > 0 and spec[0] == batch_axis


def leaves_with_paths(result):
    out = []

    def walk(value, path):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, path)
        else:
            out.append((path, value))

    walk(result, "")
    return out


def distribution_of(kind: str, devices):
    if kind == "DataParallel":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["h/kernel"] = (None, "model")
    layouts["o/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch")


def main(kinds: list[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 6)).astype("float32")
    y = rng.normal(size=(B, 6)).astype("float32")
    loss = "mse"
    images = rng.normal(size=(B, 6, 6, 2)).astype("float32")
    reference_model, reference_conv = build(), build_conv()
    reference = calls(reference_model, x, y, loss, reference_conv, images)
    devices = jax.devices()
    out = {"devices": len(devices)}
    for kind in kinds:
        distribution = distribution_of(kind, devices)
        keras.distribution.set_distribution(distribution)
        model, conv = build(), build_conv()
        model.set_weights(reference_model.get_weights())
        conv.set_weights(reference_conv.get_weights())
        kernels = {w.path: str(w.value.sharding.spec) for w in model.weights if "kernel" in w.path}
        report = {}
        for name, (got, what) in calls(model, x, y, loss, conv, images).items():
            want = reference[name][0]
            diff, placed = 0.0, True
            for (path, g), (_, w) in zip(leaves_with_paths(got), leaves_with_paths(want)):
                gap = np.abs(np.asarray(g, "float64") - np.asarray(w, "float64"))
                diff = max(diff, float(np.nanmax(gap, initial=0.0)))
                placed = placed and laid_out(g, what, path, model, distribution.batch_dim_name)
            report[name] = {"max_difference": diff, "laid_out": placed}
        try:
            kgrad.grad(model, x[:13])
            refused = ""
        except ValueError as err:
            refused = str(err)
        out[kind] = {"kernels": kernels, "functions": report, "refused": refused}
        keras.distribution.set_distribution(None)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
