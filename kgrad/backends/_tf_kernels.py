"""The kernel swaps of kgrad's TensorFlow backend.

- Moments differentiable to every order (:func:`_exact_moments`).
- pfor's conversion of ``BatchMatMulV2`` without a oneDNN crash
  (:func:`safe_pfor`).
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

from kgrad.backends import _internals
from kgrad.backends._swaps import reference_counted, swapped_attributes

_checked_lock = threading.Lock()
# Whether `_internals.check_tensorflow` passed (once per process, on the first swap).
_checked = False


def _moments(x, axes, keepdims):
    """Mean and variance, differentiable to every order.

    ``tf.nn.moments`` (used by Keras's TensorFlow ``ops.moments``, hence by
    LayerNormalization and BatchNormalization in training mode) computes the
    variance around ``stop_gradient(mean)``. That leaves first derivatives
    exact (the variance's derivative with respect to the mean is zero) but
    makes every second derivative through a normalisation wrong.
    """
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


def _keras_tf_nn():
    from keras.src.backend.tensorflow import nn

    return nn


# Keras's TF moments use `_moments` while entered; process-wide, reference-counted.
_swap_moments = swapped_attributes(_keras_tf_nn, {"_compute_moments": _moments})


@contextlib.contextmanager
def _exact_moments():
    """While kgrad differentiates, Keras's TF moments use :func:`_moments`."""
    global _checked
    with _checked_lock:
        if not _checked:
            _internals.check_tensorflow()
            _checked = True
    with _swap_moments():
        yield


def _pfor_module():
    try:
        from tensorflow.python.ops.parallel_for import pfor
    except ImportError:  # pragma: no cover - a TensorFlow without pfor's module
        return None
    if "BatchMatMulV2" not in getattr(pfor, "_pfor_converter_registry", {}):
        return None  # pragma: no cover
    return pfor


def _static_or_dynamic(t):
    """``t``'s shape as a list: ints where static, scalar tensors where not."""
    dynamic = tf.shape(t)
    return [d if d is not None else dynamic[i] for i, d in enumerate(t.shape.as_list())]


def _pfor_batch_matmul_v2(pfor_input):
    """pfor's ``BatchMatMulV2`` converter, with a right side without batch dims as one ``MatMul``.

    pfor turns ``matmul(x, w)`` in the loop, ``x`` of shape (1, T, K) (a
    batch of one through ``EinsumDense``, so attention) and ``w`` of shape
    (K, N) the same in every iteration, into ``matmul`` of (n, 1, T, K) with
    (K, N). TensorFlow's oneDNN ``BatchMatMul`` (on by default on CPU)
    corrupts the heap for a rank-4 left side whose second dimension is 1 and
    a broadcast right side (tensorflow/tensorflow#117700): the process dies
    (double free, segfault). Where the right side has no batch dims (all 1)
    and adds no rank, the product is one 2-D ``MatMul`` of the flattened left
    side, which is the same numbers and never reaches that kernel.
    """
    x, x_stacked, _ = pfor_input.input(0)
    y, y_stacked, _ = pfor_input.input(1)
    rank_x, rank_y = x.shape.rank, y.shape.rank
    if (
        not x_stacked
        or y_stacked
        or rank_x is None
        or rank_y is None
        or rank_y > rank_x - 1  # y's batch dims would add to the output's rank
        or any(d != 1 for d in y.shape.as_list()[:-2])
    ):
        return _pfor_batch_matmul_v2.original(pfor_input)
    if pfor_input.get_attr("adj_x"):
        x = tf.linalg.adjoint(x)
    if rank_y > 2:
        y = tf.reshape(y, _static_or_dynamic(y)[-2:])
    shape = _static_or_dynamic(x)
    flat = tf.matmul(tf.reshape(x, [-1, shape[-1]]), y, adjoint_b=pfor_input.get_attr("adj_y"))
    out = tf.reshape(flat, [*shape[:-1], _static_or_dynamic(flat)[-1]])
    return _pfor_module().wrap(out, True)


def _enter_safe_pfor():
    module = _pfor_module()
    if module is not None:
        registry = module._pfor_converter_registry
        _pfor_batch_matmul_v2.original = registry["BatchMatMulV2"]
        registry["BatchMatMulV2"] = _pfor_batch_matmul_v2


def _leave_safe_pfor():
    module = _pfor_module()
    if module is not None:
        module._pfor_converter_registry["BatchMatMulV2"] = _pfor_batch_matmul_v2.original


# While kgrad vectorises (``tf.vectorized_map``, ``tape.jacobian``), pfor
# converts ``BatchMatMulV2`` with :func:`_pfor_batch_matmul_v2`. Process-wide
# and reference-counted, as the other swaps.
safe_pfor = reference_counted(_enter_safe_pfor, _leave_safe_pfor)
