"""The five user questions on a Dense net, against hand-derived NumPy backprop."""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import assert_close, np_

import kgrad

RT, AT = 1e-4, 1e-5  # float32 arithmetic against a float64 reference


@pytest.fixture
def setup(rng):
    model = ref.mlp()
    x = rng.normal(size=(5, 3)).astype("float32")
    return model, x, ref.params(model), x.astype("float64")


def test_q1_gradient_of_the_output_wrt_the_weights(setup):
    model, x, p, x64 = setup
    g = kgrad.grad(model, x, wrt="weights")
    expected = ref.backward(p, x64, np.ones((5, 2)))
    assert list(g) == [v.path for v in model.trainable_variables]
    for k, v in g.items():
        assert_close(v, expected[k.split("/", 1)[1]], RT, AT)
    # target=1: the gradient of output unit 1 only.
    g1 = kgrad.grad(model, x, wrt="weights", target=1)
    dy = np.zeros((5, 2))
    dy[:, 1] = 1
    assert_close(g1["mlp/h1/kernel"], ref.backward(p, x64, dy)["h1/kernel"], RT, AT)


def test_q2_loss_gradient_wrt_a_layer_output_and_its_weights(setup, rng):
    model, x, p, x64 = setup
    y = rng.normal(size=(5, 2)).astype("float32")
    _, _, pred = ref.forward(p, x64)
    dy = 2 * (pred - y) / pred.size  # d mean((pred - y)^2) / d pred
    expected = ref.backward(p, x64, dy)
    # Layer 2 of model.layers is "h2"; "drop" (index 1) has no weights.
    for spec in ("h2", 2, model.layers[2]):
        act, w = kgrad.grad(model, x, wrt=("activations", "weights"), layers=spec, y=y, loss="mse")
        assert_close(act, expected["act/h2"], RT, AT)
        assert sorted(w) == ["mlp/h2/bias", "mlp/h2/kernel"]
        assert_close(w["mlp/h2/kernel"], expected["h2/kernel"], RT, AT)
    # A weightless layer is addressed safely, and its output gradient is defined.
    assert_close(
        kgrad.grad(model, x, wrt="activations", layers="drop", y=y, loss="mse"),
        expected["act/drop"],
        RT,
        AT,
    )
    assert kgrad.grad(model, x, wrt="weights", layers="drop", y=y, loss="mse") == {}
    # Several layers: a dict keyed by name.
    acts = kgrad.grad(model, x, wrt="activations", layers=["h1", "out"], y=y, loss="mse")
    assert list(acts) == ["h1", "out"]
    assert_close(acts["out"], expected["act/out"], RT, AT)
    # A Keras loss object and a callable give the same, reduced as Keras reduces.
    obj = kgrad.grad(
        model, x, wrt="activations", layers="h2", y=y, loss=keras.losses.MeanSquaredError()
    )
    fn = kgrad.grad(
        model,
        x,
        wrt="activations",
        layers="h2",
        y=y,
        loss=lambda t, q: keras.ops.mean((t - q) ** 2, axis=-1),
    )
    assert_close(obj, expected["act/h2"], RT, AT)
    assert_close(fn, expected["act/h2"], RT, AT)


def test_q2_compiled_loss_is_used_when_loss_is_none(setup, rng):
    model, x, p, x64 = setup
    model.compile(loss="mse")
    y = rng.normal(size=(5, 2)).astype("float32")
    _, _, pred = ref.forward(p, x64)
    expected = ref.backward(p, x64, 2 * (pred - y) / pred.size)
    value, g = kgrad.value_and_grad(model, x, wrt="weights", y=y)
    assert_close(value, np.mean((pred - y) ** 2), RT, AT)
    assert_close(g["mlp/h1/kernel"], expected["h1/kernel"], RT, AT)


