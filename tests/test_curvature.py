"""The Hessian's spectrum and trace against NumPy's eigvalsh and trace of a dense Hessian.

The dense Hessian is built in float64 without autodiff: central differences of
the hand-derived NumPy backprop gradient of the reference MLP's mse loss
(tests/reference.py). kgrad's Hessian-vector products are float32, so
eigenvalues are compared at 2e-4 of the Hessian's norm.
"""

import keras
import numpy as np
import pytest
import reference

import kgrad

L = keras.layers


def _problem(rng, batch=6):
    model = reference.mlp()
    x = rng.normal(size=(batch, 3)).astype("float32")
    y = rng.normal(size=(batch, 2)).astype("float32")
    return model, x, y


def _paths(model):
    n = model.name
    return [(f"{n}/{layer}/kernel", f"{n}/{layer}/bias") for layer in ("h1", "h2", "out")]


def _numpy_grad(model, flat, like, x, y):
    """The mse loss's weight gradient by hand-derived backprop, flat, in kgrad's order."""
    weights = keras.tree.pack_sequence_as(like, _split(flat, like))
    p = [(weights[k], weights[b]) for k, b in _paths(model)]
    *_, out = reference.forward(p, x.astype("float64"))
    dy = 2 * (out - y) / out.size
    g = reference.backward(p, x.astype("float64"), dy)
    named = {}
    for (k, b), layer in zip(_paths(model), ("h1", "h2", "out")):
        named[k], named[b] = g[f"{layer}/kernel"], g[f"{layer}/bias"]
    return np.concatenate([leaf.ravel() for leaf in keras.tree.flatten(named)])


def _split(flat, like):
    leaves, start = [], 0
    for leaf in keras.tree.flatten(like):
        leaves.append(flat[start : start + leaf.size].reshape(leaf.shape))
        start += leaf.size
    return leaves


def _dense_hessian(model, x, y, eps=1e-5):
    like = {
        v.path: np.asarray(keras.ops.convert_to_numpy(v.value), "float64")
        for v in model.trainable_variables
    }
    w0 = np.concatenate([leaf.ravel() for leaf in keras.tree.flatten(like)])
    H = np.empty((w0.size, w0.size))
    for i in range(w0.size):
        e = np.zeros_like(w0)
        e[i] = eps
        H[:, i] = (
            _numpy_grad(model, w0 + e, like, x, y) - _numpy_grad(model, w0 - e, like, x, y)
        ) / (2 * eps)
    return (H + H.T) / 2, like


def _flat(tree_):
    return np.concatenate(
        [
            np.asarray(keras.ops.convert_to_numpy(leaf), "float64").ravel()
            for leaf in keras.tree.flatten(tree_)
        ]
    )


def test_extreme_eigenvalues_and_vectors_match_eigvalsh(rng):
    model, x, y = _problem(rng)
    H, _ = _dense_hessian(model, x, y)
    exact = np.linalg.eigvalsh(H)
    scale = np.abs(exact).max()
    (low, high), (low_vecs, high_vecs) = kgrad.hessian_eigenvalues(
        model, x, y, loss="mse", k=2, which="both", seed=0, return_vectors=True
    )
    np.testing.assert_allclose(high, exact[::-1][:2], atol=2e-4 * scale)
    np.testing.assert_allclose(low, exact[:2], atol=2e-4 * scale)
    for value, vec in [*zip(high, high_vecs), *zip(low, low_vecs)]:
        assert sorted(vec) == sorted(v.path for v in model.trainable_variables)
        u = _flat(vec)
        np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-5)
        assert np.linalg.norm(H @ u - value * u) <= 1e-3 * scale
    top = kgrad.hessian_eigenvalues(model, x, y, loss="mse", seed=0)
    assert top.shape == (1,) and abs(top[0] - exact[-1]) <= 2e-4 * scale
    smallest = kgrad.hessian_eigenvalues(model, x, y, loss="mse", k=3, which="smallest", seed=1)
    np.testing.assert_allclose(smallest, exact[:3], atol=2e-4 * scale)


def test_a_layer_selection_is_the_hessians_diagonal_block(rng):
    model, x, y = _problem(rng)
    H, like = _dense_hessian(model, x, y)
    paths = list(like)  # kgrad's (sorted) order of the flat vector
    order = sorted(paths)
    sizes = {p: like[p].size for p in paths}
    starts = np.cumsum([0] + [sizes[p] for p in order])
    chosen = [p for p in order if "/out/" in p]
    idx = np.concatenate(
        [np.arange(starts[order.index(p)], starts[order.index(p) + 1]) for p in chosen]
    )
    block = H[np.ix_(idx, idx)]
    got = kgrad.hessian_eigenvalues(model, x, y, loss="mse", layers="out", k=2, seed=0)
    np.testing.assert_allclose(
        got, np.linalg.eigvalsh(block)[::-1][:2], atol=2e-4 * np.abs(block).max()
    )


def test_hutchinson_trace_is_within_its_standard_error(rng):
    model, x, y = _problem(rng)
    H, _ = _dense_hessian(model, x, y)
    estimate, stderr = kgrad.hessian_trace(model, x, y, loss="mse", samples=300, seed=0)
    assert abs(estimate - np.trace(H)) <= 4 * stderr
    # Var(z^T H z) = 2 sum_{i != j} H_ij^2 for Rademacher z: the reported error agrees.
    expected = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 300)
    assert 0.7 * expected <= stderr <= 1.3 * expected
    assert kgrad.hessian_trace(model, x, y, loss="mse", samples=5, seed=3) == kgrad.hessian_trace(
        model, x, y, loss="mse", samples=5, seed=3
    )
    assert kgrad.hessian_trace(model, x, y, loss="mse", samples=5, seed=4) != kgrad.hessian_trace(
        model, x, y, loss="mse", samples=5, seed=3
    )


