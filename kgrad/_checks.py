"""Validation of a model-level call's arguments (``x``, ``y``, ``wrt``), before it runs."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import keras
import numpy as np

from kgrad import _errors, _layers, _spec, _tree

tree = keras.tree

WRT_KINDS = ("inputs", "weights", "activations")


def _is_float(x) -> bool:
    dtype = _errors.dtype_name(x)
    return dtype.startswith("float") or dtype.startswith("bfloat")


def check_x(x, fname: str, is_keras: bool = True) -> None:
    """Raises for ``x=None`` and, for Keras models, for nested Python lists of numbers."""
    if x is None:
        raise ValueError(
            f"`kgrad.{fname}` needs the inputs `x`. Received: x=None. Pass a batch "
            f"(a NumPy array or a backend tensor; a list or dict of them for a "
            f"multi-input model)."
        )
    if is_keras and isinstance(x, (list, tuple)):
        numbers = [leaf for leaf in tree.flatten(x) if isinstance(leaf, (int, float, bool))]
        if numbers:
            raise ValueError(
                f"`x` is a Python list of numbers, which kgrad would read as "
                f"{len(tree.flatten(x))} separate inputs: a list stands for the inputs of "
                f"a multi-input model. Received: x of type {type(x).__name__} holding "
                f"Python numbers. Pass an array instead: `np.asarray(x, dtype='float32')`."
            )


def _check_inputs(model, x, fname):
    leaves = _tree.flatten(x)
    if not leaves:
        raise ValueError(f"`kgrad.{fname}` got no input. Received: x={x!r}.")
    for leaf in leaves:
        if not _is_float(leaf):
            embeddings = []
            if isinstance(model, keras.layers.Layer):
                embeddings = [
                    layer.name
                    for layer in _layers._all_layers(model)
                    if isinstance(layer, keras.layers.Embedding)
                ]
            hint = (
                f" Use `wrt='activations', layers={embeddings[0]!r}` to differentiate with "
                f"respect to the embedding layer's output."
                if embeddings
                else " Cast the input to float, or differentiate with respect to a layer's "
                "output with `wrt='activations'`."
            )
            raise TypeError(
                f"`wrt='inputs'` needs float inputs, but an input has dtype "
                f"{_errors.dtype_name(leaf)} and shape {tuple(leaf.shape)}. Received: "
                f"x with dtype {_errors.dtype_name(leaf)}.{hint}"
            )


def _shape(leaf) -> tuple:
    return tuple(None if d is None else int(d) for d in leaf.shape)


def _model_inputs(model) -> list | None:
    """The model's symbolic inputs in the order of ``tree.flatten(x)``, or None."""
    struct = getattr(model, "_inputs_struct", None)
    try:
        inputs = tree.flatten(struct) if struct is not None else list(model.inputs or [])
    except (AttributeError, ValueError, TypeError):
        return None
    if not inputs or not all(hasattr(i, "shape") for i in inputs):
        return None
    return inputs


def _check_input_shapes(model, x, fname) -> None:
    """Raises ValueError when ``x`` does not fit the model's declared inputs.

    Only models with symbolic inputs (Functional, Sequential with an ``Input``)
    are checked; Keras's own error for these cases names the layer but not
    what kgrad received.
    """
    inputs = _model_inputs(model)
    if inputs is None:
        return
    leaves = tree.flatten(x)
    expected = [tuple(i.shape) for i in inputs]
    if isinstance(x, dict) and len(inputs) > 1:
        names = [getattr(i, "name", None) for i in inputs]
        if set(x) == set(names):  # Keras matches a dict of inputs by name
            leaves = [x[n] for n in names]
    if len(leaves) != len(inputs):
        raise ValueError(
            f"Model '{model.name}' takes {len(inputs)} input(s) of shapes {expected}, but "
            f"`kgrad.{fname}` got {len(leaves)}. Received: x with shapes "
            f"{[_shape(leaf) for leaf in leaves]}. Pass one array per model input, as a "
            f"list (or dict keyed by input name) for a multi-input model."
        )
    for n, (leaf, want) in enumerate(zip(leaves, expected)):
        got = _shape(leaf)
        # Keras adds or drops a trailing axis of size 1 by itself.
        longer = got if len(got) > len(want) else want
        rank_ok = len(got) == len(want) or (
            abs(len(got) - len(want)) == 1 and longer[-1] in (1, None)
        )
        feat_ok = len(got) != len(want) or all(
            w is None or g is None or w == g for g, w in zip(got[1:], want[1:])
        )
        if not (rank_ok and feat_ok):
            which = f"input {n}" if len(inputs) > 1 else "the input"
            raise ValueError(
                f"`x` does not match model '{model.name}': {which} has shape {want} "
                f"(None is the batch axis), but the array given for it has shape {got}. "
                f"Received: x with shape {got}. Pass a batch of shape "
                f"(batch_size, {', '.join(str(d) for d in want[1:])}); for a single "
                f"sample, add the batch axis (`x[None]`)."
            )


