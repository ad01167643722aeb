"""Every layer family and model kind, checked against central differences and
batch-size-1 loops."""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

L = keras.layers
BACKEND = keras.backend.backend()


def directional_fd(model, x, v, eps=1e-2, training=False):
    """(sum f(x + eps v) - sum f(x - eps v)) / 2 eps, by calling the model (float32)."""
    f = lambda z: float(np.sum(np_(model(z, training=training)).astype("float64")))
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def check_input_grad(model, x, rng, rtol=2e-3, eps=1e-2):
    """Input gradient against directional central differences, in several directions."""
    g = np_(kgrad.grad(model, x)).astype("float64")
    assert g.shape == x.shape
    for _ in range(3):
        v = rng.normal(size=x.shape).astype("float32")
        fd = directional_fd(model, x, v, eps=eps)
        np.testing.assert_allclose(np.sum(g * v), fd, rtol=rtol, atol=2e-3 * (1 + abs(fd)))
    return g


def check_per_sample_jacobian(model, x, target=None):
    J = np_(kgrad.jacobian(model, x, target=target))
    for i in range(len(x)):
        Ji = np_(kgrad.jacobian(model, x[i : i + 1], target=target))[0]
        np.testing.assert_allclose(J[i], Ji, rtol=1e-4, atol=1e-5)
    return J


