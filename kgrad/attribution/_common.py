"""What every attribution method shares: targets, the compiled gradient and value, datasets.

A ``target`` is resolved once per call into a static option (``None``, an int,
a tuple index or a callable, which :meth:`kgrad._objective.Objective.select`
applies) or a per-sample index array ``(B,)``, which travels as an array
argument of the compiled function (``"target_index"``), so that a new array of
classes never recompiles.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from kgrad import _batches, _compiled, _errors, func
from kgrad._objective import _sum_all

ops = keras.ops
tree = keras.tree


class Target:
    """A resolved ``target``: ``option`` (static) or ``index`` (an int array ``(B,)``)."""

    __slots__ = ("option", "index")

    def __init__(self, option: Any = None, index: np.ndarray | None = None):
        self.option, self.index = option, index

    def repeat_each(self, times: int) -> Target:
        """The target of a batch whose samples each come ``times`` times in a row."""
        if self.index is None:
            return self
        return Target(index=np.repeat(self.index, times, axis=0))

    def rows(self, start: int, stop: int) -> Target:
        """The target of samples ``start:stop``."""
        if self.index is None:
            return self
        return Target(index=self.index[start:stop])


def float_input(leaf: Any, what: str):
    """``leaf`` as a tensor; a TypeError unless it is float (``what`` says why it must be)."""
    leaf = ops.convert_to_tensor(leaf)
    dtype = keras.backend.standardize_dtype(leaf.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(
            f"{what}, which must be float. Received: an input of dtype {dtype}. Cast it to "
            f"float32; for token ids, differentiate the embedding's output with "
            f"kgrad.grad(model, x, wrt='activations', layers=<embedding layer>) instead."
        )
    return leaf


def batch_size(x: Any) -> int:
    return int(tree.flatten(x)[0].shape[0])


def resolve_target(model: Any, x: Any, target: Any, fname: str) -> Target:
    """Checks ``target`` and turns a per-sample array into a non-negative index array."""
    if target is None or callable(target):
        return Target(option=target)
    if isinstance(target, bool):
        raise TypeError(_target_message(fname, target))
    if isinstance(target, numbers.Integral):
        return Target(option=int(target))
    if isinstance(target, tuple):
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in target):
            raise TypeError(_target_message(fname, target))
        return Target(option=tuple(int(i) for i in target))
    try:
        index = np.asarray(
            keras.ops.convert_to_numpy(target) if hasattr(target, "shape") else target
        )
    except (TypeError, ValueError) as err:
        raise TypeError(_target_message(fname, target)) from err
    if index.ndim == 0 and np.issubdtype(index.dtype, np.integer):
        return Target(option=int(index))
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise TypeError(_target_message(fname, target))
    n = batch_size(x)
    if index.shape[0] != n:
        raise ValueError(
            f"`kgrad.attribution.{fname}` got one target per sample, but {index.shape[0]} "
            f"targets for a batch of {n}. Received: target of shape {index.shape}. Pass "
            f"an int array of shape ({n},), or one int for every sample."
        )
    classes = _classes(model, x)
    if classes is not None and (index.min() < -classes or index.max() >= classes):
        raise ValueError(
            f"`kgrad.attribution.{fname}` got a target out of range for an output with "
            f"{classes} entries per sample. Received: targets from {index.min()} to "
            f"{index.max()}. Use indices from {-classes} to {classes - 1}."
        )
    if classes is not None:
        index = index % classes
    return Target(index=index.astype("int32"))


def _target_message(fname: str, target: Any) -> str:
    return (
        f"`kgrad.attribution.{fname}` takes as `target` an int (one class for every "
        f"sample), an int array of shape (B,) (one class per sample), a tuple of ints "
        f"(an index into each sample's output) or a callable `y -> tensor`. Received: "
        f"target={target!r} of type {type(target).__name__}."
    )


# Output shapes found by running one sample (models without symbolic outputs), per
# model, keyed by the input's sample shapes and the model's layers (a layer added
# to the model changes the key, so a cached size never outlives the model it fits).
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _classes(model: Any, x: Any) -> int | None:
    """The size of the output's first feature axis (what a per-sample index picks from)."""
    shape = _symbolic_output_shape(model)
    if shape is None:
        shape = _probed_output_shape(model, x)
    if len(shape) < 2:
        raise ValueError(
            "A per-sample target array indexes each sample's output, but the output has "
            f"no feature axis (shape {shape}). Received: a target array. Leave target=None."
        )
    return None if shape[1] is None else int(shape[1])


