"""Independent references for kgrad's tests: NumPy, float64, no autodiff."""

from __future__ import annotations

import keras
import numpy as np

# Keras computes in float32 on every backend here, so analytic checks are made
# at float32 precision (about 1e-4 relative) and central differences, whose
# truncation and rounding errors add up, at about 2e-3.
RTOL = 1e-4
ATOL = 1e-5
FD_RTOL = 2e-3
FD_ATOL = 2e-4


def np_(x):
    """Converts a backend tensor (or a nested structure of them) to NumPy."""
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)


def central_diff_grad(f, x, eps=1e-5):
    """Gradient of scalar NumPy function ``f`` at ``x`` by central differences in float64."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = eps
        g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def central_diff_jac(f, x, eps=1e-5):
    """Jacobian ``out.shape + x.shape`` of NumPy function ``f`` by central differences."""
    x = np.asarray(x, dtype=np.float64)
    out = np.asarray(f(x))
    jac = np.zeros(out.shape + x.shape)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = eps
        jac[(Ellipsis,) + idx] = (np.asarray(f(x + e)) - np.asarray(f(x - e))) / (2 * eps)
    return jac


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np_(actual), expected, rtol=rtol, atol=atol)