FAMILIES = {
    "conv1d": lambda: keras.Sequential(
        [
            keras.Input((8, 2)),
            L.Conv1D(3, 3, activation="tanh"),
            L.AveragePooling1D(2),
            L.Flatten(),
            L.Dense(2),
        ]
    ),
    "conv2d_bn_pool": lambda: keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(3, 3, padding="same"),
            L.BatchNormalization(),
            L.Activation("tanh"),
            L.AveragePooling2D(2),
            L.GlobalAveragePooling2D(),
            L.Dense(2),
        ]
    ),
    # Inputs below are spaced apart, so the small steps never cross a max-pooling kink.
    "maxpool": lambda: keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3, activation="tanh"),
            L.Dense(2),
        ]
    ),
    "depthwise": lambda: keras.Sequential(
        [keras.Input((5, 5, 3)), L.DepthwiseConv2D(3, activation="tanh"), L.Flatten(), L.Dense(2)]
    ),
    "layernorm_dropout": lambda: keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(6, activation="tanh"),
            L.LayerNormalization(),
            L.Dropout(0.5),
            L.Dense(2),
        ]
    ),
    "lstm": lambda: keras.Sequential([keras.Input((5, 3)), L.LSTM(4), L.Dense(2)]),
    "gru": lambda: keras.Sequential(
        [
            keras.Input((5, 3)),
            L.GRU(4, return_sequences=True),
            L.GlobalAveragePooling1D(),
            L.Dense(2),
        ]
    ),
    "lambda": lambda: keras.Sequential(
        [keras.Input((4,)), L.Lambda(lambda t: keras.ops.sin(t) * t), L.Dense(2)]
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_families(family, rng):
    model = FAMILIES[family]()
    shape = model.inputs[0].shape[1:]
    x = rng.normal(size=(3, *shape)).astype("float32")
    if family == "conv2d_bn_pool":  # move BN statistics off their defaults
        bn = model.layers[1]
        bn.moving_mean.assign(rng.normal(size=3).astype("float32") * 0.1)
        bn.moving_variance.assign(rng.uniform(0.5, 2, size=3).astype("float32"))
    eps = 1e-2
    if family == "maxpool":
        # Distinct values 0.02 apart and a step of 2e-3 times N(0, 1): no perturbation
        # reorders a pooling window (float32 rounding costs about 5e-5 relative).
        x = (rng.permutation(x.size).reshape(x.shape) * 0.02 - 1.0).astype("float32")
        eps = 2e-3
    check_input_grad(model, x, rng, eps=eps)
    J = check_per_sample_jacobian(model, x)
    assert J.shape == (3, 2, *shape)
    # Weights: each weight's directional derivative by central differences.
    g = kgrad.grad(model, x, wrt="weights")
    assert list(g) == [v.path for v in model.trainable_variables]
    report = kgrad.layer_grad(model, x)
    weight_grads = {
        path: report[name].weight_grads[short]
        for name in report
        for short, path in report[name].weight_paths.items()
    }
    assert sorted(weight_grads) == sorted(g)
    f = lambda: float(np.sum(np_(model(x)).astype("float64")))
    for v in model.trainable_variables:
        w = np_(v.value).copy()
        d = rng.normal(size=w.shape).astype("float32")
        v.assign(w + eps * d)
        f_plus = f()
        v.assign(w - eps * d)
        f_minus = f()
        v.assign(w)
        fd = (f_plus - f_minus) / (2 * eps)
        for what, grads in (("grad", g), ("layer_grad", weight_grads)):
            analytic = float(np.sum(np_(grads[v.path]) * d))
            np.testing.assert_allclose(
                analytic, fd, rtol=2e-3, atol=2e-3 * (1 + abs(fd)), err_msg=f"{what} {v.path}"
            )
    check_layer_grad_outputs(model, x, report, rng, eps)


def check_layer_grad_outputs(model, x, report, rng, eps):
    """Every layer reports, weightless ones included, with its output and output gradient.

    Each layer's ``output`` equals a sub-model ``Model(model.inputs[0], layer.output)``;
    its ``output_grad`` is checked by the chain rule along a random input direction
    ``u``: ``d/dt sum(model(x + t u)) = <output_grad, d/dt layer_output(x + t u)>``,
    both sides by central differences of forward passes.
    """
    assert list(report) == [layer.name for layer in model.layers]
    assert [report[layer.name].index for layer in model.layers] == list(range(len(model.layers)))
    u = rng.normal(size=x.shape).astype("float32")
    x64 = x.astype("float64")
    f = lambda z: float(np.sum(np_(model(z.astype("float32"))).astype("float64")))  # noqa: E731
    df = (f(x64 + eps * u) - f(x64 - eps * u)) / (2 * eps)
    for layer in model.layers:
        sub = keras.Model(model.inputs[0], layer.output)
        out = np_(sub(x)).astype("float64")
        entry = report[layer.name]
        # On a GPU a recurrent layer's plain call may run on cuDNN and kgrad's
        # transforms on its step loop: float32 rounding then differs by ~1e-4.
        np.testing.assert_allclose(np_(entry.output), out, rtol=1e-4, atol=1e-5, err_msg=layer.name)
        d_out = (
            np_(sub((x64 + eps * u).astype("float32"))).astype("float64")
            - np_(sub((x64 - eps * u).astype("float32"))).astype("float64")
        ) / (2 * eps)
        chain = float(np.sum(np_(entry.output_grad).astype("float64") * d_out))
        np.testing.assert_allclose(
            chain, df, rtol=2e-3, atol=2e-3 * (1 + abs(df)), err_msg=f"output_grad {layer.name}"
        )


@pytest.mark.parametrize("jit", [True, False], ids=["jit_compile=True", "jit_compile=False"])
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_recurrent_second_order_and_forward_mode(family, jit, rng):
    if BACKEND == "tensorflow" and family == "gru" and jit:
        # 20 s of CI's time: in a tf.function, GRU takes the graph path LSTM takes.
        pytest.skip("on TensorFlow, compiled: LSTM only")
    """hvp, weight Hessians and forward-mode Jacobians through LSTM and GRU loops.

    Compiled and eager: inside ``tf.function`` TensorFlow's ForwardAccumulator
    cannot follow the loops of Keras's recurrent layers, so kgrad must not rely on it.
    """
    model = FAMILIES[family]()
    x = rng.normal(size=(3, 5, 3)).astype("float32")
    y = rng.normal(size=(3, 2)).astype("float32")
    previous = kgrad.get_jit_compile()
    kgrad.set_jit_compile(jit)
    try:
        fwd = np_(kgrad.jacobian(model, x, mode="fwd"))
        np.testing.assert_allclose(fwd, np_(kgrad.jacobian(model, x, mode="rev")), atol=1e-5)
        # With a chunk size, forward mode maps `func.jvp` over the columns (on
        # TensorFlow inside a graph: the two-pull fallback of `jvp`).
        chunked = np_(kgrad.jacobian(model, x, mode="fwd", chunk_size=15))
        np.testing.assert_allclose(chunked, fwd, atol=1e-5)
        # hvp against central differences of the loss gradient along the vector.
        variables = model.trainable_variables
        v = {w.path: rng.normal(size=tuple(w.shape)).astype("float32") for w in variables}
        hv = np_(kgrad.hvp(model, x, v, y=y, loss="mse"))
        start = [np_(w.value).copy() for w in variables]

        def loss_grad(sign, eps=1e-2):
            for w, w0 in zip(variables, start):
                w.assign(w0 + sign * eps * v[w.path])
            return np_(kgrad.grad(model, x, wrt="weights", y=y, loss="mse"))

        g_plus, g_minus = loss_grad(1), loss_grad(-1)
        for w, w0 in zip(variables, start):
            w.assign(w0)
        for path in v:
            fd = (g_plus[path].astype("float64") - g_minus[path]) / 2e-2
            scale = np.max(np.abs(fd)) + 1e-3
            np.testing.assert_allclose(hv[path], fd, atol=5e-3 * scale, err_msg=path)
        # The head's dense Hessian block times the vector is the hvp restricted to the head.
        head = model.layers[-1]
        H = np_(kgrad.hessian(model, x, wrt="weights", layers=head.name, y=y, loss="mse"))
        v_head = {k: v[k] for k in H}
        hv_head = np_(kgrad.hvp(model, x, v_head, layers=head.name, y=y, loss="mse"))
        for i in H:
            Hv = sum(np.tensordot(H[i][j], v_head[j], axes=v_head[j].ndim) for j in H)
            np.testing.assert_allclose(Hv, hv_head[i], rtol=1e-4, atol=1e-5, err_msg=i)
    finally:
        kgrad.set_jit_compile(previous)


def test_embedding_gradients_wrt_its_activations(rng):
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            L.Embedding(10, 4, name="emb"),
            L.GlobalAveragePooling1D(),
            L.Dense(2, name="head"),
        ]
    )
    ids = rng.integers(0, 10, size=(3, 5)).astype("int32")
    with pytest.raises(TypeError, match=r"int32.*wrt='activations', layers='emb'"):
        kgrad.grad(model, ids)
    g = np_(kgrad.grad(model, ids, wrt="activations", layers="emb", target=1))
    head = np_(model.get_layer("head").kernel)
    # Average pooling over 5 steps, then unit 1 of the head.
    np.testing.assert_allclose(g, np.broadcast_to(head[:, 1] / 5, (3, 5, 4)), rtol=1e-5, atol=1e-6)
    emb_grad = kgrad.grad(model, ids, wrt="weights", layers="emb", target=1)
    assert tuple(emb_grad[model.layers[0].embeddings.path].shape) == (10, 4)


