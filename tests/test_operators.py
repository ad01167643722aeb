"""Differential operators (API §5) against closed forms, full Hessians and Jacobians.

References are independent of the forward-mode code under test: closed-form
derivatives of analytic functions written with ``keras.ops``, and the trace of
kgrad's reverse-mode-based per-sample Hessian and Jacobian (themselves checked
against finite differences and NumPy backprop elsewhere). Keras computes in
float32 on every backend, so agreement is to float32 rounding of sums of a few
dozen terms (``rtol=1e-4``); fourth derivatives of ``log`` lose a few more bits
(``rtol=1e-3``).
"""

import math

import keras
import numpy as np
import pytest
from helpers import assert_close, np_

import kgrad

ops = keras.ops


def _mlp(d_in, d_out=1, seed=0, name=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(16, activation="sigmoid"),
            keras.layers.Dense(d_out),
        ],
        name=name,
    )


def _conv_field(length=6, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((length, 1)),
            keras.layers.Conv1D(4, 3, padding="same", activation="tanh"),
            keras.layers.Conv1D(1, 3, padding="same"),
        ]
    )


def _two_inputs(seed=0):
    keras.utils.set_random_seed(seed)
    t = keras.Input((1,), name="t")
    s = keras.Input((2,), name="s")
    h = keras.layers.Dense(12, activation="tanh")(keras.layers.Concatenate()([t, s]))
    return keras.Model([t, s], keras.layers.Dense(1)(h))


# ------------------------------------------------------------------ closed forms


def test_log_to_fourth_order_the_seed_question(rng):
    x = rng.uniform(-1, 2, size=(5, 1)).astype("float32")
    f = lambda z: ops.log(z + 2.0)  # noqa: E731
    a = x[:, 0].astype("float64") + 2
    want = [np.log(a), 1 / a, -1 / a**2, 2 / a**3, -6 / a**4]
    for k in range(1, 5):
        got = np_(kgrad.partial(f, x, (0,) * k))[:, 0]
        assert_close(got, want[k], rtol=1e-3, atol=1e-6)
    terms = kgrad.taylor(f, x, np.ones((1,), "float32"), 4)
    assert len(terms) == 5
    for k, term in enumerate(terms):
        assert_close(np_(term)[:, 0], want[k], rtol=1e-3, atol=1e-6)


def test_mixed_partials_to_fourth_order(rng):
    # f = exp(a x0) sin(b x1) x2^3: every mixed partial is a product of 1-d derivatives.
    a, b = 0.7, 1.3
    x = rng.uniform(-1, 1, size=(4, 3)).astype("float32")

    def f(z):
        return ops.exp(a * z[:, 0]) * ops.sin(b * z[:, 1]) * z[:, 2] ** 3

    x0, x1, x2 = (x[:, i].astype("float64") for i in range(3))
    e = lambda k: a**k * np.exp(a * x0)  # noqa: E731
    s = lambda k: b**k * np.sin(b * x1 + k * math.pi / 2)  # noqa: E731
    p = lambda k: [x2**3, 3 * x2**2, 6 * x2, 6 * np.ones_like(x2), 0 * x2][k]  # noqa: E731
    cases = {
        "x0": ((0,), e(1) * s(0) * p(0)),
        "x1x1": ((1, 1), e(0) * s(2) * p(0)),
        "x0x1x2": ((0, 1, 2), e(1) * s(1) * p(1)),
        "x2x1x2x1": ((2, 1, 2, 1), e(0) * s(2) * p(2)),
        "x0x0x0x2": ((0, 0, 0, 2), e(3) * s(0) * p(1)),
        "x2^4": ((2, 2, 2, 2), e(0) * s(0) * p(4)),
    }
    got = kgrad.partial(f, x, {k: v[0] for k, v in cases.items()})
    assert list(got) == list(cases)  # the given key order
    for key, (_, want) in cases.items():
        assert_close(np_(got[key]), want, rtol=2e-4, atol=2e-5)
    # The same partial asked alone, and with negative and per-axis indices.
    assert_close(np_(kgrad.partial(f, x, (0, -2, -1))), cases["x0x1x2"][1], rtol=2e-4, atol=2e-5)


