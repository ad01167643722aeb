"""Forward-mode derivatives of a batch of one through ``EinsumDense`` (attention's projections).

TensorFlow vectorises the directions with pfor, which turns the layer's
(1, T, K) x (K, N) product into (n, 1, T, K) x (K, N); TensorFlow's oneDNN
``BatchMatMul`` (on by default on CPU) corrupts the heap on that shape
(tensorflow/tensorflow#117700) and the process died (double free, segfault)
on the first forward-mode Jacobian or Laplacian of one sample. kgrad converts
that product as one 2-D ``MatMul`` while it vectorises (``_tf_kernels.safe_pfor``).
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

BACKEND = keras.backend.backend()
L = keras.layers


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4, 6)),
            L.EinsumDense("abc,cd->abd", (4, 6), activation="tanh"),
            L.Flatten(),
            L.Dense(2),
        ]
    )


def test_forward_jacobian_and_laplacian_of_one_sample_through_einsum_dense():
    model = _model()
    x = np.random.default_rng(0).normal(size=(1, 4, 6)).astype("float32")
    # 24 directions: more than are unrolled, so TensorFlow maps them with pfor.
    fwd = np_(kgrad.jacobian(model, x, mode="fwd"))
    rev = np_(kgrad.jacobian(model, x, mode="rev"))  # two rows: a loop, no pfor
    np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-6)
    hess = np_(kgrad.hessian(model, x, target=0)).reshape(1, 24, 24)
    np.testing.assert_allclose(
        np_(kgrad.laplacian(model, x, target=0)),
        np.trace(hess, axis1=1, axis2=2),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's pfor converters")
def test_pfor_converter_is_swapped_only_while_kgrad_vectorises():
    import tensorflow as tf
    from tensorflow.python.ops.parallel_for import pfor

    from kgrad.backends import _tf_kernels

    registry = pfor._pfor_converter_registry
    original = registry["BatchMatMulV2"]
    w = tf.constant(np.arange(12, dtype="float32").reshape(6, 2))
    x = tf.constant(np.ones((1, 4, 6), "float32"))
    with _tf_kernels.safe_pfor():
        assert registry["BatchMatMulV2"] is _tf_kernels._pfor_batch_matmul_v2
        out = tf.vectorized_map(lambda s: tf.matmul(s * x, w), tf.range(1.0, 6.0))
    assert registry["BatchMatMulV2"] is original
    expected = np.arange(1.0, 6.0)[:, None, None, None] * np.matmul(x.numpy(), w.numpy())
    np.testing.assert_allclose(out.numpy(), expected)
