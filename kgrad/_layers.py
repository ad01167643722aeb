"""Resolving ``layers=`` and ``of=`` to layer objects, and watching layer outputs.

Layers are addressed by name, by index into ``model.layers``, or by object.
Names are looked up among ``model.layers`` first, then inside nested models
(``"encoder/dense"`` names a layer through its parents; a bare name deep inside
works when it is unique).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import keras

from kgrad import _errors


def _all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer below ``model`` (depth first), the model itself excluded."""
    out = []
    for layer in getattr(model, "layers", []) or []:
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def _qualified_names(model, prefix=""):
    for layer in getattr(model, "layers", []) or []:
        name = f"{prefix}{layer.name}"
        yield name, layer
        yield from _qualified_names(layer, prefix=f"{name}/")


def resolve_one(model: keras.layers.Layer, spec: Any, argname: str) -> keras.layers.Layer:
    """Returns the layer that ``spec`` (name, index or object) names in ``model``."""
    top = list(getattr(model, "layers", []) or [])
    if isinstance(spec, keras.layers.Layer):
        if spec is model or any(spec is layer for layer in _all_layers(model)):
            return spec
        raise ValueError(
            f"`{argname}` names a layer that is not part of model '{model.name}'. "
            f"Received: {argname}={spec.name!r} (a {type(spec).__name__} object). Pass a layer "
            f"of this model, e.g. one of {[layer.name for layer in top][:10]}."
        )
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TypeError(
            f"`{argname}` must be a layer name, an index into `model.layers` or a layer "
            f"object. Received: {argname}={spec!r} of type {type(spec).__name__}."
        )
    if isinstance(spec, int):
        if not -len(top) <= spec < len(top):
            raise ValueError(
                f"`{argname}` index is out of range: model '{model.name}' has "
                f"{len(top)} layers in `model.layers`. Received: {argname}={spec}. Use an "
                f"index from {-len(top)} to {len(top) - 1}, or a layer name."
            )
        return top[spec]
    qualified = dict(_qualified_names(model))
    if spec in qualified:
        by_top = [layer for layer in top if layer.name == spec]
        return by_top[0] if by_top else qualified[spec]
    deep = [layer for name, layer in qualified.items() if name.split("/")[-1] == spec]
    if len(deep) == 1:
        return deep[0]
    if len(deep) > 1:
        raise ValueError(
            f"`{argname}` is ambiguous: several nested layers are named '{spec}'. "
            f"Received: {argname}={spec!r}. Qualify it with its parents, e.g. "
            f"{[n for n in qualified if n.split('/')[-1] == spec]}."
        )
    names = [layer.name for layer in top]
    raise ValueError(
        f"No layer named '{spec}' in model '{model.name}'. Received: {argname}={spec!r}."
        f"{_errors.closest(spec, list(qualified))} Available layers: {names}."
    )


def resolve(model: keras.layers.Layer, spec: Any, argname: str = "layers"):
    """Resolves ``layers=``: ``None`` means every layer of ``model.layers``.

    Returns ``(layers, single)`` where ``single`` tells that one layer was named
    directly (not in a list), so that results come back bare.
    """
    if spec is None:
        return list(getattr(model, "layers", []) or []), False
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"`{argname}` is an empty list. Received: {argname}={spec!r}.")
        layers = [resolve_one(model, s, argname) for s in spec]
        return list(dict.fromkeys(layers)), False
    return [resolve_one(model, spec, argname)], True


def key(model: keras.layers.Layer, layer: keras.layers.Layer) -> str:
    """The dict key of ``layer``'s results: its name, qualified when nested."""
    if any(layer is top for top in getattr(model, "layers", []) or []):
        return layer.name
    for name, candidate in _qualified_names(model):
        if candidate is layer:
            return name
    return layer.name


