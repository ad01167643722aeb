"""Whether the samples of a batch interact, found numerically and cached.

Per-sample results (input Jacobians and Hessians, input gradients without a
loss) rest on each sample's output depending on that sample alone. Layers that
break this are not only BatchNormalization with ``training=True``: any layer
computing ``x - mean(x, axis=0)``, batch-wise attention or a custom reduction
over the batch does. So kgrad asks the model: it runs it on two samples, then
again with the first sample changed, and sees whether the second sample's
output moved. The verdict is cached per model and per signature (the options
that change the forward pass, and each input's feature shape and dtype), so
each signature pays two extra forward passes once.

The probe runs eagerly with the model's stored weights, also when the call
itself is being traced (``fit``, ``jax.jit``, ``tf.function``): then it uses
synthetic inputs of the same feature shapes.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any

import keras
import numpy as np

from kgrad import _errors, _model
from kgrad import backends as _backends

ops = keras.ops
tree = keras.tree

_lock = threading.Lock()
_verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Relative change of the untouched sample's output that counts as interaction:
# far above float32 rounding (a sample's own rows never see the other rows).
_TOLERANCE = 1e-5


def _signature(req) -> tuple:
    leaves = tree.flatten(req.x)
    return (
        req.training,
        req.of_key,
        tuple((tuple(leaf.shape[1:]), _errors.dtype_name(leaf)) for leaf in leaves),
    )


def _probe_inputs(x) -> tuple[Any, Any]:
    """Two batches of two samples that differ only in the first sample."""
    rng = np.random.default_rng(0)

    def pair(leaf):
        dtype = _errors.dtype_name(leaf)
        feat = tuple(int(d) for d in leaf.shape[1:])
        concrete = _backends.hook("concrete")(leaf)
        if concrete is not None and concrete.shape[0] >= 2:
            base = concrete[:2].copy()
        elif dtype.startswith("float") or dtype.startswith("bfloat"):
            base = rng.normal(size=(2, *feat)).astype(dtype)
        else:
            base = np.zeros((2, *feat), dtype)
        moved = base.copy()
        if dtype.startswith("float") or dtype.startswith("bfloat"):
            moved[0] = base[0] + rng.normal(size=feat).astype(dtype) + 1.0
        else:
            moved[0] = np.where(base[0] == 0, 1, 0).astype(dtype)
        return base, moved

    pairs = [pair(leaf) for leaf in tree.flatten(x)]
    first = tree.pack_sequence_as(x, [p[0] for p in pairs])
    second = tree.pack_sequence_as(x, [p[1] for p in pairs])
    return first, second


def samples_interact(req) -> bool:
    """Whether sample 1's output changes when sample 0 changes (cached per signature)."""
    if not req.is_keras or req.batch_size == 1:
        return False
    key = _signature(req)
    with _lock:
        known = _verdicts.get(req.model, {}).get(key)
    if known is not None:
        return known
    verdict = _measure(req)
    with _lock:
        _verdicts.setdefault(req.model, {})[key] = verdict
    return verdict


def _measure(req) -> bool:
    model = req.model
    first, second = _probe_inputs(req.x)
    stored = {id(v): _stored(v) for v in model.variables}  # never traced values
    with _backends.hook("eager_scope")():
        outs = []
        for x in (first, second):
            x = tree.map_structure(_backends.load().convert, x)
            probe = _probe_request(req, x)
            with _model.stateless_scope(model, {}, stored):
                out, _, _ = probe.run({})
            outs.append([np.asarray(ops.convert_to_numpy(o)) for o in tree.flatten(out)])
    for a, b in zip(*outs):
        if a.ndim == 0 or a.shape[0] != 2:
            continue
        scale = max(float(np.abs(a).max()), 1.0)
        if float(np.abs(a[1] - b[1]).max()) > _TOLERANCE * scale:
            return True
    return False


def _stored(variable):
    """The variable's stored value; random values of its shape where there is none.

    Keras's JAX trainer empties the variables while ``fit`` runs (the state
    lives in the trainer), and a TensorFlow model built inside ``fit``'s traced
    step has variables that are not initialised yet; whether samples interact
    is a property of the computation, not of particular weight values.
    """
    value = variable._value
    if value is not None and _backends.hook("initialized")(value):
        return value
    dtype = _errors.dtype_name(variable)
    shape = tuple(variable.shape)
    if dtype.startswith("float") or dtype.startswith("bfloat"):
        return np.random.default_rng(1).normal(scale=0.5, size=shape).astype(dtype)
    return np.zeros(shape, dtype)


def _probe_request(req, x):
    return dataclasses.replace(req, x=x, batch_size=2, state=None)