def test_per_axis_indices_on_image_like_inputs(rng):
    x = rng.uniform(-1, 1, size=(3, 2, 2)).astype("float32")

    def f(z):  # (B, 2, 2) -> (B,): z01^2 * z10^3
        return z[:, 0, 1] ** 2 * z[:, 1, 0] ** 3

    got = np_(kgrad.partial(f, x, ((0, 1), (1, 0), (1, 0))))
    assert_close(got, 2 * x[:, 0, 1] * 6 * x[:, 1, 0], rtol=1e-4, atol=1e-5)
    # An int entry is into the C-order flattening: (0, 1) is 1 and (1, 0) is 2.
    assert_close(np_(kgrad.partial(f, x, (1, 2, 2))), got, rtol=1e-6, atol=1e-6)


def test_taylor_of_the_exponential_along_a_direction(rng):
    w = np.array([0.5, -1.0, 0.25], "float32")
    x = rng.uniform(-1, 1, size=(4, 3)).astype("float32")
    v = rng.uniform(-1, 1, size=(4, 3)).astype("float32")  # one direction per sample

    wt = ops.convert_to_tensor(w)

    def f(z):
        return ops.exp(ops.sum(z * wt, axis=1))

    terms = kgrad.taylor(f, x, v, 5)
    base = np.exp(x.astype("float64") @ w)
    slope = v.astype("float64") @ w
    for k, term in enumerate(terms):
        assert_close(np_(term), slope**k * base, rtol=2e-4, atol=1e-5)


# ------------------------------------------------------------------ against full derivatives


def _hessian_trace(model, x, **kwargs):
    h = np_(kgrad.hessian(model, x, **kwargs))
    n = int(np.prod(x.shape[1:]))
    lead = h.shape[: h.ndim - 2 * len(x.shape[1:])]
    return np.trace(h.reshape(*lead, n, n), axis1=-2, axis2=-1)


def test_laplacian_is_the_trace_of_the_hessian_on_an_mlp(rng):
    model = _mlp(4, d_out=2)
    x = rng.normal(size=(5, 4)).astype("float32")
    want = _hessian_trace(model, x)  # (B, 2)
    assert_close(np_(kgrad.laplacian(model, x)), want, rtol=1e-4, atol=1e-5)
    assert_close(np_(kgrad.laplacian(model, x, target=1)), want[:, 1], rtol=1e-4, atol=1e-5)
    # Nothing but the second derivatives: a linear model's Laplacian is zero.
    linear = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert np.abs(np_(kgrad.laplacian(linear, x))).max() < 1e-6


def test_laplacian_and_divergence_of_a_conv1d_field(rng):
    model = _conv_field()
    x = rng.normal(size=(3, 6, 1)).astype("float32")
    h = np_(kgrad.hessian(model, x))  # (B, 6, 1, 6, 1, 6, 1)
    want = np.trace(h.reshape(3, 6, 1, 6, 6), axis1=-2, axis2=-1)
    assert_close(np_(kgrad.laplacian(model, x)), want, rtol=1e-4, atol=1e-5)
    j = np_(kgrad.jacobian(model, x)).reshape(3, 6, 6)
    assert_close(
        np_(kgrad.divergence(model, x)), np.trace(j, axis1=1, axis2=2), rtol=1e-4, atol=1e-5
    )


def test_multi_input_model_by_name_and_position(rng):
    model = _two_inputs()
    t = rng.normal(size=(4, 1)).astype("float32")
    s = rng.normal(size=(4, 2)).astype("float32")
    h = kgrad.hessian(model, [t, s], target=0)  # one Hessian per input
    want = np.trace(np_(h[1]), axis1=1, axis2=2)
    by_name = np_(kgrad.laplacian(model, [t, s], input="s", target=0))
    assert_close(by_name, want, rtol=1e-4, atol=1e-5)
    assert_close(np_(kgrad.laplacian(model, [t, s], input=1, target=0)), by_name, rtol=0, atol=0)
    ut = np_(kgrad.partial(model, [t, s], (0,), input="t", target=0))
    assert_close(ut, np_(kgrad.grad(model, [t, s], target=0)[0])[:, 0], rtol=1e-4, atol=1e-6)


