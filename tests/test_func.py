"""kgrad.func against closed forms and central differences, on the active backend."""

import math

import keras
import numpy as np
import pytest
from helpers import (
    FD_ATOL,
    FD_RTOL,
    assert_close,
    central_diff_grad,
    central_diff_jac,
    np_,
)

from kgrad import func

ops = keras.ops


def t(x):
    return ops.convert_to_tensor(np.asarray(x, dtype="float32"))


# ---------------------------------------------------------------- grad


def test_grad_closed_form(rng):
    x = rng.normal(size=(5,)).astype("float32")
    g = func.grad(lambda x: ops.sum(ops.sin(x) * x))(t(x))
    assert_close(g, np.sin(x) + x * np.cos(x))


def test_grad_accepts_numpy_and_python_numbers(rng):
    x = rng.normal(size=(3,)).astype("float32")
    assert_close(func.grad(lambda x: ops.sum(x**2))(x), 2 * x)
    assert_close(func.grad(lambda x: x**3)(2.0), 12.0)


@pytest.mark.parametrize("x0", [-1.5, 0.0, 0.7, 3.0])
def test_nested_grad_of_log_to_fourth_order(x0):
    f = lambda x: ops.log(x + 2.0)
    for n in range(1, 5):
        f = func.grad(f)
        expected = (-1) ** (n + 1) * math.factorial(n - 1) / (x0 + 2.0) ** n
        assert_close(f(t(x0)), expected, rtol=1e-4, atol=1e-6)


def test_grad_argnums_tuple(rng):
    x, y = rng.normal(size=(2, 4)).astype("float32")
    gx, gy = func.grad(lambda x, y: ops.sum(x * y**2), argnums=(0, 1))(t(x), t(y))
    assert_close(gx, y**2)
    assert_close(gy, 2 * x * y)
    # argnums=1 alone, with a keyword argument passed through untouched.
    gy_only = func.grad(lambda x, y, scale=1.0: scale * ops.sum(x * y**2), argnums=1)(
        t(x), t(y), scale=3.0
    )
    assert_close(gy_only, 6 * x * y)


def test_grad_pytree_argument(rng):
    a, b, c = rng.normal(size=(3, 3)).astype("float32")
    params = {"a": t(a), "bc": [t(b), t(c)]}
    f = lambda p: ops.sum(p["a"] * p["bc"][0]) + ops.sum(ops.exp(p["bc"][1]))
    g = func.grad(f)(params)
    assert set(g) == {"a", "bc"} and len(g["bc"]) == 2
    assert_close(g["a"], b)
    assert_close(g["bc"][0], a)
    assert_close(g["bc"][1], np.exp(c))


def test_has_aux_and_value_and_grad(rng):
    x = rng.normal(size=(4,)).astype("float32")
    f = lambda x: (ops.sum(x**2), {"mean": ops.mean(x)})
    g, aux = func.grad(f, has_aux=True)(t(x))
    assert_close(g, 2 * x)
    assert_close(aux["mean"], x.mean())
    (value, aux2), g2 = func.value_and_grad(f, has_aux=True)(t(x))
    assert_close(value, np.sum(x**2))
    assert_close(aux2["mean"], x.mean())
    assert_close(g2, 2 * x)
    value, g3 = func.value_and_grad(lambda x: ops.sum(ops.cos(x)))(t(x))
    assert_close(value, np.cos(x).sum())
    assert_close(g3, -np.sin(x))


