"""A stream of batch sizes compiles once per bucket (the next power of two), not per size.

Per-sample results of padded calls are checked against eager, unpadded calls
and against NumPy backprop of ``y = tanh(x @ W1 + b1) @ W2 + b2``.
"""

import keras
import numpy as np
import pytest
from helpers import np_

# Counting counts Python runs of `call` (each trace runs it); _compiling is an
# autouse fixture: an empty cache and compilation on for every test.
from test_compiled import Counting, _compiling  # noqa: F401

import kgrad
from kgrad import _buckets, _compiled

BACKEND = keras.backend.backend()
COMPILES = BACKEND in ("jax", "tensorflow")  # torch runs model-level calls eagerly


def _np_input_grad(model, x):
    w1, b1 = (np.asarray(v, "float64") for v in model.d1.weights)
    w2 = np.asarray(model.d2.kernel, "float64")
    h = np.tanh(x.astype("float64") @ w1 + b1)
    return ((1 - h**2) * w2.sum(axis=1)) @ w1.T


def test_buckets_are_powers_of_two_then_eighths():
    assert [_buckets.bucket(n) for n in (1, 2, 3, 4, 5, 7, 8, 9, 32, 33, 40, 64)] == [
        1, 2, 4, 4, 8, 8, 8, 16, 32, 64, 64, 64,
    ]  # fmt: skip
    for n in range(65, 5000):  # less than an eighth more work, a bounded number of sizes
        b = _buckets.bucket(n)
        assert n <= b < n * 9 / 8 and _buckets.bucket(b) == b
    assert len({_buckets.bucket(n) for n in range(1, 4097)}) <= 7 + 8 * 6


def test_an_input_without_batch_axis_is_reported_with_its_own_shape():
    """The input check runs before any padding (the message names the shape given)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"Received: x with shape \(3,\)"):
        kgrad.grad(model, np.ones(3, "float32"))


@pytest.mark.parametrize(
    "call",
    [kgrad.grad, kgrad.laplacian, lambda m, x: kgrad.partial(m, x, (0, 0), input=0)],
    ids=["grad", "laplacian", "partial-input"],
)
def test_an_integer_input_is_reported_with_its_own_shape(call):
    """The dtype check also runs before padding: 3 samples, not the bucket's 4."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(TypeError, match=r"dtype int32 and shape \(3, 3\)"):
        call(model, np.zeros((3, 3), "int32"))


@pytest.mark.skipif(not COMPILES, reason="torch runs eagerly with torch.func")
def test_a_stream_of_batch_sizes_compiles_once_per_bucket(rng):
    model = Counting()
    x = rng.normal(size=(40, 3)).astype("float32")
    model(x)
    kgrad.grad(model, x[:2])  # the first call also probes whether samples interact
    start, entries = model.calls, _compiled.cache_size(model)
    for _ in range(10):
        kgrad.grad(model, x[:32])
    kgrad.grad(model, x[:7])  # an epoch's last, smaller batch
    assert _compiled.cache_size(model) - entries == 2  # 32 and 8
    for n in range(1, 41):  # a dataset's sizes 1..40: buckets 1, 2, 4, ..., 64
        g = np_(kgrad.grad(model, x[:n]))
        assert g.shape == (n, 3)
        np.testing.assert_allclose(g, _np_input_grad(model, x[:n]), rtol=1e-4, atol=1e-5)
    assert _compiled.cache_size(model) == 7
    # Each compiled function is traced a bounded number of times (not once per size).
    assert model.calls - start <= 3 * 7


@pytest.mark.parametrize("fname", ["jacobian", "hessian", "activations"])
def test_padded_results_match_unpadded_eager_ones(fname, rng):
    model = Counting()
    x = rng.normal(size=(5, 3)).astype("float32")
    model(x)

    def run():
        if fname == "jacobian":
            return kgrad.jacobian(model, x)
        if fname == "hessian":
            return kgrad.hessian(model, x, target=0)
        return kgrad.grad(model, x, wrt=["inputs", "activations"])

    padded = [run() for _ in range(2)][-1]
    kgrad.set_jit_compile(False)
    eager = run()
    for a, b in zip(keras.tree.flatten(padded), keras.tree.flatten(eager)):
        assert tuple(a.shape) == tuple(b.shape) and a.shape[0] == 5
        np.testing.assert_allclose(np_(a), np_(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not COMPILES, reason="torch runs eagerly with torch.func")
def test_sums_over_samples_are_not_padded(rng):
    # A weight gradient sums over samples: padding would add the padded rows.
    model = Counting()
    x = rng.normal(size=(5, 3)).astype("float32")
    model(x)
    for _ in range(2):
        g = kgrad.grad(model, x, wrt="weights")
    assert _compiled.cache_size(model) == 1
    (spec,) = list(_compiled._cache[model])
    assert spec.signature[0][1][0] == (5, 3)
    w1, b1 = (np.asarray(v, "float64") for v in model.d1.weights)
    w2 = np.asarray(model.d2.kernel, "float64")
    h = np.tanh(x.astype("float64") @ w1 + b1)
    expected = x.T.astype("float64") @ ((1 - h**2) * w2.sum(axis=1))
    np.testing.assert_allclose(np_(g[model.d1.kernel.path]), expected, rtol=1e-4, atol=1e-5)
