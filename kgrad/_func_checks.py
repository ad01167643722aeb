"""The checks and conversions around every transform of :mod:`kgrad.func`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras

from kgrad import _errors, _tree
from kgrad import backends as _backends

tree = keras.tree
Argnums = int | tuple[int, ...]


def _convert_tree(x: Any, backend) -> Any:
    return _tree.map_structure(backend.convert, x)


def _checked_output(f: Callable, fname: str, has_aux: bool, scalar: bool) -> Callable:
    """Wraps ``f`` so that a bad output structure fails with a clear error."""

    def checked(*args, **kwargs):
        out = f(*args, **kwargs)
        value = out
        if has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(
                    f"With `has_aux=True`, the function given to `kgrad.func.{fname}` must "
                    f"return a pair `(output, aux)`. Received: an output of type "
                    f"{type(out).__name__}. Return `(output, aux)` or set `has_aux=False`."
                )
            value = out[0]
        if scalar:
            _errors.check_scalar(value, fname)
        return out

    return checked


def _differentiate(
    fname: str, f: Callable, argnums: Argnums, has_aux: bool, scalar: bool, make=None
):
    """Builds the transform ``fname`` of the active backend around checks and conversion.

    ``make(checked_f)`` builds the transform; by default the backend's ``fname``.
    """
    _errors.check_callable(f, fname)
    nums = _errors.check_argnums(argnums, fname)
    backend = _backends.load()
    checked_f = _checked_output(f, fname, has_aux, scalar)
    if make is None:
        transformed = getattr(backend, fname)(checked_f, argnums=argnums, has_aux=has_aux)
    else:
        transformed = make(checked_f)

    @functools.wraps(f)
    def call(*args, **kwargs):
        _errors.check_args_for_argnums(args, nums, fname)
        args = list(args)
        for n in nums:
            leaves = _tree.flatten(args[n])
            native = [backend.convert(leaf) for leaf in leaves]
            if any(a is not b for a, b in zip(native, leaves)):  # NumPy or numbers given
                args[n] = _convert_tree(args[n], backend)
                native = _tree.flatten(args[n])
            _errors.check_float_leaves(native, f"func.{fname}")
        return transformed(*args, **kwargs)

    return call


def _mapped(backend, f: Callable, in_axes: Any, out_axes: Any, randomness: str) -> Callable:
    """The backend's ``vmap`` of ``f`` with ``kgrad.func.vmap``'s ``randomness``."""
    if randomness not in ("same", "different"):
        raise ValueError(
            f"`kgrad.func.vmap`'s `randomness` must be 'same' or 'different'. Received: "
            f"randomness={randomness!r}.{_errors.closest(str(randomness), ('same', 'different'))}"
        )
    if randomness == "same":
        return backend.vmap(f, in_axes=in_axes, out_axes=out_axes)
    if randomness in _backends.hook("vmap_randomness"):
        return backend.vmap(f, in_axes=in_axes, out_axes=out_axes, randomness=randomness)
    raise NotImplementedError(
        f"`kgrad.func.vmap(randomness='different')` needs a backend that draws random "
        f"values per mapped example, which the '{backend.name}' backend does not. "
        f"Received: randomness='different'. Pass one seed per example as a mapped "
        f"argument instead (e.g. `keras.random.normal(shape, seed=seed_i)`), or use "
        f"randomness='same'."
    )


def _check_mapped_axes(args: tuple, in_axes: Any) -> None:
    """``vmap``'s arguments against ``in_axes``, with the same message on every backend."""
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    if len(axes) != len(args):
        raise ValueError(
            f"vmap in_axes must have one entry per positional argument. "
            f"Received: in_axes={in_axes!r} for {len(args)} arguments."
        )
    sizes = set()
    for a, ax in zip(args, axes):
        if ax is None:
            continue
        leaves = _tree.flatten(a)
        leaf_axes = [ax] * len(leaves) if isinstance(ax, int) else _tree.flatten(ax)
        if len(leaf_axes) != len(leaves):
            continue  # a structure the backend's own vmap reports on
        for leaf, leaf_ax in zip(leaves, leaf_axes):
            shape = getattr(leaf, "shape", None)
            if (
                not isinstance(leaf_ax, int)
                or shape is None
                or not -len(shape) <= leaf_ax < len(shape)
            ):
                continue
            if shape[leaf_ax] is not None:
                sizes.add(int(shape[leaf_ax]))
    if len(sizes) > 1:
        raise ValueError(
            f"vmap got inconsistent sizes for the mapped axes. Received sizes: "
            f"{sorted(sizes)}. Make every mapped axis the same length."
        )
