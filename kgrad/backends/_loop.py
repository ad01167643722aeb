"""A batched map written as a Python loop, for functions a backend cannot vectorise."""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import keras

# reason -> the models already warned about (weakly held, so a model's id can
# be reused after it is gone); `_NO_MODEL` stands for kgrad.func calls.
_warned: dict[str, weakref.WeakKeyDictionary] = {}
_lock = threading.Lock()


class _NoModel:
    pass


_NO_MODEL = _NoModel()


def warn_loop(reason: str, n: int) -> None:
    """Warns once per model and reason that ``n`` directions are computed one at a time.

    The model is the one of the model-level call running in this thread
    (``kgrad._errors.current_model``); ``kgrad.func`` calls share one entry.
    """
    from kgrad import _errors

    model = _errors.current_model()
    owner = _NO_MODEL if model is None else model
    with _lock:
        seen = _warned.setdefault(reason, weakref.WeakKeyDictionary())
        try:
            if owner in seen:
                return
            seen[owner] = True
        except TypeError:  # a callable that cannot be held weakly
            if _NO_MODEL in seen:
                return
            seen[_NO_MODEL] = True
    where = f" of model '{model.name}'" if getattr(model, "name", None) else ""
    warnings.warn(
        f"kgrad computes {n} Jacobian or Hessian directions{where} one at a time, which is "
        f"slower than one vectorised pass: {reason}. The results are the same. Pass "
        f"`chunk_size=` to bound memory, or use `hvp`/`jvp` for products. (Shown once "
        f"per model.)",
        RuntimeWarning,
        stacklevel=4,
    )


def loop_map(fn: Callable, stacked: Any) -> Any:
    """``vmap(fn)(stacked)`` as a loop over the leading axis of ``stacked``'s leaves."""
    tree = keras.tree
    n = tree.flatten(stacked)[0].shape[0]
    outs = [fn(tree.map_structure(lambda s, i=i: s[i], stacked)) for i in range(n)]
    return tree.map_structure(lambda *o: keras.ops.stack(o), *outs)
