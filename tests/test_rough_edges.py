"""What a new user trips over: messages for common slips, hvp's target, joinable keys."""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

ops = keras.ops


def _model():
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    return keras.Model(inp, keras.layers.Dense(2, activation="tanh", name="o")(h))


@pytest.mark.parametrize("fname", ["grad", "jacobian", "hessian", "layer_grad"])
def test_x_none_gets_one_kgrad_error(fname):
    with pytest.raises(ValueError, match=r"needs the inputs `x`. Received: x=None"):
        getattr(kgrad, fname)(_model(), None)


def test_a_list_of_lists_suggests_an_array(rng):
    x = rng.normal(size=(4, 3)).astype("float32").tolist()
    with pytest.raises(ValueError, match=r"Python list of numbers.*np.asarray"):
        kgrad.grad(_model(), x)
    with pytest.raises(ValueError, match=r"np.asarray"):
        kgrad.jacobian(_model(), x)


def test_hvp_takes_a_target_like_hessian(rng):
    # Reference: central differences of the gradient of the selected output.
    model = _model()
    x = rng.normal(size=(3, 3)).astype("float32")
    v = {
        p: rng.normal(size=w.shape).astype("float32")
        for p, w in kgrad.func.weights_of(model).items()
    }
    hv = np_(kgrad.hvp(model, x, v, target=1))
    base = [np.array(w) for w in model.get_weights()]
    paths = [w.path for w in model.trainable_variables]
    eps = 1e-2

    def gradient_at(sign):
        model.set_weights([b + sign * eps * v[p] for b, p in zip(base, paths)])
        return np_(kgrad.grad(model, x, wrt="weights", target=1))

    plus, minus = gradient_at(1), gradient_at(-1)
    model.set_weights(base)
    for p in paths:
        fd = (plus[p] - minus[p]) / (2 * eps)
        # float32 gradients differenced with eps=1e-2: about 1e-3 of the largest entry.
        np.testing.assert_allclose(hv[p], fd, atol=2e-3 * max(1.0, np.abs(fd).max()))
    # Without a target, the sum of every output: a different product.
    assert not np.allclose(np_(kgrad.hvp(model, x, v))[paths[0]], hv[paths[0]])


def test_layer_grad_weight_paths_join_grad_keys(rng):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="h"), keras.layers.Dense(1, name="o")],
        name="net",
    )
    x = rng.normal(size=(5, 3)).astype("float32")
    report = kgrad.layer_grad(model, x)
    by_path = np_(kgrad.grad(model, x, wrt="weights"))
    for lg in report.values():
        assert set(lg.weight_paths) == set(lg.weight_grads)
        for short, path in lg.weight_paths.items():
            np.testing.assert_allclose(np_(lg.weight_grads[short]), by_path[path], rtol=1e-6)


