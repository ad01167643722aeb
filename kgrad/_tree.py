"""``keras.tree``'s flatten, map and pack, direct for the structures of every call.

kgrad flattens, maps and packs its own arguments on every call: a tensor, or
dicts, lists and tuples of tensors (``{"weights": {path: value}}``). On the
torch backend ``keras.tree`` goes through ``torch.utils._pytree``, which costs
tens of microseconds per call for these. The functions here walk such
structures directly and hand anything else (``None``, named tuples, other
mappings, non-string keys) to ``keras.tree`` whole.

The order is ``keras.tree``'s documented one, dict values by sorted key at
every level, which Keras follows on JAX and TensorFlow; Keras 3.15's torch tree
sorts only the outermost dict of a structure (a dict inside it keeps its
insertion order). So kgrad uses these functions where it both flattens and packs
a structure itself, or where the order does not matter (a check over every
leaf, a sum), and ``keras.tree`` where the order must be Keras's own (matching
``x`` to a model's inputs).

Example:

>>> from kgrad import _tree
>>> import numpy as np
>>> a, b = np.zeros(2), np.ones(3)
>>> [v.shape for v in _tree.flatten({"w": {"b": b, "a": a}})]
[(2,), (3,)]
>>> _tree.pack_sequence_as({"b": b, "a": a}, [1, 2])
{'b': 2, 'a': 1}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

tree = keras.tree


class _Other(Exception):
    """A structure these fast paths leave to ``keras.tree``."""


def _keys(d: dict) -> list:
    for k in d:
        if type(k) is not str:
            raise _Other
    return sorted(d)


def _is_leaf(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _flatten(x: Any, out: list) -> None:
    t = type(x)
    if t is dict:
        for k in _keys(x):
            _flatten(x[k], out)
    elif t is list or t is tuple:
        for v in x:
            _flatten(v, out)
    elif _is_leaf(x):
        out.append(x)
    else:
        raise _Other


def flatten(x: Any) -> list:
    """``keras.tree.flatten(x)``."""
    out: list = []
    try:
        _flatten(x, out)
    except _Other:
        return tree.flatten(x)
    return out


def _map(fn: Callable, x: Any) -> Any:
    t = type(x)
    if t is dict:
        _keys(x)
        return {k: _map(fn, v) for k, v in x.items()}
    if t is list:
        return [_map(fn, v) for v in x]
    if t is tuple:
        return tuple(_map(fn, v) for v in x)
    if _is_leaf(x):
        return fn(x)
    raise _Other


def map_structure(fn: Callable, x: Any) -> Any:
    """``keras.tree.map_structure(fn, x)`` for one structure."""
    try:
        return _map(fn, x)
    except _Other:
        return tree.map_structure(fn, x)


def _pack(structure: Any, it) -> Any:
    t = type(structure)
    if t is dict:
        by_key = {k: _pack(structure[k], it) for k in _keys(structure)}
        return {k: by_key[k] for k in structure}
    if t is list:
        return [_pack(v, it) for v in structure]
    if t is tuple:
        return tuple(_pack(v, it) for v in structure)
    if _is_leaf(structure):
        for value in it:
            return value
    raise _Other  # not a structure of arrays, or too few values: keras.tree's result or error


def pack_sequence_as(structure: Any, flat: list) -> Any:
    """``keras.tree.pack_sequence_as(structure, flat)``; dicts keep ``structure``'s key order."""
    flat = list(flat)
    try:
        it = iter(flat)
        out = _pack(structure, it)
    except _Other:
        return tree.pack_sequence_as(structure, flat)
    if next(it, it) is not it:  # values left over: keras.tree's error
        return tree.pack_sequence_as(structure, flat)
    return out