def _check_batch_sizes(x, y, fname) -> None:
    """Raises ValueError when the arrays of ``x`` and ``y`` disagree on the batch size."""
    named = [("x", leaf) for leaf in _tree.flatten(x)]
    if y is not None:
        named += [("y", leaf) for leaf in _tree.flatten(y)]
    sizes = [(what, _shape(leaf)) for what, leaf in named if len(leaf.shape)]
    batch = {shape[0] for _, shape in sizes if shape[0] is not None}
    if len(batch) > 1:
        raise ValueError(
            f"`kgrad.{fname}` needs the same number of samples (the first axis) in every "
            f"array of `x` and `y`, but they differ. Received: "
            f"{', '.join(f'{what} with shape {shape}' for what, shape in sizes)}. Pass "
            f"arrays with one row per sample."
        )


def _normalize_wrt(wrt, fname):
    single = isinstance(wrt, str)
    kinds = (wrt,) if single else tuple(wrt) if isinstance(wrt, (list, tuple)) else None
    if not kinds or any(k not in WRT_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        bad = [k for k in (kinds or [wrt]) if k not in WRT_KINDS]
        hint = _errors.closest(bad[0], WRT_KINDS) if bad and isinstance(bad[0], str) else ""
        raise ValueError(
            f"`wrt` must be 'inputs', 'weights', 'activations' or a list of them without "
            f"repeats. Received: wrt={wrt!r}.{hint}"
        )
    return kinds, single


# Per model, the signatures (shapes and dtypes of `x` and `y`, and what the
# float check covered) whose checks passed: the same signature passes again,
# since each check reads only the shapes, the dtypes and the model's declared
# inputs. Failures are not remembered (each call raises afresh).
_passed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_passed_lock = threading.Lock()
_MAX_PASSED = 256


def float_part(model, x, input: Any, fname: str) -> Any:
    """The part of ``x`` that ``wrt="inputs"`` differentiates: all of it, or the ``input`` named."""
    if input is None:
        return x
    from kgrad._operator_args import resolve_input

    return tree.flatten(x)[resolve_input(model, x, input, fname)]


def check_model_call(model, x, y, fname: str, check_float: bool, input: Any = None) -> None:
    """The checks of a Keras model's call: float inputs, shapes, batch sizes.

    With ``check_float``, the inputs that ``wrt="inputs"`` differentiates (all,
    or the ``input`` named, see :func:`float_part`) must be float. Each
    signature is checked once per model (see ``_passed``).
    """
    try:
        key = (_spec.signature(x), _spec.signature(y), check_float, input)
        hash(key)
    except (AttributeError, TypeError):  # leaves without shapes: check every time
        key = None
    seen = _passed.get(model) if key is not None else None
    if seen is not None and key in seen:
        return
    if check_float:
        _check_inputs(model, float_part(model, x, input, fname), fname)
    _check_input_shapes(model, x, fname)
    _check_batch_sizes(x, y, fname)
    if key is not None:
        with _passed_lock:
            seen = _passed.get(model)
            if seen is None or len(seen) >= _MAX_PASSED:
                seen = _passed[model] = set()
            seen.add(key)


def normalize_target(target: Any) -> Any:
    """``target`` with integer scalars of NumPy or a backend (``np.int64(3)``,
    ``np.argmax(...)``, a 0-d integer array) as Python ints, in a tuple index
    too; anything else as given."""
    if target is None or type(target) is int or callable(target):
        return target
    if isinstance(target, (tuple, list)):
        return type(target)(normalize_target(t) for t in target)
    if isinstance(target, np.integer):
        return int(target)
    if getattr(target, "shape", None) == () and _errors.dtype_name(target).startswith(
        ("int", "uint")
    ):
        try:
            return int(target)
        except TypeError:  # a symbolic tensor: select() reports it
            return target
    return target
