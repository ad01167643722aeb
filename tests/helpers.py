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


def on_accelerator() -> bool:
    """Whether the active backend computes on a GPU.

    The suite itself turns TF32 off there (conftest.py), but a ``kgrad`` command
    run as a subprocess computes at the framework's default float32 precision,
    which on a GPU may round matrix products to TF32's 10-bit mantissa.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


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


def ensure_torch_loop_fallback(monkeypatch, model, x) -> None:
    """Makes the torch backend's direction map fall back to its loop for ``model``.

    With keras 3.15 and torch 2.13, ``torch.func.vmap`` fails on Keras's Conv2D
    (its channels-last clone), so a conv model's loss Hessian runs the loop
    fallback for real (per-sample derivatives with respect to the inputs without
    a loss fold the directions into the batch instead). Older releases (keras
    3.8, torch 2.4) vectorise the same model; there the failure is simulated
    with the message torch gives, so the announcement, the fold and the loop's
    numbers are checked on every supported version.
    """
    import warnings

    from kgrad.backends import _loop
    from kgrad.backends import torch as backend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kgrad

        y = np.zeros(tuple(model(x[:1]).shape), "float32")
        kgrad.hessian(model, x[:1], y=y, loss="mse")
    _loop._warned.clear()
    if any("one at a time" in str(w.message) for w in caught):
        return
    real = backend.tf_func

    class _FailingVmap:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def vmap(fn, *args, randomness="error", **kwargs):
            if randomness != "same":  # only the map over directions fails
                return real.vmap(fn, *args, randomness=randomness, **kwargs)

            def fail(*call_args, **call_kwargs):
                raise RuntimeError("vmap: It looks like you're calling .clone() (simulated)")

            return fail

    monkeypatch.setattr(backend, "tf_func", _FailingVmap())