def test_divergence_is_the_trace_of_the_jacobian(rng):
    model = _mlp(3, d_out=3)
    x = rng.normal(size=(6, 3)).astype("float32")
    j = np_(kgrad.jacobian(model, x))
    assert_close(
        np_(kgrad.divergence(model, x)), np.trace(j, axis1=1, axis2=2), rtol=1e-4, atol=1e-5
    )
    # `of` a hidden layer with the input's width.
    inp = keras.Input((3,))
    hid = keras.layers.Dense(3, activation="tanh", name="hid")(inp)
    net = keras.Model(inp, keras.layers.Dense(1)(hid))
    jh = np_(kgrad.jacobian(net, x, of="hid"))
    assert_close(np_(kgrad.divergence(net, x, of="hid")), np.trace(jh, axis1=1, axis2=2))


# ------------------------------------------------------------------ stochastic estimates


def test_stochastic_laplacian_is_seeded_and_unbiased(rng):
    model = _mlp(6)
    x = rng.normal(size=(4, 6)).astype("float32")
    exact = np_(kgrad.laplacian(model, x))[:, 0]
    one = np_(kgrad.laplacian(model, x, method="stochastic", samples=8, seed=3))
    assert_close(np_(kgrad.laplacian(model, x, method="stochastic", samples=8, seed=3)), one, 0, 0)
    assert not np.allclose(
        np_(kgrad.laplacian(model, x, method="stochastic", samples=8, seed=4)), one
    )
    # Mean of 40 seeded 8-direction estimates. Rademacher Hutchinson has variance
    # 2 * sum_{i != j} H_ij^2 per direction; allow 5 standard errors.
    runs = [
        np_(kgrad.laplacian(model, x, method="stochastic", samples=8, seed=s))[:, 0]
        for s in range(40)
    ]
    h = np_(kgrad.hessian(model, x, target=0)).astype("float64")
    off = h * (1 - np.eye(6))
    std = np.sqrt(2 * (off**2).sum(axis=(1, 2)) / (8 * 40))
    assert np.all(np.abs(np.mean(runs, axis=0) - exact) <= 5 * std + 1e-5)


def test_stochastic_divergence_is_seeded_and_unbiased(rng):
    model = _mlp(5, d_out=5)
    x = rng.normal(size=(3, 5)).astype("float32")
    exact = np_(kgrad.divergence(model, x))
    again = [np_(kgrad.divergence(model, x, method="stochastic", samples=6, seed=7)) for _ in "ab"]
    assert_close(again[0], again[1], 0, 0)
    runs = [
        np_(kgrad.divergence(model, x, method="stochastic", samples=6, seed=s)) for s in range(40)
    ]
    j = np_(kgrad.jacobian(model, x)).astype("float64")
    sym = (j + np.swapaxes(j, 1, 2)) * (1 - np.eye(5))
    std = np.sqrt((sym**2).sum(axis=(1, 2)) / 2 / (6 * 40))  # sum over i<j of (J_ij+J_ji)^2
    assert np.all(np.abs(np.mean(runs, axis=0) - exact) <= 5 * std + 1e-5)


def test_seed_generator_draws_new_directions_each_call(rng):
    model = _mlp(6)
    x = rng.normal(size=(2, 6)).astype("float32")
    gen = keras.random.SeedGenerator(11)
    a = np_(kgrad.laplacian(model, x, method="stochastic", samples=4, seed=gen))
    b = np_(kgrad.laplacian(model, x, method="stochastic", samples=4, seed=gen))
    assert a.shape == (2, 1) and not np.allclose(a, b)


# ------------------------------------------------------------------ paths


def test_nan_propagates_to_its_own_sample_only(rng):
    model = _mlp(3)
    x = rng.normal(size=(3, 3)).astype("float32")
    x[1, 0] = np.nan
    for out in (
        kgrad.laplacian(model, x),
        kgrad.partial(model, x, (0, 1)),
        kgrad.taylor(model, x, np.ones(3, "float32"), 2)[2],
    ):
        out = np_(out)
        assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


def test_a_dataset_of_batches_gives_the_concatenated_result(rng):
    model = _mlp(3)
    x = rng.normal(size=(7, 3)).astype("float32")
    whole = np_(kgrad.laplacian(model, x))
    streamed = np_(kgrad.laplacian(model, iter([x[:4], x[4:]])))
    assert_close(streamed, whole, rtol=1e-6, atol=1e-6)
    parts = kgrad.partial(model, iter([x[:3], x[3:]]), {"a": (0,), "b": (1, 2)})
    assert np_(parts["b"]).shape == (7, 1)