# Watching is per thread: a watched layer's `call` is replaced (once, however
# many threads watch it) by a dispatcher that looks up the calling thread's
# watch. The patch is reference-counted under a lock, so concurrent kgrad calls
# on the same model from several threads each see only their own probes.
_NOTHING_WATCHED = contextlib.nullcontext()
_patch_lock = threading.Lock()
_patch_count: dict[int, int] = {}  # id(layer) -> number of active watches
_local = threading.local()


def _thread_watches() -> dict[int, tuple[Watch, str]]:
    watches = getattr(_local, "watches", None)
    if watches is None:
        watches = _local.watches = {}
    return watches


def _dispatcher(layer_id: int, call):
    def dispatch(*args, **kwargs):
        active = getattr(_local, "watches", {}).get(layer_id)
        if active is None:  # another thread is watching this layer
            return call(*args, **kwargs)
        watch, name = active
        return watch._record(name, call, args, kwargs)

    return dispatch


def _patch(layer: keras.layers.Layer) -> None:
    with _patch_lock:
        count = _patch_count.get(id(layer), 0)
        if count == 0:
            if "call" in layer.__dict__:
                raise RuntimeError(f"Layer '{layer.name}' has a patched `call`.")
            layer.__dict__["call"] = _dispatcher(id(layer), layer.call)
        _patch_count[id(layer)] = count + 1


def _unpatch(layer: keras.layers.Layer) -> None:
    with _patch_lock:
        count = _patch_count.pop(id(layer), 1) - 1
        if count > 0:
            _patch_count[id(layer)] = count
        else:
            layer.__dict__.pop("call", None)


class Watch:
    """Records (and optionally perturbs) the outputs of some layers during a call.

    While active, each watched layer's output gets the probe added
    (``output + probe``, probe zeros, so that the derivative with respect to the
    probe is the derivative with respect to the output) and is recorded. A watch
    sees only the calls made by the thread that activated it, so kgrad calls on
    one model from several threads do not see each other's probes.
    """

    def __init__(self, layers: dict[str, keras.layers.Layer], probes: dict[str, Any] | None = None):
        self.layers = layers
        self.probes = probes or {}
        self.outputs: dict[str, Any] = {}
        self.inputs: dict[str, Any] = {}  # each layer's first input (ghost norms use it)
        self.calls: dict[str, int] = {}

    def active(self) -> contextlib.AbstractContextManager:
        """Watches the layers in this thread; a reusable null context when none are watched."""
        if not self.layers:
            return _NOTHING_WATCHED
        return self._active()

    @contextlib.contextmanager
    def _active(self) -> Iterator[Watch]:
        mine = _thread_watches()
        entered = []
        try:
            for name, layer in self.layers.items():
                if id(layer) in mine:
                    raise RuntimeError(f"Layer '{layer.name}' is already being watched.")
                _patch(layer)
                entered.append(layer)
                mine[id(layer)] = (self, name)
            yield self
        finally:
            for layer in entered:
                mine.pop(id(layer), None)
                _unpatch(layer)

    def _record(self, name, call, args, kwargs):
        out = call(*args, **kwargs)
        self.calls[name] = self.calls.get(name, 0) + 1
        self.inputs[name] = args[0] if args else kwargs.get("inputs")
        if name in self.probes:
            out = keras.tree.map_structure(
                lambda o, p: o if p is None else o + p, out, self.probes[name]
            )
        self.outputs[name] = out
        return out

    def check_called_once(self, names) -> None:
        for name in names:
            n = self.calls.get(name, 0)
            if n == 0:
                raise ValueError(
                    f"Layer '{name}' was not called when the model ran, so it has no "
                    f"output to differentiate. Received: layers/of naming '{name}'. Choose "
                    f"a layer on the path from the inputs to the outputs."
                )
            if n > 1:
                raise ValueError(
                    f"Layer '{name}' is called {n} times in one forward pass (a shared "
                    f"layer), so 'its output' is ambiguous. Received: layers/of naming "
                    f"'{name}'. Differentiate with respect to a layer that is called once."
                )
