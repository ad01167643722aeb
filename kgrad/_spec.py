"""The cache key of a model-level call: a frozen, hashable :class:`Spec`.

A :class:`Spec` holds everything that decides which compiled function a call
needs: the function's name, the model (weakly: a cached entry must not keep its
model alive), the options (``wrt``, ``layers``, ``of``, ``target``, ``loss``,
``training``) in hashable form, the shapes and dtypes of the arrays, the
model's variables with their ``trainable`` flags, the memory budget and the
compiled loss. It holds the objects themselves, never their ``id()``: an
object held by a live key cannot be freed, so its identity cannot be reused
by a new object.

Building the key must cost little, since it is built on every call. The
model's variables come from a :class:`Structure` record per model, which is
checked against the model's layers and variables by identity on every call
(a short walk over the layers, not a rebuild of ``model.variables``), so
adding a layer, quantising, re-building or freezing a layer is seen at once.
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import types
import weakref
from typing import Any

_PRIMITIVES = (str, int, float, bool, type(None))


class Held:
    """Holds an object and compares by identity (Keras variables define ``==`` as an op)."""

    __slots__ = ("obj", "_hash")

    def __init__(self, obj):
        self.obj = obj
        self._hash = object.__hash__(obj)

    def __eq__(self, other):
        return isinstance(other, Held) and other.obj is self.obj

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return f"Held({self.obj!r})"


class Variables:
    """A model's variables in order (held), with their ``trainable`` flags; hashed once."""

    __slots__ = ("items", "trainable", "_hash")

    def __init__(self, items: tuple, trainable: tuple):
        self.items = items
        self.trainable = trainable
        self._hash = hash((tuple(object.__hash__(v) for v in items), trainable))

    def __eq__(self, other):
        return (
            isinstance(other, Variables)
            and self.trainable == other.trainable
            and len(self.items) == len(other.items)
            and all(map(operator.is_, self.items, other.items))
        )

    def __hash__(self):
        return self._hash


@dataclasses.dataclass(frozen=True)
class Spec:
    """The resolved request of a model-level call, used as its cache key."""

    fname: str
    model: weakref.ref
    options: tuple
    signature: tuple
    variables: Variables
    memory_budget: Any
    compiled_loss: Any


# ---------------------------------------------------------------- options


def options_key(options: dict) -> tuple:
    """A hashable stand-in for the options; raises TypeError where none is safe."""
    values = tuple(options.values())
    types_ = tuple(map(type, values))
    if all(t in _PRIMITIVES for t in types_):  # the common case, fast
        return (tuple(options), types_, values)
    return hashable(options)


def hashable(value, depth: int = 0):
    """A hashable stand-in for an option, or raises TypeError.

    Plain functions (a ``lambda`` written inline at the call site is a new
    object on every call) are keyed on their code, their closure values, their
    defaults and the module globals they name, so the same lambda reuses its
    compiled function, while a lambda whose captured value changed does not.
    A value that cannot be keyed safely (an array in a closure) raises
    TypeError: the call then runs eagerly, never with stale values.
    """
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(hashable(v, depth) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, hashable(v, depth)) for k, v in value.items()))
    if isinstance(value, types.FunctionType) and depth < 3:
        code = value.__code__
        cells = tuple(hashable(c.cell_contents, depth + 1) for c in value.__closure__ or ())
        names = tuple(
            (n, _global_key(value.__globals__[n])) for n in code.co_names if n in value.__globals__
        )
        defaults = hashable(tuple(value.__defaults__ or ()), depth + 1)
        kwdefaults = hashable(dict(value.__kwdefaults__ or {}), depth + 1)
        return ("function", code, cells, names, defaults, kwdefaults)
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, hashable(value.__self__, depth + 1))
    if isinstance(value, _PRIMITIVES):
        return (type(value).__name__, value)
    hash(value)
    return ("object", value)  # layers, losses, models, modules: by identity, held by the key


def _global_key(value):
    """A module global named by a keyed function: numbers and strings by value, else identity."""
    if isinstance(value, _PRIMITIVES):
        return (type(value).__name__, value)
    hash(value)  # arrays raise TypeError: such a function runs eagerly
    return ("object", value)


def signature(value):
    """Shapes and dtypes of a structure of arrays."""
    if type(value) is dict:
        return tuple(
            (
                k,
                None
                if v is None
                else (tuple(v.shape), v.dtype)
                if hasattr(v, "shape")
                else signature(v),
            )
            for k, v in value.items()
        )
    if hasattr(value, "shape"):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return ("dict", *((k, signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(signature(v) for v in value))
    if value is None:
        return None
    return (tuple(value.shape), value.dtype)


# ---------------------------------------------------------------- structure


def _walk(layer, objs: list, seen: set) -> None:
    """Appends every object that decides ``layer.variables``, in a fixed order.

    The layer itself is not appended (the record must not hold the model it
    belongs to); its sub-layers are, each before its own contents.
    """
    objs.append(layer._trainable)
    objs.extend(layer._trainable_variables)
    objs.extend(layer._non_trainable_variables)
    objs.extend(layer._seed_generators)
    for sub in layer._layers:
        objs.append(sub)
        if id(sub) not in seen:  # a layer shared by two parents is walked once
            seen.add(id(sub))
            _walk(sub, objs, seen)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class Structure:
    """A model's variables, rebuilt only when its layers or variables change.

    ``current(model)`` walks the layers (each layer's own variable lists, its
    sub-layers and its ``trainable`` flag) and compares what it finds, by
    identity, with the last walk; ``model.variables`` is rebuilt only when
    something differs. The variables' own ``trainable`` flags are read on
    every call.
    """

    __slots__ = ("state",)

    def __init__(self):
        self.state = (None, None)  # (last walk, Variables); replaced whole, never torn

    def current(self, model) -> Variables:
        walk, held = self.state
        objs: list | None = []
        try:
            _walk(model, objs, set())
        except AttributeError:  # not a Keras 3 layer as known here: no shortcut
            objs = None
        if objs is None or walk is None or not _same(objs, walk):
            variables = tuple(model.variables)
            held = Variables(variables, tuple(v.trainable for v in variables))
        else:
            trainable = tuple(v.trainable for v in held.items)
            if trainable != held.trainable:
                held = Variables(held.items, trainable)
        self.state = (objs, held)
        return held


_structures_lock = threading.Lock()
_structures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def structure(model) -> Structure:
    """The :class:`Structure` record of ``model`` (held weakly)."""
    record = _structures.get(model)
    if record is None:
        with _structures_lock:
            record = _structures.get(model)
            if record is None:
                record = _structures[model] = Structure()
    return record