def test_q3_one_neuron_wrt_all_weights_and_every_neuron(setup):
    model, x, p, x64 = setup
    a1, a2, _ = ref.forward(p, x64)
    (W1, _), (W2, _), _ = p
    # Neuron 1 of h2, summed over the batch, with respect to every weight.
    g = kgrad.grad(model, x, wrt="weights", of="h2", target=1)
    dz2 = np.zeros((5, 3))
    dz2[:, 1] = 1 - a2[:, 1] ** 2
    dz1 = (dz2 @ W2.T) * (1 - a1**2)
    assert_close(g["mlp/h2/kernel"], a1.T @ dz2, RT, AT)
    assert_close(g["mlp/h1/kernel"], x64.T @ dz1, RT, AT)
    assert_close(g["mlp/out/kernel"], np.zeros((3, 2)), RT, AT)  # downstream: no effect
    # Every neuron, every sample: the per-sample Jacobian of h2 w.r.t. h2's kernel.
    J = np_(kgrad.jacobian(model, x, wrt="weights", layers="h2", of="h2"))
    assert J["mlp/h2/kernel"].shape == (5, 3, 4, 3)
    expected = np.einsum("bu,bi,uv->buiv", 1 - a2**2, a1, np.eye(3))
    np.testing.assert_allclose(J["mlp/h2/kernel"], expected, rtol=RT, atol=AT)


def test_q4_dy_dx_for_many_x_uses_the_current_weights(setup, rng):
    model, x, p, x64 = setup
    J = kgrad.jacobian(model, x)
    assert tuple(J.shape) == (5, 2, 3)
    assert_close(J, ref.input_jacobian(p, x64), RT, AT)
    for mode in ("rev", "fwd"):
        assert_close(kgrad.jacobian(model, x, mode=mode), ref.input_jacobian(p, x64), RT, AT)
    # New weights: the next call must see them (no stale copies).
    model.set_weights([w * 0.5 for w in model.get_weights()])
    p2 = ref.params(model)
    assert_close(kgrad.jacobian(model, x), ref.input_jacobian(p2, x64), RT, AT)
    assert_close(kgrad.grad(model, x), ref.backward(p2, x64, np.ones((5, 2)))["x"], RT, AT)


def test_q5_second_derivatives_wrt_the_input(rng):
    """u(x) = sum_k a_k tanh(w_k x + b_k): u'' = sum_k a_k w_k^2 (-2 t_k (1 - t_k^2))."""
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    x = rng.uniform(-1, 1, size=(6, 1)).astype("float32")
    (w, b), (a, _) = [(np_(d.kernel), np_(d.bias)) for d in model.layers]
    t = np.tanh(x @ w + b)
    d2 = (-2 * t * (1 - t**2) * w**2) @ a
    H = kgrad.hessian(model, x, target=0)
    assert tuple(H.shape) == (6, 1, 1)
    assert_close(H[:, :, 0], d2, 1e-4, 1e-5)
    H_full = kgrad.hessian(model, x)  # no target: (B, *out_feat, *in, *in)
    assert tuple(H_full.shape) == (6, 1, 1, 1)
    # Higher order through kgrad.func: the third derivative of the same net.
    d1 = lambda v: kgrad.func.grad(lambda s: keras.ops.sum(model(keras.ops.reshape(s, (1, 1)))))(v)
    d3 = kgrad.func.grad(kgrad.func.grad(d1))(keras.ops.convert_to_tensor(x[0, 0]))
    t0 = t[0]
    expected3 = ((-2 * (1 - t0**2) ** 2 + 4 * t0**2 * (1 - t0**2)) * w[0] ** 3) @ a
    assert_close(d3, expected3[0], 1e-3, 1e-4)


