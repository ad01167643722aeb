"""The precision a model's objective is computed at, for ``kgrad.check_grad``'s steps.

Float64 values may be computed at float32 (Keras runs some float64 operations
at float32 on some backends; JAX without x64 holds float64 as float32), which
:func:`measured_precision` finds from the objective's rounding noise; under
mixed precision the layers' ``compute_dtype`` says it (:func:`computed_at`).
"""

from __future__ import annotations

import math
import threading
import weakref

import keras
import numpy as np

from kgrad import backends as _backends

# Machine epsilon of each precision, for the lowest one a model computes at.
_EPS = {"float64": 2.2e-16, "float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.8e-3}


def computed_at(model, precision: str) -> str:
    """The lowest of ``precision`` and the 16-bit ``compute_dtype`` s of the model's layers.

    Under mixed precision (``mixed_float16``) a model computes in float16 on
    float32 inputs and weights, and differences of its objective have float16's
    rounding noise.
    """
    layers = getattr(model, "_flatten_layers", None)
    if layers is None:  # a plain function: the values' precision
        return precision
    # Only 16-bit compute dtypes lower it: a float64 model's container (the
    # Sequential itself, its InputLayer) may say float32 while its layers compute
    # in float64, which `measured_precision` finds out.
    low = {getattr(layer, "compute_dtype", None) for layer in layers()} & {"float16", "bfloat16"}
    return max(low | {precision}, key=lambda d: _EPS.get(d, 0.0))


# The precision probe: the objective at five points on a line through the values,
# ``v + k * step * max(1, |v|) * s`` for k = -2..2 and a seeded random direction
# ``s``, in a few directions. The fourth difference of five values cancels every
# term of the objective's Taylor series up to the cubic one, so what is left is
# rounding noise (truncation is about step^4 = 1e-20 of the objective's scale).
# The step is above float32 resolution, so a perturbation survives a cast to
# float32 on the way. Float64 computation leaves noise of about 1e-15 of |f|,
# float32 computation about 1e-7; the threshold lies between with margins of
# 1e4 on both sides.
_PROBE_STEP = 1e-5
_PROBE_DIRECTIONS = 3
_PROBE_NOISE = 1e-11
# Norm of the fourth difference's coefficients (1, -4, 6, -4, 1).
_FOURTH = math.sqrt(70.0)

_precision_lock = threading.Lock()
_precision_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _key(value):
    """A hashable stand-in for the options (objects by identity), or raises TypeError."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_key, value))
    if isinstance(value, dict):
        return ("dict", *((k, _key(v)) for k, v in value.items()))
    if isinstance(value, (str, int, float, bool, type(None))):
        return (type(value).__name__, value)
    hash(value)  # arrays raise TypeError: the verdict is then not cached
    return ("object", id(value), value)


def measured_precision(req, dtype, objective_of, values_np, options) -> str:
    """The precision the objective is computed at, for float64 values; else ``dtype``.

    Measures the objective's rounding noise with fourth differences along a few
    seeded random lines (see ``_PROBE_STEP``); the gradient is not used, so a
    wrong gradient cannot loosen the tolerances it is checked with. The verdict
    is cached per model and request (``wrt``, dtype and the other options).
    """
    if dtype != "float64":
        return dtype
    try:
        key = (tuple(req.wrt), dtype, req.y is not None, _key(options))
        with _precision_lock:
            cached = _precision_cache.get(req.model, {}).get(key)
    except TypeError:  # an unhashable option, or a model that cannot be weakly referenced
        key, cached = None, None
    if cached is not None:
        return cached
    rng = np.random.default_rng(0)
    noise, seen = 0.0, []
    with _backends.hook("no_grad")():
        center = objective_of([keras.ops.convert_to_tensor(v, dtype=dtype) for v in values_np])
        for _ in range(_PROBE_DIRECTIONS):
            steps = [
                _PROBE_STEP * np.maximum(1.0, np.abs(v)) * rng.standard_normal(v.shape)
                for v in values_np
            ]
            f = {0: center}
            for k in (-2, -1, 1, 2):
                f[k] = objective_of(
                    [
                        keras.ops.convert_to_tensor(v + k * d, dtype=dtype)
                        for v, d in zip(values_np, steps)
                    ]
                )
            fourth = f[-2] - 4 * f[-1] + 6 * f[0] - 4 * f[1] + f[2]
            noise = max(noise, abs(fourth) / _FOURTH)
            seen.extend(f.values())
    scale = max(map(abs, seen))
    if not (math.isfinite(noise) and math.isfinite(scale)):
        return dtype  # NaN or Inf: the check itself reports it
    # Every value a float32 number: the objective was rounded to float32 at the end.
    rounded = scale > 0 and all(float(np.float32(v)) == v for v in seen)
    precision = "float32" if rounded or noise > _PROBE_NOISE * scale else dtype
    if key is not None:
        try:
            with _precision_lock:
                _precision_cache.setdefault(req.model, {})[key] = precision
        except TypeError:
            pass
    return precision