def test_a_stream_of_batches_is_the_whole_datasets_hessian(rng):
    model, x, y = _problem(rng, batch=8)
    whole = kgrad.hessian_eigenvalues(model, x, y, loss="mse", k=2, seed=0)
    streamed = kgrad.hessian_eigenvalues(model, _Batches(x, y), loss="mse", k=2, seed=0)
    np.testing.assert_allclose(streamed, whole, rtol=1e-4, atol=1e-6)
    estimate, _ = kgrad.hessian_trace(model, _Batches(x, y), loss="mse", samples=4, seed=0)
    assert estimate == pytest.approx(
        kgrad.hessian_trace(model, x, y, loss="mse", samples=4, seed=0)[0], rel=1e-4
    )
    one_shot = ((x[i : i + 4], y[i : i + 4]) for i in (0, 4))
    with pytest.raises(TypeError, match="Received: x of type generator"):
        kgrad.hessian_eigenvalues(model, one_shot, loss="mse")


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.x[4 * i : 4 * i + 4], self.y[4 * i : 4 * i + 4]


def test_wrt_inputs_of_a_linear_model_has_its_closed_form(rng):
    # mse of y = x W over a batch, as a function of the whole input batch:
    # H = (2 / (B m)) (W W^T kron I_B): the eigenvalues of 2 W W^T / (B m), each B times.
    model = keras.Sequential([keras.Input((3,)), L.Dense(2, use_bias=False)])
    x = rng.normal(size=(4, 3)).astype("float32")
    W = np.asarray(keras.ops.convert_to_numpy(model.layers[0].kernel), "float64")
    exact = np.linalg.eigvalsh(2 * W @ W.T / (4 * 2))
    got = kgrad.hessian_eigenvalues(
        model, x, np.zeros((4, 2)), loss="mse", wrt="inputs", k=2, which="both", seed=0
    )
    np.testing.assert_allclose(got[1], [exact[-1]] * 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[0], [0.0, 0.0], atol=1e-5)


def test_non_convergence_is_reported(rng):
    model, x, y = _problem(rng)
    with pytest.warns(RuntimeWarning, match="did not converge in 3 Hessian-vector products"):
        kgrad.hessian_eigenvalues(model, x, y, loss="mse", k=1, iters=3, tol=1e-9, seed=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(which="middle"), ValueError, "Received: which='middle'"),
        (dict(k=0), ValueError, "Received: k=0"),
        (dict(k=40), ValueError, "Received: k=40"),
        (dict(iters=0), ValueError, "Received: iters=0"),
        (dict(tol=2.0), ValueError, "Received: tol=2.0"),
        (dict(wrt="activations"), ValueError, "Received: wrt='activations'"),
    ],
)
def test_bad_arguments_are_refused(rng, kwargs, error, match):
    model, x, y = _problem(rng)
    with pytest.raises(error, match=match):
        kgrad.hessian_eigenvalues(model, x, y, loss="mse", **kwargs)
    with pytest.raises(ValueError, match="Received: samples=1"):
        kgrad.hessian_trace(model, x, y, loss="mse", samples=1)


def test_nan_is_reported_not_hidden(rng):
    model, x, y = _problem(rng)
    kernel = model.get_layer("h1").kernel
    kernel.assign(np.full(tuple(kernel.shape), np.nan, "float32"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        kgrad.hessian_eigenvalues(model, x, y, loss="mse", seed=0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        kgrad.hessian_trace(model, x, y, loss="mse", samples=2, seed=0)


def test_the_linearised_operator_gives_kgrad_hvps(rng, monkeypatch):
    # On torch, one batch's products share one linearisation (no forward pass each);
    # they must be kgrad.hvp's, for a layer selection and for the inputs.
    from kgrad import _hessian
    from kgrad import backends as kgrad_backends

    model, x, y = _problem(rng)
    calls = []
    original = _hessian.hvp
    monkeypatch.setattr(_hessian, "hvp", lambda *a, **k: calls.append(1) or original(*a, **k))
    kgrad.hessian_eigenvalues(model, x, y, loss="mse", seed=0)
    if not kgrad_backends.hook("reusable_hvp"):
        assert calls  # one kgrad.hvp call (compiled once) per product
        with pytest.raises(NotImplementedError, match="Call kgrad.hvp"):
            _hessian.hvp_operator(model, x, y=y, loss="mse")
        return
    assert not calls  # the operator's products
    layers = ["h2", "out"]
    like = kgrad.grad(model, x, wrt="weights", layers=layers, y=y, loss="mse")
    v = {k: rng.normal(size=t.shape).astype("float32") for k, t in np_dict(like).items()}
    apply = _hessian.hvp_operator(model, x, layers=layers, y=y, loss="mse")
    want = np_dict(kgrad.hvp(model, x, v, layers=layers, y=y, loss="mse"))
    for _ in range(2):  # the operator is reusable
        got = np_dict(apply(v))
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    u = rng.normal(size=x.shape).astype("float32")
    apply = _hessian.hvp_operator(model, x, wrt="inputs", y=y, loss="mse")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(apply(u)),
        keras.ops.convert_to_numpy(kgrad.hvp(model, x, u, wrt="inputs", y=y, loss="mse")),
        rtol=1e-5,
        atol=1e-6,
    )


def np_dict(d):
    return {k: keras.ops.convert_to_numpy(t) for k, t in d.items()}