def test_multi_head_attention_block(rng):
    inp = keras.Input((4, 6))
    att = L.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(inp, inp)
    h = L.LayerNormalization()(L.Add()([inp, att]))
    out = L.Dense(2)(L.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    x = rng.normal(size=(2, 4, 6)).astype("float32")
    check_input_grad(model, x, rng)
    check_per_sample_jacobian(model, x)
    a = np_(kgrad.grad(model, x, wrt="activations", layers="mha"))
    assert a.shape == (2, 4, 6)


def test_sequential_built_without_input(rng):
    model = keras.Sequential([L.Dense(4, activation="tanh", name="a"), L.Dense(1, name="b")])
    x = rng.normal(size=(3, 2)).astype("float32")
    with pytest.raises(ValueError, match="not built"):
        kgrad.grad(model, x)
    model(x)
    check_input_grad(model, x, rng)
    a = np_(kgrad.grad(model, x, wrt="activations", layers="a"))
    np.testing.assert_allclose(
        a, np.broadcast_to(np_(model.layers[1].kernel)[:, 0], (3, 4)), rtol=1e-5, atol=1e-6
    )


def _nested():
    inner = keras.Sequential(
        [keras.Input((3,)), L.Dense(4, activation="tanh", name="d"), L.Dense(3, name="e")],
        name="inner",
    )
    inp = keras.Input((3,))
    out = L.Dense(2, name="head")(inner(inp))
    return keras.Model(inp, out, name="outer"), inner


def test_nested_model_layers_and_activations(rng):
    model, inner = _nested()
    x = rng.normal(size=(3, 3)).astype("float32")
    head = np_(model.get_layer("head").kernel)
    # d sum(out) / d inner-output = head kernel row sums, for every sample.
    a = np_(kgrad.grad(model, x, wrt="activations", layers="inner"))
    np.testing.assert_allclose(a, np.broadcast_to(head.sum(1), (3, 3)), rtol=1e-5, atol=1e-6)
    # A layer inside the nested model, by qualified name, bare name and object.
    for spec in ("inner/e", "e", inner.layers[1]):
        np.testing.assert_allclose(
            np_(kgrad.grad(model, x, wrt="activations", layers=spec)), a, rtol=1e-5, atol=1e-6
        )
    w = kgrad.grad(model, x, wrt="weights", layers="inner")
    assert sorted(w) == sorted(v.path for v in inner.trainable_variables)
    report = kgrad.layer_grad(model, x)
    assert list(report) == [layer.name for layer in model.layers]
    assert sorted(report["inner"].weight_grads) == ["d/bias", "d/kernel", "e/bias", "e/kernel"]
    check_input_grad(model, x, rng)


def test_multi_input_multi_output_model(rng):
    a_in, b_in = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = L.Dense(4, activation="tanh", name="h")(L.Concatenate()([a_in, b_in]))
    y1 = L.Dense(2, name="y1")(h)
    y2 = L.Dense(1, name="y2")(h)
    model = keras.Model({"a": a_in, "b": b_in}, [y1, y2])
    x = {
        "a": rng.normal(size=(3, 3)).astype("float32"),
        "b": rng.normal(size=(3, 2)).astype("float32"),
    }
    g = kgrad.grad(model, x)
    assert set(g) == {"a", "b"} and tuple(g["b"].shape) == (3, 2)
    # Reference: d(sum y1 + sum y2)/dh pulled back by hand.
    Wh, bh = np_(model.get_layer("h").kernel), np_(model.get_layer("h").bias)
    W1, W2 = np_(model.get_layer("y1").kernel), np_(model.get_layer("y2").kernel)
    z = np.concatenate([x["a"], x["b"]], 1) @ Wh + bh
    dz = (W1.sum(1) + W2.sum(1)) * (1 - np.tanh(z) ** 2)
    dx = dz @ Wh.T
    np.testing.assert_allclose(np_(g["a"]), dx[:, :3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np_(g["b"]), dx[:, 3:], rtol=1e-4, atol=1e-5)
    # One output through `of` and a Jacobian per input.
    J = kgrad.jacobian(model, x, of="y2")
    assert tuple(J["a"].shape) == (3, 1, 3) and tuple(J["b"].shape) == (3, 1, 2)
    with pytest.raises(ValueError, match="callable"):
        kgrad.grad(model, x, target=0)
    g1 = kgrad.grad(model, x, target=lambda ys: ys[1])
    dz1 = W2.sum(1) * (1 - np.tanh(z) ** 2)
    np.testing.assert_allclose(np_(g1["a"]), (dz1 @ Wh.T)[:, :3], rtol=1e-4, atol=1e-5)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.d1 = L.Dense(4, activation="tanh", name="d1")
        self.drop = L.Dropout(0.2, name="drop")
        self.d2 = L.Dense(2, name="d2")

    def call(self, x):  # no `training` argument
        return self.d2(self.drop(self.d1(x)))


def test_subclassed_model(rng):
    model = Subclassed()
    x = rng.normal(size=(3, 3)).astype("float32")
    model(x)
    check_input_grad(model, x, rng)
    a = np_(kgrad.grad(model, x, wrt="activations", layers="d1"))
    np.testing.assert_allclose(
        a, np.broadcast_to(np_(model.d2.kernel).sum(1), (3, 4)), rtol=1e-5, atol=1e-6
    )
    assert list(kgrad.layer_grad(model, x)) == ["d1", "drop", "d2"]


def test_plain_callable(rng):
    f = lambda x: keras.ops.sin(x) * x
    x = rng.normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(
        np_(kgrad.grad(f, x)), np.sin(x) + x * np.cos(x), rtol=1e-5, atol=1e-6
    )
    H = np_(kgrad.hessian(f, x, target=1))
    expected = 2 * np.cos(x[:, 1]) - x[:, 1] * np.sin(x[:, 1])
    np.testing.assert_allclose(H[:, 1, 1], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="plain callable"):
        kgrad.grad(f, x, wrt="weights")


def test_keras_application_mobilenet_v3_small(rng):
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=4, include_preprocessing=False
    )
    x = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
    g = np_(kgrad.grad(model, x, target=2))
    assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).sum() > 0
    # Per-sample: each sample's gradient is its own, whatever its place in the batch
    # (the batch reversed; the same shape, so no second compile of this large model).
    np.testing.assert_allclose(
        g[::-1], np_(kgrad.grad(model, x[::-1].copy(), target=2)), rtol=1e-3, atol=1e-6
    )
    # Grad-CAM style: gradient of class 2 with respect to the last conv block's output.
    conv = [layer for layer in model.layers if isinstance(layer, L.Conv2D)][-1]
    a = kgrad.grad(model, x, wrt="activations", layers=conv.name, target=2)
    assert tuple(a.shape) == (2, *conv.output.shape[1:])


