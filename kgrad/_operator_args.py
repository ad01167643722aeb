"""Argument handling of the differential operators: ``input=``, feature indices, directions."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from kgrad import _checks

tree = keras.tree

METHODS = ("exact", "stochastic")
DEFAULT_SAMPLES = 16


def input_names(model, x) -> list[str | None]:
    """The names of the model's inputs, aligned with ``tree.flatten(x)`` where known."""
    if isinstance(x, dict):
        return list(sorted(x))  # tree.flatten orders dict keys
    inputs = _checks._model_inputs(model) if isinstance(model, keras.layers.Layer) else None
    n = len(tree.flatten(x))
    if inputs is None or len(inputs) != n:
        return [None] * n
    return [getattr(i, "name", None) for i in inputs]


def resolve_input(model, x, input: Any, fname: str) -> int:
    """The position of the chosen input among ``tree.flatten(x)``.

    ``input`` is ``None`` (the only input), a position (an int into the model's
    inputs, in ``x``'s order), or a name (a key of a dict ``x``, or the name of
    one of the model's ``keras.Input`` layers).
    """
    names = input_names(model, x)
    n = len(names)
    shown = [nm if nm is not None else i for i, nm in enumerate(names)]
    if input is None:
        if n != 1:
            raise ValueError(
                f"`kgrad.{fname}` differentiates with respect to one input, but the model "
                f"gets {n} inputs. Received: input=None. Pass `input=` with a name or "
                f"position from {shown}."
            )
        return 0
    if isinstance(input, bool) or not isinstance(input, (int, str)):
        raise TypeError(
            f"`input` must be a name or a position. Received: input={input!r} of type "
            f"{type(input).__name__}."
        )
    if isinstance(input, int):
        if isinstance(x, dict) and names[0] is not None:
            inputs = _checks._model_inputs(model) if isinstance(model, keras.layers.Layer) else None
            ordered = [getattr(i, "name", None) for i in inputs or []]
            if 0 <= input < len(ordered) and ordered[input] in names:
                return names.index(ordered[input])
        if not 0 <= input < n:
            raise ValueError(
                f"`input` is out of range: the model gets {n} input(s). Received: "
                f"input={input}. Use a position from 0 to {n - 1}, or a name from {shown}."
            )
        return input
    if input not in names:
        from kgrad._errors import closest

        valid = [nm for nm in names if nm is not None]
        raise ValueError(
            f"No input named {input!r}. Received: input={input!r}.{closest(input, valid)} "
            f"The inputs are {shown}."
        )
    return names.index(input)


def _flat_entry(entry: Any, feat: tuple[int, ...], what: str) -> int:
    """One feature index (an int into the C-order flattening, or a tuple per axis) -> int."""
    n = math.prod(feat)
    if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
        i = int(entry)
        if not -n <= i < n:
            raise ValueError(
                f"{what} is out of range: one sample of this input has {n} features "
                f"(shape {feat}). Received: {entry!r}. Use an int from {-n} to {n - 1} "
                f"(C order), or a tuple with one index per feature axis."
            )
        return i % n
    if isinstance(entry, tuple) and all(
        isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in entry
    ):
        if len(entry) != len(feat):
            raise ValueError(
                f"{what} must have one index per feature axis: one sample of this input "
                f"has shape {feat}. Received: {entry!r}. Give {len(feat)} indices, or one "
                f"int into the C-order flattening."
            )
        for axis, (e, size) in enumerate(zip(entry, feat)):
            if not -size <= e < size:
                raise ValueError(
                    f"{what} is out of range on feature axis {axis}, of size {size} (one "
                    f"sample's shape: {feat}). Received: {entry!r}."
                )
        return int(np.ravel_multi_index(tuple(int(e) % s for e, s in zip(entry, feat)), feat))
    raise TypeError(
        f"{what} must be an int or a tuple of ints (one per feature axis). Received: "
        f"{entry!r} of type {type(entry).__name__}."
    )


def normalize_index(index: Any) -> Any:
    """``index`` in a hashable form (lists become tuples), before shapes are known."""
    if isinstance(index, dict):
        return tuple((k, normalize_index(v)) for k, v in index.items())
    if isinstance(index, (list, tuple)):
        return tuple(normalize_index(i) for i in index)
    return index


def flat_index(index: Any, feat: tuple[int, ...], name: str | None = None) -> tuple[int, ...]:
    """A partial's index (one entry per derivative) as ints into the flattened features."""
    what = f"An entry of index[{name!r}]" if name is not None else "An entry of `index`"
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        index = (index,)  # a bare int: a first derivative
    if not isinstance(index, tuple) or not index:
        raise ValueError(
            f"`index` names one derivative per entry and needs at least one (order >= 1): "
            f"(0,) is d/dx0, (1, 1) is d2/dx1^2. Received: index={index!r}"
            f"{'' if name is None else f' for {name!r}'}."
        )
    return tuple(_flat_entry(e, feat, what) for e in index)


def directions(seed: Any, samples: int, feat: tuple[int, ...], dtype: str):
    """``samples`` Rademacher directions ``(samples, *feat)`` (entries -1 or +1).

    ``seed`` is an int (the same directions every call), None (fresh ones every
    call) or a ``keras.random.SeedGenerator`` (drawn with Keras's random ops,
    so a generator held by a model advances step by step inside ``fit``).
    """
    shape = (samples, *feat)
    if isinstance(seed, keras.random.SeedGenerator):
        bits = keras.random.randint(shape, 0, 2, seed=seed)
        return keras.ops.cast(bits * 2 - 1, dtype)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(
            f"`seed` must be an int, None or a keras.random.SeedGenerator. Received: "
            f"seed={seed!r} of type {type(seed).__name__}."
        )
    rng = np.random.default_rng(None if seed is None else int(seed))
    return (rng.integers(0, 2, size=shape) * 2 - 1).astype(dtype)


def check_method(method: Any, samples: Any, seed: Any, fname: str) -> int | None:
    """Validates ``method``/``samples``/``seed``; returns the number of samples (or None)."""
    if method not in METHODS:
        raise ValueError(
            f"`method` of `kgrad.{fname}` must be one of {METHODS}. Received: method={method!r}."
        )
    if method == "exact":
        if samples is not None or seed is not None:
            raise ValueError(
                f"`samples` and `seed` apply to method='stochastic' only. Received: "
                f"method='exact', samples={samples!r}, seed={seed!r}. Drop them, or pass "
                f"method='stochastic'."
            )
        return None
    if samples is None:
        return DEFAULT_SAMPLES
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(
            f"`samples` must be a positive int (the number of random directions). "
            f"Received: samples={samples!r}."
        )
    return int(samples)