def test_per_sample_results_match_a_batch_size_one_loop(setup):
    model, x, _, _ = setup
    J = np_(kgrad.jacobian(model, x))
    H = np_(kgrad.hessian(model, x))
    G = np_(kgrad.grad(model, x, wrt="activations", layers="h1"))
    for i in range(len(x)):
        xi = x[i : i + 1]
        np.testing.assert_allclose(J[i], np_(kgrad.jacobian(model, xi))[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(H[i], np_(kgrad.hessian(model, xi))[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            G[i],
            np_(kgrad.grad(model, xi, wrt="activations", layers="h1"))[0],
            rtol=1e-5,
            atol=1e-6,
        )


def test_full_jacobian_has_zero_cross_sample_blocks(setup):
    model, x, p, x64 = setup
    J = np_(kgrad.jacobian(model, x, per_sample=False))
    assert J.shape == (5, 2, 5, 3)
    per = ref.input_jacobian(p, x64)
    for i in range(5):
        for j in range(5):
            np.testing.assert_allclose(J[i, :, j], per[i] if i == j else 0, rtol=RT, atol=AT)
    Hf = np_(kgrad.hessian(model, x, target=0, per_sample=False))
    Hp = np_(kgrad.hessian(model, x, target=0))
    assert Hf.shape == (5, 5, 3, 5, 3)
    for i in range(5):
        np.testing.assert_allclose(Hf[i, i, :, i], Hp[i], rtol=1e-4, atol=1e-6)


def test_chunked_results_equal_unchunked(setup):
    model, x, _, _ = setup
    for mode in ("rev", "fwd"):
        full = np_(kgrad.jacobian(model, x, mode=mode))
        for chunk in (1, 2):
            np.testing.assert_allclose(
                np_(kgrad.jacobian(model, x, mode=mode, chunk_size=chunk)),
                full,
                rtol=1e-5,
                atol=1e-6,
            )
    Jw = np_(kgrad.jacobian(model, x, wrt="weights", layers="h1"))
    Jw1 = np_(kgrad.jacobian(model, x, wrt="weights", layers="h1", chunk_size=3))
    for k in Jw:
        np.testing.assert_allclose(Jw1[k], Jw[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np_(kgrad.hessian(model, x, chunk_size=1)),
        np_(kgrad.hessian(model, x)),
        rtol=1e-5,
        atol=1e-6,
    )


def _np_mse_grad(p, x64, y):
    """The hand-derived float64 gradient of ``mse(y, mlp(x))``, keyed as ``backward``."""
    _, _, pred = ref.forward(p, x64)
    return ref.backward(p, x64, 2 * (pred - y) / pred.size)


def _shifted(p, step):
    """``p`` with ``step[name]`` (keyed ``"h2/kernel"``) added to its weights."""
    layers = ("h1", "h2", "out")
    return [
        (W + step.get(f"{n}/kernel", 0.0), b + step.get(f"{n}/bias", 0.0))
        for n, (W, b) in zip(layers, p)
    ]


def test_hessian_and_hvp_match_differences_of_the_numpy_gradient(setup, rng):
    """Weight Hessian blocks and hvp against float64 central differences of backprop.

    The reference is ``(g(w + e v) - g(w - e v)) / 2e`` with ``g`` the hand-derived
    NumPy gradient: in float64 with e = 1e-5 its error is about 1e-10, far below
    the float32 tolerance kgrad is checked at.
    """
    model, x, p, x64 = setup
    y = rng.normal(size=(5, 2)).astype("float64")
    keys = ["h2/kernel", "h2/bias", "out/kernel", "out/bias"]
    paths = [f"mlp/{k}" for k in keys]
    eps = 1e-5
    shapes = {k: np_(kgrad.func.weights_of(model)[f"mlp/{k}"]).shape for k in keys}

    def hv_reference(v):
        plus = _np_mse_grad(_shifted(p, {k: eps * v[k] for k in keys}), x64, y)
        minus = _np_mse_grad(_shifted(p, {k: -eps * v[k] for k in keys}), x64, y)
        return {k: (plus[k] - minus[k]) / (2 * eps) for k in keys}

    H = kgrad.hessian(model, x, wrt="weights", layers=["h2", "out"], y=y, loss="mse")
    assert list(H) == paths
    for j, kj in enumerate(keys):  # column block j: the response to a unit step in each entry
        for idx in np.ndindex(shapes[kj]):
            unit = {k: np.zeros(shapes[k]) for k in keys}
            unit[kj][idx] = 1.0
            column = hv_reference(unit)
            for i, ki in enumerate(keys):
                got = np_(H[paths[i]][paths[j]])[(Ellipsis, *idx)]
                assert_close(got, column[ki], 1e-4, 1e-5)
    v = {k: rng.normal(size=shapes[k]) for k in keys}
    hv = kgrad.hvp(
        model,
        x,
        {p_: v[k].astype("float32") for p_, k in zip(paths, keys)},
        y=y,
        loss="mse",
        layers=["h2", "out"],
    )
    expected = hv_reference(v)
    assert list(hv) == paths
    for p_, k in zip(paths, keys):
        assert_close(hv[p_], expected[k], 1e-4, 1e-5)
    # Input HVP of q[:, 0]: differences of the NumPy input gradient (samples are independent).
    u = rng.normal(size=x.shape)
    dy = np.zeros((5, 2))
    dy[:, 0] = 1.0
    gx = lambda x_: ref.backward(p, x_, dy)["x"]  # noqa: E731
    expected = (gx(x64 + eps * u) - gx(x64 - eps * u)) / (2 * eps)
    hvx = kgrad.hvp(
        model,
        x,
        u.astype("float32"),
        wrt="inputs",
        loss=lambda t, q: keras.ops.sum(q[:, 0]),
        y=np.zeros((5, 2), "float32"),
    )
    assert_close(hvx, expected, 1e-4, 1e-5)
    Hx = np_(kgrad.hessian(model, x, target=0))
    assert_close(np.einsum("bij,bj->bi", Hx, u), expected, 1e-4, 1e-5)


def test_layer_grad_reports_every_layer_in_order(setup, rng):
    model, x, p, x64 = setup
    y = rng.normal(size=(5, 2)).astype("float32")
    _, _, pred = ref.forward(p, x64)
    expected = ref.backward(p, x64, 2 * (pred - y) / pred.size)
    report = kgrad.layer_grad(model, x, y, loss="mse")
    assert list(report) == ["h1", "drop", "h2", "out"]
    assert [r.index for r in report.values()] == [0, 1, 2, 3]
    assert report["drop"].weight_grads == {}
    a1, a2, _ = ref.forward(p, x64)
    assert_close(report["h1"].output, a1, RT, AT)
    for name in ("h1", "drop", "h2", "out"):
        assert_close(report[name].output_grad, expected[f"act/{name}"], RT, AT)
    assert sorted(report["h2"].weight_grads) == ["bias", "kernel"]
    assert_close(report["h2"].weight_grads["kernel"], expected["h2/kernel"], RT, AT)
    with pytest.raises(AttributeError):
        report["h1"].name = "x"  # frozen


def test_calls_never_change_the_model(setup, rng):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2),
        ]
    )
    x = rng.normal(size=(4, 3)).astype("float32")
    before = [np_(v.value).copy() for v in model.variables]
    kgrad.grad(model, x, wrt="weights", training=True)
    kgrad.layer_grad(model, x, np.zeros((4, 2)), loss="mse", training=True)
    kgrad.hessian(model, x, target=0)
    for b, v in zip(before, model.variables):
        np.testing.assert_array_equal(b, np_(v.value))


def test_chunk_size_bounds_rows_in_flight(setup, monkeypatch):
    from kgrad import _jac

    model, x, _, _ = setup
    seen = []
    original = _jac.batched_map

    def spy(fn, stacked, fold=None):
        seen.append(int(keras.tree.flatten(stacked)[0].shape[0]))
        return original(fn, stacked, fold)

    monkeypatch.setattr(_jac, "batched_map", spy)
    kgrad.jacobian(model, x, mode="rev", chunk_size=1)
    kgrad.jacobian(model, x, mode="fwd", chunk_size=2)
    kgrad.hessian(model, x, chunk_size=2)
    assert seen and max(seen) <= 2


def test_batchnorm_training_mode_weight_gradients(rng):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1, activation="tanh"),
        ]
    )
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    g = kgrad.grad(model, x, wrt="weights", y=y, loss="mse", training=True)
    kernel = model.layers[0].kernel
    w0 = np_(kernel.value).copy()
    v = rng.normal(size=w0.shape).astype("float32")
    eps = 2e-3  # batch statistics make the loss sharply curved: a small step

    def loss_at(s):
        kernel.assign(w0 + s * v)
        pred = np_(model(x, training=True)).astype("float64")  # batch statistics
        return np.mean((pred - y) ** 2)

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    kernel.assign(w0)
    np.testing.assert_allclose(np.sum(np_(g[kernel.path]) * v), fd, rtol=5e-3, atol=5e-4)