def _probed_output_shape(model: Any, x: Any) -> tuple:
    """The output shape of ``model`` on one sample of ``x``, cached per model."""
    key = (
        tuple(tuple(leaf.shape[1:]) for leaf in tree.flatten(x)),
        tuple(map(id, getattr(model, "layers", None) or ())),
    )
    try:
        known = _PROBED.setdefault(model, {})
    except TypeError:  # a plain function that cannot be held weakly
        known = {}
    if key not in known:
        first = tree.map_structure(lambda leaf: leaf[:1], x)
        out = model(first, training=False) if isinstance(model, keras.Model) else model(first)
        if not hasattr(out, "shape"):
            raise ValueError(
                "A per-sample target array indexes a single output tensor, but this model "
                f"returns a {type(out).__name__}. Received: a target array. Use a callable "
                "target, e.g. target=lambda y: y['name'][:, 3]."
            )
        known[key] = tuple(out.shape)
    return known[key]


def _symbolic_output_shape(model: Any) -> tuple | None:
    try:
        outputs = model.outputs
    except (AttributeError, ValueError, TypeError, RuntimeError):
        return None
    if not isinstance(outputs, (list, tuple)) or len(outputs) != 1:
        return None
    return tuple(outputs[0].shape)


def select(req: Any, out: Any, index: Any):
    """The selected outputs: ``target``'s option, or ``out[b, index[b]]`` per sample."""
    if index is None:
        return req.select(out)
    if not hasattr(out, "shape"):
        raise ValueError(
            "A per-sample target array indexes a single output tensor, but this output is a "
            f"{type(out).__name__}. Received: a target array. Use a callable target."
        )
    rank = len(out.shape)
    return ops.take_along_axis(out, ops.reshape(index, (-1,) + (1,) * (rank - 1)), axis=1)


def selected_sum(req: Any, out: Any, index: Any):
    """The scalar objective: the selected outputs (see :func:`select`) summed."""
    return _sum_all(select(req, out, index))


def per_sample_sum(selected: Any, n: int | None):
    """The selected outputs summed per sample: ``(B,)``."""
    total = None
    for leaf in tree.flatten(selected):
        if len(leaf.shape) == 0 or (n is not None and leaf.shape[0] != n):
            raise ValueError(
                "A callable `target` must keep the batch axis first, so that each sample's "
                f"value is known. Received: a target output of shape {tuple(leaf.shape)} for a "
                f"batch of {n}. Return e.g. y[:, 3] rather than a sum over the batch."
            )
        row = ops.sum(ops.reshape(leaf, (leaf.shape[0], -1)), axis=1)
        total = row if total is None else total + row
    return total


@_errors.model_level
def _gradient(req, arrays, options):
    """The gradient of the selected outputs with respect to the inputs, per sample."""
    req.check_per_sample("Attributions", "a model without batch statistics")
    index = arrays.get("target_index")

    def objective(args):
        out, _, _ = req.run(args)
        return selected_sum(req, out, index)

    return func.grad(objective)(req.args(("inputs",)))["inputs"]


@_errors.model_level
def _value(req, arrays, options):
    """The selected outputs summed per sample, ``(B,)``."""
    out, _, _ = req.run(req.args(("inputs",)))
    return per_sample_sum(select(req, out, arrays.get("target_index")), req.batch_size)


def call(
    fname: str,
    body: Callable,
    model: Any,
    x: Any,
    target: Target,
    training: bool,
    extra: dict | None = None,
    **options: Any,
):
    """``body(req, arrays, options)`` compiled and cached.

    ``extra`` adds array arguments; ``options`` add to (or replace) the default
    options, ``wrt="inputs"`` among them.
    """
    arrays = {"x": x, **(extra or {})}
    if target.index is not None:
        arrays["target_index"] = target.index
    # The body is part of the key: the gradient and the value of one batch share the
    # rest of their signature.
    options = {
        "wrt": "inputs",
        "target": target.option,
        "training": bool(training),
        "part": body.__name__,
        **options,
    }
    return _compiled.call(f"attribution.{fname}", body, model, arrays, options)


def gradient(model, x, target: Target, fname: str, training: bool = False):
    """∂ (selected outputs) / ∂x, structured like ``x``."""
    return call(fname, _gradient, model, x, target, training)


def value(model, x, target: Target, fname: str, training: bool = False):
    """The selected outputs summed per sample, ``(B,)``."""
    return call(fname, _value, model, x, target, training)


def stream(fname: str, compute: Callable, x: Any, target: Any):
    """``compute(x)`` for one batch; for a dataset, per batch, concatenated, with progress."""
    if not _batches.is_batches(x):
        return compute(x)
    if target is not None and not callable(target) and not isinstance(target, (int, tuple)):
        raise ValueError(
            f"`kgrad.attribution.{fname}` got `x` as batches and a per-sample `target` "
            f"array, which cannot be matched to them. Received: target of type "
            f"{type(target).__name__}. Pass one int or a callable, or loop over the batches."
        )
    # Labels in (x, y) batches are not used.
    parts = [compute(bx) for bx, _ in _batches.each(x, f"kgrad.attribution.{fname}")]
    return tree.map_structure(lambda *leaves: ops.concatenate(leaves, axis=0), *parts)
