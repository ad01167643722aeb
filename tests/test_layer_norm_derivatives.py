"""Higher-order derivatives through ``LayerNormalization``, on every backend.

On torch, Keras runs ``LayerNormalization`` as the fused
``torch.nn.functional.layer_norm``, whose derivatives of derivatives are wrong
when taken through a ``jvp`` or a mapped backward (docs/backends.md); kgrad's
transforms run a composite layer norm there. References here are independent
of that: central differences of first derivatives (which are right
everywhere) and the symmetry of second derivatives.
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad
from kgrad import func

BACKEND = keras.backend.backend()
ops = keras.ops
L = keras.layers


def _stacked_norms():
    """Two LayerNormalization layers, one feeding the other; random gammas and betas."""
    inputs = keras.Input((4,))
    h = L.LayerNormalization(name="n1")(inputs)
    h = L.Dense(4, activation="tanh", name="d0")(h)
    h = L.LayerNormalization(name="n2")(h)
    model = keras.Model(inputs, L.Dense(2, name="d")(h))
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return model, rng


def _flat(tree_of_arrays, paths):
    return np.concatenate([np.asarray(tree_of_arrays[p], "float64").ravel() for p in paths])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_weight_hessian_through_stacked_norms_is_symmetric_and_matches_differences(jit):
    """The dense weight Hessian, its symmetry, and H v vs differences of the gradient."""
    model, rng = _stacked_norms()
    x = rng.normal(size=(3, 4)).astype("float32")
    y = rng.normal(size=(3, 2)).astype("float32")
    names = ["n1", "n2"]
    paths = [v.path for n in names for v in model.get_layer(n).trainable_variables]
    previous = kgrad.get_jit_compile()
    kgrad.set_jit_compile(jit)
    try:
        H = np_(kgrad.hessian(model, x, wrt="weights", layers=names, y=y, loss="mse"))
        matrix = np.block([[np.asarray(H[i][j], "float64") for j in paths] for i in paths])
        scale = np.abs(matrix).max()
        # torch's fused kernel gave an asymmetry of 14 here (n1/beta x n2/gamma).
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-5 * scale)
        v = {p: rng.normal(size=(4,)).astype("float32") for p in paths}
        variables = {w.path: w for w in model.trainable_variables}
        base = {p: np.array(variables[p].numpy()) for p in paths}

        def grad_at(eps):
            for p in paths:
                variables[p].assign(base[p] + eps * v[p])
            g = kgrad.grad(model, x, wrt="weights", layers=names, y=y, loss="mse")
            return _flat(np_(g), paths)

        eps = 1e-2  # float32 gradients: truncation ~eps^4, rounding ~1e-6/eps
        fd = (-grad_at(2 * eps) + 8 * grad_at(eps) - 8 * grad_at(-eps) + grad_at(-2 * eps)) / (
            12 * eps
        )
        for p in paths:
            variables[p].assign(base[p])
        hv = matrix @ _flat(v, paths)
        np.testing.assert_allclose(hv, fd, atol=2e-3 * np.abs(fd).max())
    finally:
        kgrad.set_jit_compile(previous)


def _weight_grad_vs_differences(objective, model, rng):
    """func.grad of ``objective(w)`` along a random direction vs central differences."""
    weights = func.weights_of(model)
    g = np_(func.grad(objective)(weights))
    direction = {p: rng.normal(size=np.shape(g[p])).astype("float32") for p in g}
    base = {p: np.asarray(np_(weights[p]), "float64") for p in weights}

    def value(eps):
        trial = {
            p: ops.convert_to_tensor((base[p] + eps * direction[p]).astype("float32")) for p in base
        }
        return float(np_(objective(trial)))

    eps = 1e-2
    fd = (-value(2 * eps) + 8 * value(eps) - 8 * value(-eps) + value(-2 * eps)) / (12 * eps)
    ad = sum(float(np.sum(np.asarray(g[p], "float64") * direction[p])) for p in g)
    return ad, fd


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_weight_gradient_of_a_jacobian_penalty_through_norms(mode):
    """The trainer's step for a Jacobian penalty (a forward-mode Jacobian on torch was wrong)."""
    model, rng = _stacked_norms()
    x = rng.normal(size=(3, 4)).astype("float32")

    def penalty(w):
        J = kgrad.jacobian(lambda xx: func.functional_call(model, w, xx), x, mode=mode)
        return ops.sum(J**2)

    ad, fd = _weight_grad_vs_differences(penalty, model, rng)
    # Before the fix torch gave -89.87 against 51.79 here (mode="fwd").
    assert ad == pytest.approx(fd, rel=2e-3)


def test_weight_gradient_of_an_input_hessian_through_norms():
    """Third order: the weight gradient of a loss holding per-sample input Hessians."""
    model, rng = _stacked_norms()
    x = rng.normal(size=(3, 4)).astype("float32")

    def laplacian_loss(w):
        H = kgrad.hessian(lambda xx: func.functional_call(model, w, xx), x, target=0)
        return ops.sum(ops.trace(H, axis1=1, axis2=2) ** 2)

    ad, fd = _weight_grad_vs_differences(laplacian_loss, model, rng)
    assert ad == pytest.approx(fd, rel=2e-3)


