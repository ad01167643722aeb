"""How kgrad resolves one output's loss entry to a ``keras.losses.Loss``, as ``compile`` does."""

from __future__ import annotations

import re
from typing import Any

import keras

from kgrad import _errors

ops = keras.ops

# Short names that `keras.losses.get` accepts besides the public names of `keras.losses`.
_ALIASES = ("mse", "mae", "mape", "msle", "crossentropy", "ce", "kld", "huber", "logcosh")


def _known_names() -> list[str]:
    public = [n for n in dir(keras.losses) if not n.startswith("_")]
    return [*_ALIASES, *(n for n in public if n not in ("get", "serialize", "deserialize"))]


def _resolve_name(entry: Any, loss: Any, label: str | None) -> None:
    """Raises for an entry that is not a loss; looks names up in ``keras.losses``."""
    where = f" (the entry for output {label})" if label is not None else ""
    if entry is None or isinstance(entry, keras.losses.Loss):
        return
    if isinstance(entry, str):
        if entry.lower() in ("crossentropy", "ce"):
            return
        try:
            keras.losses.get(entry)
        except ValueError as err:
            raise ValueError(
                f"Unknown loss {entry!r}{where}: {err}. Received: loss={loss!r}."
                f"{_errors.closest(entry, _known_names())} Use the name of a loss in "
                f"`keras.losses` (e.g. 'mse' or 'MeanSquaredError'), a keras.losses.Loss "
                f"or a callable loss(y_true, y_pred)."
            ) from err
        return
    if not callable(entry):
        raise TypeError(
            f"Each loss must be a name, a keras.losses.Loss, a callable "
            f"loss(y_true, y_pred) or None{where}, but got {entry!r} of type "
            f"{type(entry).__name__}. Received: loss={loss!r}."
        )


class _Function(keras.losses.Loss):
    """A loss function reduced as Keras reduces it (``"sum_over_batch_size"``).

    Like Keras's wrapper for loss functions, it first squeezes or expands a
    trailing axis of size 1 so that targets and predictions have the same rank.
    """

    def __init__(self, fn, name: str, dtype: str | None):
        super().__init__(name=name, reduction="sum_over_batch_size", dtype=dtype)
        self.fn = fn

    def call(self, y_true, y_pred):
        if hasattr(y_true, "shape") and hasattr(y_pred, "shape"):
            y_true, y_pred = _same_rank(y_true, y_pred)
        return self.fn(y_true, y_pred)


def _same_rank(a, b):
    """Keras's rule: drops (or adds) a trailing axis of size 1 where ranks differ by one."""
    ra, rb = len(a.shape), len(b.shape)
    if ra == rb + 1 and a.shape[-1] == 1:
        return (a, ops.expand_dims(b, -1)) if rb == 1 else (ops.squeeze(a, -1), b)
    if rb == ra + 1 and b.shape[-1] == 1:
        return (ops.expand_dims(a, -1), b) if ra == 1 else (a, ops.squeeze(b, -1))
    return a, b


def _loss_object(entry: Any, y_true: Any, y_pred: Any) -> keras.losses.Loss:
    """The ``keras.losses.Loss`` for one output's entry, as ``compile`` resolves it."""
    if isinstance(entry, keras.losses.Loss):
        return entry
    if isinstance(entry, str) and entry.lower() in ("crossentropy", "ce"):
        # compile's shortcut: binary, sparse or categorical from the shapes.
        sparse = len(y_true.shape) < len(y_pred.shape) or (
            y_true.shape[-1] == 1 and y_pred.shape[-1] > 1
        )
        if y_pred.shape[-1] == 1:
            fn = keras.losses.binary_crossentropy
        elif sparse:
            fn = keras.losses.sparse_categorical_crossentropy
        else:
            fn = keras.losses.categorical_crossentropy
    else:
        fn = keras.losses.get(entry)
        if isinstance(fn, keras.losses.Loss):
            return fn
    name = entry if isinstance(entry, str) else getattr(fn, "__name__", "loss")
    # A valid name scope on every backend (TensorFlow refuses "<lambda>", "_f").
    name = re.sub(r"[^A-Za-z0-9_.]", "", name).lstrip("_") or "loss"
    # Keras computes losses in floatx; keep float64 outputs in float64.
    dtype = "float64" if _errors.dtype_name(y_pred) == "float64" else None
    return _Function(fn, name=name, dtype=dtype)


def _shape(leaf: Any) -> tuple:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        return ()
    return tuple(None if d is None else int(d) for d in shape)