def test_hvp_takes_weight_keys_with_or_without_the_sequential_prefix(tmp_path):
    """A reloaded Sequential loses its name prefix; hvp takes either key form.

    Closed form: for ``mse(y, x @ W)`` with one output, ``H = 2 X^T X / n``.
    """
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, use_bias=False, name="out")], name="net"
    )
    path = tmp_path / "net.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], "float32")
    y = np.zeros((3, 1), "float32")
    v = np.array([[1.0], [-2.0]], "float32")
    expected = 2 * x.T @ x @ v / 3
    for m in (model, reloaded):
        for key in ("net/out/kernel", "out/kernel"):
            hv = kgrad.hvp(m, x, {key: v}, y=y, loss="mse")
            assert list(hv) == [key]
            np.testing.assert_allclose(np_(hv[key]), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not valid here"):
        kgrad.hvp(model, x, {"other/kernel": v}, y=y, loss="mse")


def test_a_listed_layer_without_a_float_output_is_an_error():
    """A listed layer that the forward pass never calls is named, not dropped."""

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.h = keras.layers.Dense(4, name="h")
            self.out = keras.layers.Dense(2, name="out")
            self.spare = keras.layers.Dense(2, name="spare")  # tracked, never called

        def call(self, x):
            return self.out(self.h(x))

    model = Net()
    model.spare.build((None, 3))
    x = np.ones((2, 3), "float32")
    model(x)
    with pytest.raises(ValueError, match=r"no float output in this call: \['spare'\]"):
        kgrad.grad(model, x, wrt="activations", layers=["h", "spare"])
    out = kgrad.grad(model, x, wrt="activations", layers=["h", "out"])
    assert list(out) == ["h", "out"]
    # d sum(out) / d h = the row sums of out's kernel, for every sample.
    expected = np.tile(np_(model.out.kernel).sum(axis=1), (2, 1))
    np.testing.assert_allclose(np_(out["h"]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fname", ["grad", "hessian", "hvp", "layer_grad"])
def test_target_with_a_loss_is_an_error_not_ignored(fname):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    x, y = np.ones((2, 3), "float32"), np.zeros((2, 2), "float32")
    vector = {v.path: np.ones(v.shape, "float32") for v in model.trainable_variables}
    calls = {
        "grad": lambda: kgrad.grad(model, x, y=y, loss="mse", target=0),
        "hessian": lambda: kgrad.hessian(model, x, y=y, loss="mse", target=0),
        "hvp": lambda: kgrad.hvp(model, x, vector, y=y, loss="mse", target=0),
        "layer_grad": lambda: kgrad.layer_grad(model, x, y, loss="mse", target=0),
    }
    with pytest.raises(ValueError, match=r"target.*ignored.*Received: target=0"):
        calls[fname]()


@pytest.mark.parametrize("frozen", ["model", "layers"])
def test_an_empty_weight_selection_gives_empty_results_and_zero_norms(frozen, rng):
    # A frozen model, or a weightless layer, selects no weights. As `grad`
    # gives {} there, so do the other weight derivatives; the norm of no
    # gradient is 0 for every sample; the spectrum has nothing to work on.
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="o")(h))
    layers = None
    if frozen == "model":
        model.trainable = False
    else:
        layers = "drop"
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    kw = dict(y=y, loss="mse", layers=layers)
    assert kgrad.grad(model, x, wrt="weights", **kw) == {}
    assert kgrad.per_sample_grad(model, x, **kw) == {}
    assert kgrad.hessian(model, x, wrt="weights", **kw) == {}
    assert kgrad.hvp(model, x, {}, **kw) == {}
    assert kgrad.jacobian(model, x, wrt="weights", layers=layers) == {}
    assert kgrad.jacobian(model, x, wrt="weights", layers=layers, mode="fwd") == {}
    norms = np_(kgrad.per_sample_grad_norm(model, x, **kw))
    np.testing.assert_array_equal(norms, np.zeros(5, "float32"))
    with pytest.raises(ValueError, match="no values to differentiate. Received:"):
        kgrad.hessian_trace(model, x, **kw)


@pytest.mark.parametrize(
    "target",
    [np.int64(1), np.int32(1), np.array(1), (np.int64(1),), "tensor"],
    ids=["np.int64", "np.int32", "0-d array", "tuple of np.int64", "0-d tensor"],
)
def test_an_integer_target_of_numpy_or_the_backend_counts_as_an_int(target, rng):
    # target=np.argmax(...) or labels[i]: the output they pick is output 1.
    if isinstance(target, str):
        target = ops.convert_to_tensor(np.array(1, "int32"))
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2, name="o")(inp))
    x = rng.normal(size=(4, 3)).astype("float32")
    kernel = np_(model.get_layer("o").kernel)
    want = np.tile(kernel[:, 1], (4, 1))  # d (x @ K + b)[:, 1] / dx = K[:, 1]
    np.testing.assert_allclose(np_(kgrad.grad(model, x, target=target)), want, rtol=1e-6)
    np.testing.assert_allclose(np_(kgrad.jacobian(model, x, target=target)), want, rtol=1e-6)
    assert kgrad.check_grad(model, x, target=target).ok


def test_a_float_target_is_refused_with_what_was_received():
    with pytest.raises(TypeError, match=r"Received: target=.*1\.0.* of type"):
        kgrad.grad(_model(), np.ones((2, 3), "float32"), target=np.float32(1.0))