def _norm_fn():
    layer = L.LayerNormalization()
    layer.build((2, 3))
    rng = np.random.default_rng(1)
    layer.gamma.assign(rng.normal(size=(3,)).astype("float32"))
    layer.beta.assign(rng.normal(size=(3,)).astype("float32"))
    c = ops.convert_to_tensor(np.array([1.0, 2.0, 3.0], "float32"))

    def f(x, gamma):
        out = func.functional_call(layer, {layer.gamma.path: gamma, layer.beta.path: layer.beta}, x)
        return ops.sum(ops.tanh(out) * c)

    x = rng.normal(size=(2, 3)).astype("float32")
    return f, x, ops.convert_to_tensor(np.asarray(layer.gamma.numpy()))


def test_every_second_order_composition_agrees_through_a_norm():
    """hessian, jacfwd(jacrev), jacrev(jacrev), jacfwd(jacfwd), jacrev(jacfwd), jacfwd(grad).

    On torch without the composite kernel, the input-gamma blocks of the
    ``jacrev`` inner and the input-input block of the ``jacfwd`` inner were wrong.
    The reference: central differences of the (first-order) gradient.
    """
    f, x, gamma = _norm_fn()
    argnums = (0, 1)
    results = {
        "hessian": func.hessian(f, argnums=argnums)(x, gamma),
        "jacfwd(jacrev)": func.jacfwd(func.jacrev(f, argnums=argnums), argnums=argnums)(x, gamma),
        "jacrev(jacrev)": func.jacrev(func.jacrev(f, argnums=argnums), argnums=argnums)(x, gamma),
        "jacfwd(grad)": func.jacfwd(func.grad(f, argnums=argnums), argnums=argnums)(x, gamma),
    }
    if BACKEND != "tensorflow":
        # A forward-mode inner Jacobian nests pfor in pfor on TensorFlow: 15-18 s a
        # composition on CI's CPUs, so there only the compositions above (whose
        # inner Jacobians are reverse mode or a gradient) run.
        results["jacfwd(jacfwd)"] = func.jacfwd(func.jacfwd(f, argnums=argnums), argnums=argnums)(
            x, gamma
        )
        results["jacrev(jacfwd)"] = func.jacrev(func.jacfwd(f, argnums=argnums), argnums=argnums)(
            x, gamma
        )
    grad = func.grad(f, argnums=argnums)
    args = [np.asarray(np_(x), "float64"), np.asarray(np_(gamma), "float64")]
    eps = 1e-2
    for j, arg in enumerate(args):
        for idx in np.ndindex(arg.shape):

            def g_at(step, j=j, idx=idx):
                moved = [a.copy() for a in args]
                moved[j][idx] += step
                return [
                    np.asarray(np_(t), "float64")
                    for t in grad(*[m.astype("float32") for m in moved])
                ]

            plus2, plus, minus, minus2 = g_at(2 * eps), g_at(eps), g_at(-eps), g_at(-2 * eps)
            for i in range(2):
                fd = (-plus2[i] + 8 * plus[i] - 8 * minus[i] + minus2[i]) / (12 * eps)
                for name, H in results.items():
                    got = np.asarray(np_(H[i][j]), "float64")[(Ellipsis, *idx)]
                    np.testing.assert_allclose(
                        got, fd, atol=2e-3 * (1 + np.abs(fd).max()), err_msg=f"{name} [{i}][{j}]"
                    )


@pytest.mark.skipif(BACKEND != "torch", reason="torch's fused layer_norm only")
def test_torch_fused_layer_norm_is_restored_after_transforms():
    import torch

    fused = torch.nn.functional.layer_norm
    f, x, gamma = _norm_fn()
    func.jacfwd(func.jacrev(f))(x, gamma)
    assert torch.nn.functional.layer_norm is fused

    def fails(t):
        raise ZeroDivisionError("inside the transform")

    with pytest.raises(ZeroDivisionError):
        func.jacfwd(fails)(x)
    assert torch.nn.functional.layer_norm is fused
    # Values are the fused kernel's to float rounding.
    backend = kgrad.backends.load()
    t = torch.randn(5, 6)
    w, b = torch.randn(6), torch.randn(6)
    with backend.transform_kernels():
        composite = torch.nn.functional.layer_norm(t, (6,), w, b, 1e-3)
        assert torch.nn.functional.layer_norm is not fused
    torch.testing.assert_close(composite, fused(t, (6,), w, b, 1e-3), rtol=1e-5, atol=1e-5)
    # silu (swish) likewise: its fused derivative has no forward-mode derivative.
    fused_silu = torch.nn.functional.silu
    with backend.transform_kernels():
        torch.testing.assert_close(torch.nn.functional.silu(t), fused_silu(t))
        assert torch.nn.functional.silu is not fused_silu
    assert torch.nn.functional.silu is fused_silu
