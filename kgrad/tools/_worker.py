"""Computes kgrad's derivatives of saved models under one backend (``kgrad compare``).

Run as ``KERAS_BACKEND=<name> python -m kgrad.tools._worker JOBS.json``; each job names
a ``.keras`` model, its inputs (and targets) as ``.npy``, ``.npz`` or ``.csv``, the
``--import`` modules and ``--custom-objects`` to load it with, and an ``.npz`` to write.

When a job fails, the worker prints one line ``ERROR_MARK`` + JSON
(``{"job", "type", "message"}``) on stdout, the traceback on stderr, and exits
with status 1; ``kgrad compare`` shows the line and, with ``--verbose``, the
traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
import zlib

import keras
import numpy as np

import kgrad


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def compute(model, x, y=None, activations=(), hessian=False) -> dict[str, np.ndarray]:
    """Every derivative ``kgrad compare`` compares, as flat NumPy arrays keyed by name."""
    out: dict[str, np.ndarray] = {}
    loss = "mse" if y is not None else None
    float_inputs = all(np.asarray(leaf).dtype.kind == "f" for leaf in keras.tree.flatten(x))
    if float_inputs:
        for k, v in enumerate(keras.tree.flatten(kgrad.grad(model, x))):
            out[f"grad/inputs/{k}"] = _np(v)
        for k, v in enumerate(keras.tree.flatten(kgrad.jacobian(model, x))):
            out[f"jacobian/inputs/{k}"] = _np(v)
        if hessian:
            out["hessian/inputs"] = _np(kgrad.hessian(model, x, target=0))
            # The differential operators (forward mode, a different path on every backend).
            out["laplacian/inputs"] = _np(kgrad.laplacian(model, x, target=0))
            index = {"x0": (0,), "x0x1": (0, 1), "x0x0x1": (0, 0, 1), "x1^4": (1,) * 4}
            for key, d in kgrad.partial(model, x, index, target=0).items():
                out[f"partial/inputs/{key}"] = _np(d)
            direction = np.linspace(-1.0, 1.0, int(np.prod(np.shape(x)[1:]))).astype("float32")
            for k, term in enumerate(kgrad.taylor(model, x, direction, 3, target=0)):
                out[f"taylor/inputs/{k}"] = _np(term)
    leaves = keras.tree.flatten(x)
    if float_inputs and len(leaves) == 1 and np.ndim(leaves[0]) == 4:
        _add_attributions(out, model, x, activations)
    for name in activations:
        out[f"grad/activations/{name}"] = _np(kgrad.grad(model, x, wrt="activations", layers=name))
    for path, g in kgrad.grad(model, x, wrt="weights", y=y, loss=loss).items():
        out[f"grad/weights/{path}"] = _np(g)
    if y is not None:
        weights = kgrad.func.weights_of(model)
        vector = {
            path: np.random.default_rng(zlib.crc32(path.encode()))
            .normal(size=tuple(w.shape))
            .astype("float32")
            for path, w in weights.items()
        }
        for path, hv in kgrad.hvp(model, x, vector, y=y, loss=loss).items():
            out[f"hvp/weights/{path}"] = _np(hv)
    _add_layer_grads(out, model, x, y, loss)
    return out


def _add_attributions(out: dict, model, x, activations) -> None:
    """Adds kgrad.attribution's maps of an image model, one class per sample."""
    classes = int(np.shape(_np(model(x)))[1])
    target = np.arange(len(x)) % classes
    attribution = kgrad.attribution
    out["attribution/integrated_gradients"] = _np(
        attribution.integrated_gradients(model, x, target=target, steps=8)
    )
    out["attribution/smoothgrad"] = _np(
        attribution.smoothgrad(model, x, target=target, samples=4, seed=0)
    )
    if activations:
        out["attribution/gradcam"] = _np(
            attribution.gradcam(model, x, target=target, layer=activations[0])
        )


def _add_layer_grads(out: dict, model, x, y, loss) -> None:
    """Adds ``kgrad.layer_grad``'s output and weight gradients to ``out``."""
    for name, lg in kgrad.layer_grad(model, x, y, loss=loss).items():
        if lg.output_grad is not None:
            for k, v in enumerate(keras.tree.flatten(lg.output_grad)):
                out[f"layer_grad/{name}/output_grad/{k}"] = _np(v)
        for wname, g in lg.weight_grads.items():
            out[f"layer_grad/{name}/{wname}"] = _np(g)


def compute_zoo(model, x, y, target, activations=(), loss="mse", layer_grad=False):
    """The zoo's derivatives: saliency, Grad-CAM-style activation gradients, loss weight
    gradients and (optionally) ``layer_grad``, as flat NumPy arrays keyed by name."""
    from kgrad.tools import zoo

    out: dict[str, np.ndarray] = {}
    target = tuple(target) if isinstance(target, list) else target
    if all(np.asarray(leaf).dtype.kind == "f" for leaf in keras.tree.flatten(x)):
        for k, v in enumerate(keras.tree.flatten(kgrad.grad(model, x, target=target))):
            out[f"saliency/inputs/{k}"] = _np(v)
    for name in activations:
        g = kgrad.grad(model, x, wrt="activations", layers=name, target=target)
        out[f"gradcam/{name}"] = _np(g)
    loss_fn = zoo.loss_from_name(loss)
    for path, g in kgrad.grad(model, x, wrt="weights", y=y, loss=loss_fn).items():
        out[f"grad/weights/{path}"] = _np(g)
    if layer_grad:
        _add_layer_grads(out, model, x, y, loss_fn)
    return out


#: Starts the line a failed worker prints on stdout, before its JSON.
ERROR_MARK = "kgrad-worker-error: "


def _load_x(path: str, model=None):
    """A saved batch: ``.npy``, ``.csv``, or ``.npz`` of several inputs (matched to ``model``)."""
    from kgrad.tools import _loading

    return _loading.load_batch(path, model)


def _run_job(job) -> None:
    from kgrad.tools import _loading

    imports, objects = job.get("imports", ()), job.get("custom_objects", ())
    model = _loading.load_model(job["model"], imports, objects)
    x = _load_x(job["x"], model)
    y = _loading.load_batch(job["y"], model, "--targets") if job.get("y") else None
    if job.get("zoo"):
        z = job["zoo"]
        results = compute_zoo(
            model, x, y, z["target"], z["activations"], z["loss"], z["layer_grad"]
        )
    else:
        results = compute(model, x, y, job.get("activations", ()), job.get("hessian", False))
    np.savez(job["out"], **results)


def main(argv: list[str]) -> int:
    from kgrad.tools import zoo  # noqa: F401 (registers the zoo's custom layers and models)

    with open(argv[0]) as fh:
        jobs = json.load(fh)
    for job in jobs:
        try:
            _run_job(job)
        except Exception as err:  # reported to kgrad compare as one line, traceback on stderr
            traceback.print_exc()
            record = {"job": job["name"], "type": type(err).__name__, "message": str(err)}
            print(ERROR_MARK + json.dumps(record), flush=True)
            return 1
        print(f"{keras.backend.backend()}: {job['name']} done", flush=True)
        keras.backend.clear_session()  # frees the model's graphs before the next (zoo) job
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
