"""A batched map written as a Python loop, for functions a backend cannot vectorise."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import keras

_warned: set[str] = set()
_lock = threading.Lock()


def warn_loop(reason: str, n: int) -> None:
    """Warns once per reason that ``n`` directions are computed one at a time."""
    with _lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(
        f"kgrad computes {n} Jacobian or Hessian directions one at a time, which is "
        f"slower than one vectorised pass: {reason}. The results are the same. Pass "
        f"`chunk_size=` to bound memory, or use `hvp`/`jvp` for products. (Shown once.)",
        RuntimeWarning,
        stacklevel=4,
    )


def loop_map(fn: Callable, stacked: Any) -> Any:
    """``vmap(fn)(stacked)`` as a loop over the leading axis of ``stacked``'s leaves."""
    tree = keras.tree
    n = tree.flatten(stacked)[0].shape[0]
    outs = [fn(tree.map_structure(lambda s, i=i: s[i], stacked)) for i in range(n)]
    return tree.map_structure(lambda *o: keras.ops.stack(o), *outs)