def test_second_derivatives_through_layer_normalization(rng):
    """TF's tf.nn.moments stops the gradient through the mean: first derivatives stay
    right, second ones would not. Checked against central differences of the gradient."""
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(5), L.LayerNormalization(), L.Dense(1, activation="tanh")]
    )
    x = rng.normal(size=(3, 4)).astype("float32")
    H = np_(kgrad.hessian(model, x, target=0))
    eps = 2e-3  # float32: truncation and rounding both stay near 1e-4 relative
    for j in range(4):
        e = np.zeros_like(x)
        e[:, j] = eps
        fd = (np_(kgrad.grad(model, x + e)) - np_(kgrad.grad(model, x - e))) / (2 * eps)
        np.testing.assert_allclose(H[:, :, j], fd, rtol=5e-3, atol=1e-3)
    # And for the weights, through kgrad.hvp against differences of weight gradients.
    y = rng.normal(size=(3, 1)).astype("float32")
    kernel = model.layers[0].kernel
    v = rng.normal(size=tuple(kernel.shape)).astype("float32")
    hv = np_(kgrad.hvp(model, x, {kernel.path: v}, y=y, loss="mse")[kernel.path])
    w0 = np_(kernel.value).copy()
    grads = []
    for s in (eps, -eps):
        kernel.assign(w0 + s * v)
        grads.append(np_(kgrad.grad(model, x, wrt="weights", y=y, loss="mse")[kernel.path]))
    kernel.assign(w0)
    np.testing.assert_allclose(hv, (grads[0] - grads[1]) / (2 * eps), rtol=5e-3, atol=1e-3)


