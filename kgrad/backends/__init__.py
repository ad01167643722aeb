"""Selects kgrad's backend module from the backend Keras runs on.

Frameworks are imported lazily: only ``kgrad.backends.<keras backend>`` is
ever imported, and only on the first kgrad call that needs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import keras

from kgrad.backends import _contract

#: Keras backends kgrad can differentiate with.
SUPPORTED = ("jax", "tensorflow", "torch")

_loaded: dict[str, ModuleType] = {}


def name() -> str:
    """Returns the name of the active Keras backend."""
    return keras.backend.backend()


def load() -> ModuleType:
    """Returns the backend module for the backend Keras runs on.

    Raises:
        NotImplementedError: if Keras runs on a backend without automatic
            differentiation (``numpy``, ``openvino``).

    Example:

    >>> from kgrad import backends
    >>> backends.load().name in backends.SUPPORTED
    True
    """
    active = name()
    module = _loaded.get(active)
    if module is None:
        if active not in SUPPORTED:
            raise NotImplementedError(
                f"kgrad needs a Keras backend with automatic differentiation, but Keras "
                f"runs on the '{active}' backend, which has none. Received: "
                f"keras.backend.backend()='{active}'. Supported backends: "
                f"{', '.join(SUPPORTED)}. Switch by setting the environment variable "
                f"before Python starts, e.g. `KERAS_BACKEND=jax python ...`, or set "
                f'"backend" in ~/.keras/keras.json.'
            )
        module = importlib.import_module(f"kgrad.backends.{active}")
        _loaded[active] = module
    return module


def hook(member: str) -> Any:
    """The active backend's ``member``, or the default that ``_contract`` declares.

    Example:

    >>> from kgrad import backends
    >>> callable(backends.hook("inside_graph"))
    True
    """
    module = load()
    key = (module.name, member)
    found = _hooks.get(key, _hooks)
    if found is not _hooks:
        return found
    if hasattr(module, member):
        found = getattr(module, member)
    elif member in _contract.DEFAULTS:
        found = _contract.DEFAULTS[member]
    else:
        raise AttributeError(
            f"No backend hook named {member!r}. Known: {sorted(_contract.DEFAULTS)}."
        )
    _hooks[key] = found
    return found


# (backend name, member) -> the hook: looked up once, as modules do not change.
_hooks: dict[tuple[str, str], Any] = {}