def test_odd_batch_sizes_repeat_the_same_answers(rng):
    model = _mlp(2)
    x = rng.normal(size=(11, 2)).astype("float32")
    whole = np_(kgrad.partial(model, x, (0, 1)))
    for n in (1, 3, 5):
        assert_close(np_(kgrad.partial(model, x[:n], (0, 1))), whole[:n], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ errors


def test_bad_arguments_raise_clear_errors(rng):
    model = _mlp(3)
    x = rng.normal(size=(2, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"out of range.*Received: 3"):
        kgrad.partial(model, x, (0, 3))
    with pytest.raises(ValueError, match="one index per feature axis"):
        kgrad.partial(model, x, ((0, 1),))
    with pytest.raises(ValueError, match="order >= 1"):
        kgrad.partial(model, x, ())
    with pytest.raises(TypeError, match="int or a tuple of ints"):
        kgrad.partial(model, x, (0.5,))
    with pytest.raises(ValueError, match="method"):
        kgrad.laplacian(model, x, method="hutchinson")
    with pytest.raises(ValueError, match="stochastic"):
        kgrad.laplacian(model, x, samples=4)
    with pytest.raises(ValueError, match="positive int"):
        kgrad.laplacian(model, x, method="stochastic", samples=0)
    with pytest.raises(ValueError, match="features of the input"):
        kgrad.divergence(model, x)
    with pytest.raises(ValueError, match="`direction` must have"):
        kgrad.taylor(model, x, np.ones(2, "float32"), 2)
    with pytest.raises(ValueError, match="order"):
        kgrad.taylor(model, x, np.ones(3, "float32"), -1)
    two = _two_inputs()
    pair = [x[:, :1], x[:, 1:]]
    with pytest.raises(ValueError, match=r"gets 2 inputs.*\['t', 's'\]"):
        kgrad.laplacian(two, pair)
    with pytest.raises(ValueError, match="No input named 'z'"):
        kgrad.laplacian(two, pair, input="z")
    with pytest.raises(ValueError, match="out of range"):
        kgrad.laplacian(two, pair, input=2)


def test_samples_that_interact_are_refused(rng):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()]
    )
    x = rng.normal(size=(4, 3)).astype("float32")
    with pytest.raises(ValueError, match="depends on the other samples"):
        kgrad.laplacian(model, x, training=True)
    kgrad.laplacian(model, x)  # inference statistics: independent samples


# ------------------------------------------------------------------ the forward Laplacian


ACTIVATIONS = ["tanh", "sigmoid", "gelu", "swish", "softplus", "elu", "selu", "softsign", "relu"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_laplacian_of_dense_chains_matches_the_general_path(activation, rng):
    # Dense/activation chains take the forward-Laplacian path; `of=` the last layer
    # (the same output) takes the general one: vmapped second-order forward mode.
    from kgrad import _forward_laplacian

    if activation == "softsign" and keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow registers no gradient for SoftsignGrad (see docs/backends.md)")
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation=activation),
            keras.layers.Dense(8),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(2, name="last"),
        ]
    )
    assert _forward_laplacian.chain(model) is not None
    x = rng.normal(size=(5, 4)).astype("float32")
    fast, general = kgrad.laplacian(model, x), kgrad.laplacian(model, x, of="last")
    assert_close(np_(fast), np_(general), rtol=1e-4, atol=1e-5)
    kwargs = dict(method="stochastic", samples=3, seed=5, target=1)
    assert_close(
        np_(kgrad.laplacian(model, x, **kwargs)),
        np_(kgrad.laplacian(model, x, of="last", **kwargs)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_forward_laplacian_applies_to_single_path_models_only():
    from kgrad._forward_laplacian import chain

    inp = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh")(inp)
    assert chain(keras.Model(inp, keras.layers.Dense(1)(hidden))) is not None
    mixed = keras.layers.Concatenate()([hidden, inp])  # a branch: the general path
    assert chain(keras.Model(inp, keras.layers.Dense(1)(mixed))) is None
    softmax = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    assert chain(softmax) is None  # softmax mixes features
    assert chain(_conv_field()) is None