def test_conv2d_forward_mode_and_hessians(rng):
    """PyTorch's vmap cannot run Keras's Conv2D forward; every path must still work."""
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            L.Conv2D(2, 3, activation="tanh", name="c"),
            L.Flatten(),
            L.Dense(1, activation="tanh", name="d"),
        ],
        name="convnet",
    )
    x = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    J_rev = np_(kgrad.jacobian(model, x, mode="rev"))
    np.testing.assert_allclose(
        np_(kgrad.jacobian(model, x, mode="fwd")), J_rev, rtol=1e-5, atol=1e-6
    )
    H = np_(kgrad.hessian(model, x, target=0))
    assert H.shape == (2, 4, 4, 2, 4, 4, 2)
    np.testing.assert_allclose(
        H[1], np_(kgrad.hessian(model, x[1:], target=0))[0], rtol=1e-4, atol=1e-6
    )
    # Symmetric, and a column against central differences of the input gradient.
    Hm = H.reshape(2, 32, 32)
    np.testing.assert_allclose(Hm, np.transpose(Hm, (0, 2, 1)), atol=1e-5)
    eps = 2e-3
    e = np.zeros_like(x)
    e[:, 1, 2, 0] = eps
    fd = (np_(kgrad.grad(model, x + e)) - np_(kgrad.grad(model, x - e))) / (2 * eps)
    np.testing.assert_allclose(H[:, :, :, :, 1, 2, 0], fd, rtol=5e-3, atol=1e-3)
    # Weight Hessian of a loss against Hessian-vector products.
    y = rng.normal(size=(2, 1)).astype("float32")
    Hw = kgrad.hessian(model, x, wrt="weights", layers="c", y=y, loss="mse")
    k = "convnet/c/kernel"
    v = rng.normal(size=(3, 3, 2, 2)).astype("float32")
    hv = np_(kgrad.hvp(model, x, {k: v}, layers="c", y=y, loss="mse")[k])
    np.testing.assert_allclose(np.tensordot(np_(Hw[k][k]), v, axes=4), hv, rtol=1e-4, atol=1e-5)
