"""The kernel swap of kgrad's TensorFlow backend: moments differentiable to every order."""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

from kgrad.backends import _internals

_patch_lock = threading.RLock()
_patch_depth = 0
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


@contextlib.contextmanager
def _exact_moments():
    """While kgrad differentiates, Keras's TF moments use :func:`_moments`."""
    global _patch_depth, _checked
    with _patch_lock:
        if not _checked:
            _internals.check_tensorflow()
            _checked = True
    from keras.src.backend.tensorflow import nn as keras_tf_nn

    with _patch_lock:
        if _patch_depth == 0:
            _exact_moments.original = keras_tf_nn._compute_moments
            keras_tf_nn._compute_moments = _moments
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                keras_tf_nn._compute_moments = _exact_moments.original