def test_grad_of_non_scalar_raises_value_error_naming_the_shape():
    with pytest.raises(ValueError, match=r"scalar.*\(3,\)"):
        func.grad(lambda x: x * 2.0)(t([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        func.value_and_grad(lambda x: x)(t([1.0, 2.0]))


def test_grad_of_integer_input_raises_type_error():
    with pytest.raises(TypeError, match="int32.*Received"):
        func.grad(lambda x: ops.sum(x))(np.array([1, 2], dtype="int32"))
    with pytest.raises(TypeError, match="bool"):
        func.jacrev(lambda x: x)(np.array([True, False]))


def test_bad_argnums_raise():
    f = lambda x, y: ops.sum(x * y)
    with pytest.raises(ValueError, match="argnums=2"):
        func.grad(f, argnums=2)(t([1.0]), t([2.0]))
    with pytest.raises(TypeError, match="argnums"):
        func.grad(f, argnums="0")
    with pytest.raises(TypeError, match="argnums"):
        func.grad(f, argnums=[0, 1])
    with pytest.raises(TypeError, match="callable"):
        func.grad(3.0)


def test_has_aux_without_pair_raises():
    with pytest.raises(ValueError, match="has_aux"):
        func.grad(lambda x: ops.sum(x), has_aux=True)(t([1.0]))


# ---------------------------------------------------------------- Jacobians

W = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype="float32")


def _tanh_w(x):
    return ops.tanh(ops.matmul(ops.convert_to_tensor(W), x))


@pytest.mark.parametrize("jac", ["jacrev", "jacfwd"])
def test_jacobian_closed_form_and_central_differences(jac, rng):
    x = rng.normal(size=(3,)).astype("float32")
    J = np_(getattr(func, jac)(_tanh_w)(t(x)))
    closed = (1 - np.tanh(W @ x) ** 2)[:, None] * W
    np.testing.assert_allclose(J, closed, rtol=1e-4, atol=1e-6)
    fd = central_diff_jac(lambda v: np.tanh(W.astype("float64") @ v), x)
    np.testing.assert_allclose(J, fd, rtol=FD_RTOL, atol=FD_ATOL)


@pytest.mark.parametrize("jac", ["jacrev", "jacfwd"])
def test_jacobian_pytrees_and_argnums(jac, rng):
    x = rng.normal(size=(2, 3)).astype("float32")
    y = rng.normal(size=(3,)).astype("float32")
    f = lambda x, y: {"u": x * y, "v": ops.sum(x, axis=1)}
    J = getattr(func, jac)(f, argnums=(0, 1))(t(x), t(y))
    assert set(J) == {"u", "v"}
    ju_x, ju_y = np_(J["u"])
    jv_x, jv_y = np_(J["v"])
    assert ju_x.shape == (2, 3, 2, 3) and ju_y.shape == (2, 3, 3)
    assert jv_x.shape == (2, 2, 3) and jv_y.shape == (2, 3)
    eye = np.eye(6).reshape(2, 3, 2, 3)
    np.testing.assert_allclose(ju_x, eye * y[None, None, None, :], atol=1e-6)
    np.testing.assert_allclose(ju_y, np.einsum("ij,jk->ijk", x, np.eye(3)), atol=1e-6)
    np.testing.assert_allclose(jv_x, np.repeat(np.eye(2)[:, :, None], 3, axis=2), atol=1e-6)
    np.testing.assert_allclose(jv_y, 0.0, atol=1e-6)


@pytest.mark.parametrize("jac", ["jacrev", "jacfwd"])
def test_jacobian_has_aux(jac):
    J, aux = getattr(func, jac)(lambda x: (x**2, ops.sum(x)), has_aux=True)(t([1.0, 3.0]))
    np.testing.assert_allclose(np_(J), np.diag([2.0, 6.0]), atol=1e-6)
    assert_close(aux, 4.0)


# ---------------------------------------------------------------- Hessians


def test_hessian_closed_form(rng):
    A = rng.normal(size=(4, 4)).astype("float32")
    x = rng.normal(size=(4,)).astype("float32")
    quad = lambda x: ops.sum(x * ops.matmul(ops.convert_to_tensor(A), x))
    assert_close(func.hessian(quad)(t(x)), A + A.T)
    cubic = lambda x: ops.sum(x**3) + x[0] * x[1]
    expected = np.diag(6 * x)
    expected[0, 1] += 1
    expected[1, 0] += 1
    assert_close(func.hessian(cubic)(t(x)), expected, rtol=1e-4, atol=1e-5)


def test_hessian_matches_compositions_and_central_differences(rng):
    x = rng.normal(size=(3,)).astype("float32")

    def f(x):
        return ops.sum(ops.tanh(ops.matmul(ops.convert_to_tensor(W), x)) ** 2)

    H = np_(func.hessian(f)(t(x)))
    np.testing.assert_allclose(H, H.T, atol=1e-5)
    np.testing.assert_allclose(np_(func.jacfwd(func.jacrev(f))(t(x))), H, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np_(func.jacrev(func.jacrev(f))(t(x))), H, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np_(func.jacfwd(func.grad(f))(t(x))), H, rtol=1e-4, atol=1e-6)
    W64 = W.astype("float64")
    grad_np = lambda v: 2 * W64.T @ (np.tanh(W64 @ v) * (1 - np.tanh(W64 @ v) ** 2))
    np.testing.assert_allclose(H, central_diff_jac(grad_np, x), rtol=FD_RTOL, atol=FD_ATOL)


def test_hessian_of_non_scalar_raises():
    with pytest.raises(ValueError, match="scalar"):
        func.hessian(lambda x: x**2)(t([1.0, 2.0]))


# ---------------------------------------------------------------- jvp / vjp


def test_jvp_and_vjp_match_the_jacobian(rng):
    x = rng.normal(size=(3,)).astype("float32")
    v = rng.normal(size=(3,)).astype("float32")
    u = rng.normal(size=(2,)).astype("float32")
    J = (1 - np.tanh(W @ x) ** 2)[:, None] * W
    y, jv = func.jvp(_tanh_w, (t(x),), (t(v),))
    assert_close(y, np.tanh(W @ x))
    assert_close(jv, J @ v)
    y2, pullback = func.vjp(_tanh_w, t(x))
    assert_close(y2, np.tanh(W @ x))
    (uj,) = pullback(t(u))
    assert_close(uj, u @ J)
    (uj_again,) = pullback(u)  # NumPy cotangent, and a second call
    assert_close(uj_again, u @ J)


def test_jvp_vjp_pytrees_and_aux():
    f = lambda p: ({"s": p["a"] * p["b"]}, p["a"] + 1.0)
    p = {"a": t([1.0, 2.0]), "b": t([3.0, 4.0])}
    tan = {"a": t([1.0, 0.0]), "b": t([0.0, 1.0])}
    out, tout, aux = func.jvp(f, (p,), (tan,), has_aux=True)
    assert_close(out["s"], [3.0, 8.0])
    assert_close(tout["s"], [3.0, 2.0])
    assert_close(aux, [2.0, 3.0])
    out, pullback, aux = func.vjp(f, p, has_aux=True)
    (gp,) = pullback({"s": t([1.0, 1.0])})
    assert_close(gp["a"], [3.0, 4.0])
    assert_close(gp["b"], [1.0, 2.0])


def test_jvp_rejects_mismatched_tangents():
    with pytest.raises(ValueError, match="tangent"):
        func.jvp(lambda x: x, (t([1.0, 2.0]),), (t([1.0]),))
    with pytest.raises(TypeError, match="tuple"):
        func.jvp(lambda x: x, t([1.0]), t([1.0]))


def test_forward_over_reverse_hessian_vector_product(rng):
    A = rng.normal(size=(3, 3)).astype("float32")
    x = rng.normal(size=(3,)).astype("float32")
    v = rng.normal(size=(3,)).astype("float32")
    f = lambda x: ops.sum(x * ops.matmul(ops.convert_to_tensor(A), x))
    _, hv = func.jvp(func.grad(f), (t(x),), (t(v),))
    assert_close(hv, (A + A.T) @ v)


# ---------------------------------------------------------------- vmap / jit


def test_vmap_per_example_grads_match_a_loop(rng):
    xs = rng.normal(size=(6, 3)).astype("float32")
    f = lambda x: ops.sum(ops.tanh(ops.matmul(ops.convert_to_tensor(W), x)) ** 2)
    batched = np_(func.vmap(func.grad(f))(t(xs)))
    looped = np.stack([np_(func.grad(f)(t(x))) for x in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6)


def test_vmap_axes(rng):
    xs = rng.normal(size=(3, 5)).astype("float32")  # mapped over axis 1
    w = rng.normal(size=(3,)).astype("float32")  # broadcast
    f = lambda x, w: ops.stack([ops.sum(x * w), ops.sum(x)])
    out = np_(func.vmap(f, in_axes=(1, None), out_axes=1)(t(xs), t(w)))
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out[0], w @ xs, rtol=1e-5)
    np.testing.assert_allclose(out[1], xs.sum(0), rtol=1e-5)
    d = func.vmap(lambda p: p["a"] * 2.0)({"a": xs})
    assert_close(d, 2 * xs)


def test_vmap_of_jacrev_and_hessian(rng):
    xs = rng.normal(size=(4, 3)).astype("float32")
    f = lambda x: ops.sum(x**3)
    H = np_(func.vmap(func.hessian(f))(t(xs)))
    assert H.shape == (4, 3, 3)
    for i in range(4):
        np.testing.assert_allclose(H[i], np.diag(6 * xs[i]), rtol=1e-4, atol=1e-5)
    J = np_(func.vmap(func.jacrev(lambda x: x**2))(t(xs)))
    np.testing.assert_allclose(J, np.stack([np.diag(2 * x) for x in xs]), rtol=1e-5, atol=1e-6)


def test_jit_of_grad_matches_and_sees_new_values(rng):
    f = lambda x, a: ops.sum(a * ops.sin(x))
    fast = func.jit(func.grad(f))
    x = rng.normal(size=(4,)).astype("float32")
    for a in (1.0, 2.5):  # `a` is an argument, so a new value gives a new result
        assert_close(fast(t(x), t(a)), a * np.cos(x))
    assert_close(func.jit(lambda x: x * 2.0)(t(x)), 2 * x)


def test_grad_of_jit_and_jit_of_hessian(rng):
    x = rng.normal(size=(3,)).astype("float32")
    f = func.jit(lambda x: ops.sum(ops.exp(x)))
    assert_close(func.grad(f)(t(x)), np.exp(x))
    H = func.jit(func.hessian(lambda x: ops.sum(ops.exp(x))))(t(x))
    assert_close(H, np.diag(np.exp(x)))


def test_central_difference_check_of_a_composite(rng):
    x = rng.normal(size=(2, 3)).astype("float32")

    def f(x):
        return ops.sum(ops.softmax(x, axis=-1) ** 2 * ops.log1p(x**2))

    def f_np(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
        return np.sum(s**2 * np.log1p(x**2))

    g = np_(func.grad(f)(t(x)))
    np.testing.assert_allclose(g, central_diff_grad(f_np, x), rtol=FD_RTOL, atol=FD_ATOL)


def test_vmap_randomness_is_the_same_for_every_example_by_default():
    """One meaning on every backend: an unmapped random op draws once for all rows."""
    drop = keras.layers.Dropout(0.5, seed=1)
    x = np.ones((4, 64), "float32")
    out = np_(func.vmap(lambda r: drop(r, training=True))(x))
    assert set(np.unique(out)) <= {0.0, 2.0} and 0 < (out[0] == 0).sum() < 64
    for row in out[1:]:
        np.testing.assert_array_equal(row, out[0])
    seeded = np_(func.vmap(lambda r: r + keras.random.uniform((64,), seed=3))(x))
    for row in seeded[1:]:
        np.testing.assert_array_equal(row, seeded[0])


def test_vmap_randomness_different_or_a_clear_error():
    drop = keras.layers.Dropout(0.5, seed=1)
    x = np.ones((4, 64), "float32")
    mapped = lambda: func.vmap(lambda r: drop(r, training=True), randomness="different")(x)
    if keras.backend.backend() == "torch":
        out = np_(mapped())
        assert any((out[i] != out[0]).any() for i in range(1, 4))
    else:
        with pytest.raises(NotImplementedError, match="Received: randomness='different'"):
            mapped()
    with pytest.raises(ValueError, match="Received: randomness='sam'.*same"):
        func.vmap(lambda r: r, randomness="sam")


def test_vmap_misuse_gets_the_same_message_on_every_backend():
    x5, x4 = ops.ones((5, 3)), ops.ones((4, 3))
    with pytest.raises(ValueError, match=r"inconsistent sizes.*Received sizes: \[4, 5\]"):
        func.vmap(lambda u, v: u + v)(x5, x4)
    with pytest.raises(ValueError, match=r"Received sizes: \[3, 5\]"):  # axis 1 of the second
        func.vmap(lambda u, v: u + v[0], in_axes=(0, 1))(x5, ops.ones((1, 3)))
    with pytest.raises(ValueError, match=r"one entry per positional argument. Received: in_axes"):
        func.vmap(lambda u: u, in_axes=(0, 0))(x5)
    # Unmapped (None) arguments and matching sizes pass.
    out = func.vmap(lambda u, c: u * c, in_axes=(0, None))(x5, ops.ones((3,)))
    assert tuple(out.shape) == (5, 3)
