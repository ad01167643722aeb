"""Every form of ``loss`` that ``model.compile`` accepts, on multi-output models.

References: Keras itself (a copy of the model compiled with the same ``loss``
and ``loss_weights``, differentiated by the backend's own autodiff) and a
hand-written float64 NumPy forward and backward pass.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import central_diff_grad, np_

import kgrad
from kgrad import _loss, func

L = keras.layers
ops = keras.ops

# Keras computes in float32 on every backend here, and so does kgrad: against
# Keras's own loss and gradient the two differ only by float32 rounding of the
# same operations in another order, hence ~1e-5 relative.
KERAS_RTOL, KERAS_ATOL = 1e-5, 1e-6
# Against float64 NumPy the float32 results carry float32 rounding (~1e-6
# relative, amplified a little by the sums); finite differences in float64
# add their own truncation error, hence ~1e-3 for those.
NP_RTOL, NP_ATOL = 1e-4, 1e-6
FD_RTOL, FD_ATOL = 1e-3, 1e-5

N = 5


def _cubic(y_true, y_pred):
    """A custom loss function, per sample."""
    return ops.mean(ops.abs(y_true - y_pred) ** 3, axis=-1)


def _half_mae(y_true, y_pred):
    return 0.5 * ops.mean(ops.abs(y_true - y_pred), axis=-1)


def _half_mse(y_true, y_pred):
    return 0.5 * ops.mean(ops.square(y_true - y_pred), axis=-1)


def _model(outputs="list"):
    """A two-output Dense model: h = tanh(x W1 + b1); o1 = h W2 + b2 (2 units); o2 = h W3 + b3."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((3,), name="x")
    h = L.Dense(4, activation="tanh", name="h")(inp)
    o1 = L.Dense(2, name="o1")(h)
    o2 = L.Dense(1, name="o2")(h)
    if outputs == "dict":
        return keras.Model(inp, {"a": o1, "b": o2}, name="two_dict")
    return keras.Model(inp, [o1, o2], name="two")


def _data(outputs="list"):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, 3)).astype("float32")
    y1 = rng.normal(size=(N, 2)).astype("float32")
    y2 = rng.normal(size=(N, 1)).astype("float32")
    y = {"a": y1, "b": y2} if outputs == "dict" else [y1, y2]
    return x, y


def _flat(grads: dict, model) -> list[np.ndarray]:
    return [np_(grads[v.path]) for v in model.trainable_variables]


def _keras_value_and_grad(model, x, y, loss, loss_weights=None):
    """Keras's compiled loss of a copy of ``model`` and its gradient by native autodiff."""
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    ref.compile(loss=loss, loss_weights=loss_weights)
    value = ref.compute_loss(x, y, ref(x))  # also builds the compiled loss
    variables = ref.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss_value = ref.compute_loss(x, y, ref(x))
        grads = tape.gradient(loss_value, variables)
    elif backend == "torch":
        import torch

        loss_value = ref.compute_loss(x, y, ref(x))
        grads = torch.autograd.grad(loss_value, [v.value for v in variables], allow_unused=True)
    else:
        import jax

        ntv = [v.value for v in ref.non_trainable_variables]
        mv = [v.value for v in ref.metrics_variables]

        def f(tv):
            y_pred, _ = ref.stateless_call(tv, ntv, x)
            return ref.stateless_compute_loss(tv, ntv, mv, x, y, y_pred)[0]

        grads = jax.grad(f)([v.value for v in variables])
    # An output without a loss leaves its weights out of the graph: zero gradient.
    grads = [np.zeros(v.shape) if g is None else np_(g) for v, g in zip(variables, grads)]
    return float(np_(value)), grads


def _helper_value_and_grad(model, x, y, loss, loss_weights=None):
    """``_loss.value`` with ``loss_weights``, differentiated with ``kgrad.func``."""
    f = lambda w: _loss.value(model, loss, y, func.functional_call(model, w, x), loss_weights)
    value, g = func.value_and_grad(f)(func.weights_of(model))
    return float(np_(value)), _flat(g, model)


def _assert_grads(actual, expected, rtol, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# ------------------------------------------------------------ against Keras

CASES = [
    ("one-string-two-outputs", "list", "mse", None),
    ("list", "list", ["mse", "mae"], None),
    ("tuple", "list", ("mse", "mae"), None),
    ("list-with-none", "list", ["mse", None], None),
    ("dict-by-output-name", "list", {"o1": "mse", "o2": "mae"}, None),
    ("dict-with-none", "list", {"o1": None, "o2": "huber"}, None),
    (
        "loss-objects",
        "list",
        [keras.losses.MeanSquaredError(), keras.losses.Huber(delta=0.5)],
        None,
    ),
    (
        "loss-object-sum-reduction",
        "list",
        [keras.losses.MeanAbsoluteError(reduction="sum"), "mse"],
        None,
    ),
    ("one-loss-object", "list", keras.losses.LogCosh(), None),
    ("class-names", "list", ["MeanSquaredError", "log_cosh"], None),
    ("callable", "list", [_cubic, "mse"], None),
    ("one-callable", "list", _cubic, None),
    ("loss-weights-list", "list", ["mse", "mae"], [1.0, 0.5]),
    ("loss-weights-dict", "list", {"o1": "mse", "o2": "mae"}, {"o1": 2.0, "o2": 0.5}),
    ("loss-weights-with-none", "list", [None, "mse"], [3.0, 0.25]),
    ("dict-outputs", "dict", {"a": "mse", "b": "mae"}, None),
    ("dict-outputs-one-string", "dict", "mse", None),
    ("dict-outputs-list", "dict", ["mae", "mse"], None),  # in key order, as Keras orders it
    ("dict-outputs-none", "dict", {"a": None, "b": "mse"}, None),
    ("dict-outputs-loss-weights", "dict", {"a": "mse", "b": "mae"}, {"a": 0.25, "b": 3.0}),
]


@pytest.mark.parametrize(
    "outputs, loss, loss_weights", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_loss_form_matches_keras(outputs, loss, loss_weights):
    model = _model(outputs)
    x, y = _data(outputs)
    k_value, k_grads = _keras_value_and_grad(model, x, y, loss, loss_weights)
    # The helper, with loss_weights, under kgrad.func.
    value, grads = _helper_value_and_grad(model, x, y, loss, loss_weights)
    np.testing.assert_allclose(value, k_value, rtol=KERAS_RTOL, atol=KERAS_ATOL)
    _assert_grads(grads, k_grads, KERAS_RTOL, KERAS_ATOL)
    if loss_weights is not None:
        return  # the public functions take no loss_weights
    g = kgrad.grad(model, x, wrt="weights", y=y, loss=loss)
    _assert_grads(_flat(g, model), k_grads, KERAS_RTOL, KERAS_ATOL)
    value, g = kgrad.value_and_grad(model, x, wrt="weights", y=y, loss=loss)
    np.testing.assert_allclose(float(np_(value)), k_value, rtol=KERAS_RTOL, atol=KERAS_ATOL)
    _assert_grads(_flat(g, model), k_grads, KERAS_RTOL, KERAS_ATOL)


def test_explicit_loss_matches_the_compiled_loss():
    model = _model()
    x, y = _data()
    loss = {"o1": "mse", "o2": keras.losses.Huber(delta=0.3)}
    explicit = kgrad.grad(model, x, wrt="weights", y=y, loss=loss)
    model.compile(loss=loss)
    compiled = kgrad.grad(model, x, wrt="weights", y=y)  # loss=None: the compiled loss
    _assert_grads(_flat(explicit, model), _flat(compiled, model), KERAS_RTOL, KERAS_ATOL)


def test_eager_and_compiled_calls_agree():
    model = _model()
    x, y = _data()
    loss = ["mse", _cubic]
    compiled = [kgrad.grad(model, x, wrt="weights", y=y, loss=loss) for _ in range(2)]
    kgrad.set_jit_compile(False)
    try:
        eager = kgrad.grad(model, x, wrt="weights", y=y, loss=loss)
    finally:
        kgrad.set_jit_compile(True)
    for g in compiled:
        _assert_grads(_flat(g, model), _flat(eager, model), KERAS_RTOL, KERAS_ATOL)


@pytest.mark.parametrize(
    "loss, y_of",
    [
        ({"o1": "mse", "o2": "mae"}, lambda y1, y2: {"o2": y2, "o1": y1}),  # y keyed by name
        (["mse", None], lambda y1, y2: [y1]),  # one target per output with a loss
        (["mse", None], lambda y1, y2: y1),
        ({"o2": "mae"}, lambda y1, y2: {"o2": y2}),
    ],
    ids=["y-dict", "y-list-of-losses-only", "y-one-array-one-loss", "y-dict-one-loss"],
)
def test_targets_structured_as_keras_accepts(loss, y_of):
    model = _model()
    x, (y1, y2) = _data()
    expected = kgrad.grad(model, x, wrt="weights", y=[y1, y2], loss=loss)
    got = kgrad.grad(model, x, wrt="weights", y=y_of(y1, y2), loss=loss)
    _assert_grads(_flat(got, model), _flat(expected, model), KERAS_RTOL, KERAS_ATOL)


def test_crossentropy_shortcut_matches_keras():
    keras.utils.set_random_seed(3)
    inp = keras.Input((3,))
    h = L.Dense(4, activation="tanh")(inp)
    model = keras.Model(
        inp,
        [L.Dense(3, activation="softmax", name="c")(h), L.Dense(1, activation="sigmoid")(h)],
    )
    x, _ = _data()
    y = [np.array([0, 2, 1, 1, 0]), np.array([[0.0], [1.0], [1.0], [0.0], [1.0]], "float32")]
    k_value, k_grads = _keras_value_and_grad(model, x, y, "crossentropy")
    value, g = kgrad.value_and_grad(model, x, wrt="weights", y=y, loss="crossentropy")
    np.testing.assert_allclose(float(np_(value)), k_value, rtol=KERAS_RTOL, atol=KERAS_ATOL)
    _assert_grads(_flat(g, model), k_grads, KERAS_RTOL, KERAS_ATOL)


class _TwoHeads(keras.Model):
    def __init__(self):
        super().__init__(name="heads")
        self.h = L.Dense(4, activation="tanh")
        self.o1 = L.Dense(2)
        self.o2 = L.Dense(1)

    def call(self, x):
        h = self.h(x)
        return [self.o1(h), self.o2(h)]


def test_subclassed_model_with_a_list_loss():
    model = _TwoHeads()
    x, (y1, y2) = _data()
    model(x)
    value, _ = kgrad.value_and_grad(model, x, wrt="weights", y=[y1, y2], loss=["mse", "mae"])
    o1, o2 = model(x)
    expected = keras.losses.MeanSquaredError()(y1, o1) + keras.losses.MeanAbsoluteError()(y2, o2)
    np.testing.assert_allclose(np_(value), np_(expected), rtol=KERAS_RTOL, atol=KERAS_ATOL)
    with pytest.raises(ValueError, match=r"no names.*Received: loss="):
        kgrad.grad(model, x, wrt="weights", y=[y1, y2], loss={"o1": "mse"})


def test_plain_callable_takes_one_loss():
    x, (y1, _) = _data()
    x = x[:, :2]
    f = lambda t: ops.tanh(t)
    value, g = kgrad.value_and_grad(f, x, y=y1, loss="mse")
    t = np.tanh(x.astype("float64"))
    np.testing.assert_allclose(np_(value), np.mean((t - y1) ** 2), rtol=NP_RTOL, atol=NP_ATOL)
    expected = 2 * (t - y1) * (1 - t**2) / t.size
    np.testing.assert_allclose(np_(g), expected, rtol=NP_RTOL, atol=NP_ATOL)
    with pytest.raises(ValueError, match=r"plain callable.*Received: loss=\['mse'\]"):
        kgrad.grad(f, x, y=y1, loss=["mse"])
    with pytest.raises(ValueError, match=r"plain callable.*Received: loss=\['mse'\]"):
        _loss.check(f, ["mse"], y1)


# ------------------------------------------------------------ against NumPy


def _params(model) -> list[np.ndarray]:
    return [np_(v.value).astype("float64") for v in model.trainable_variables]


def _np_forward(p, x):
    w1, b1, w2, b2, w3, b3 = p
    h = np.tanh(x @ w1 + b1)
    return h, h @ w2 + b2, h @ w3 + b3


def _np_loss(p, x, y1, y2, half_mse=False):
    """mse on output 1 + 0.5 * mae on output 2 (or 0.5 * mse: a smooth loss for Hessians)."""
    _, o1, o2 = _np_forward(p, x)
    second = np.mean((o2 - y2) ** 2) if half_mse else np.mean(np.abs(o2 - y2))
    return np.mean((o1 - y1) ** 2) + 0.5 * second


def _np_grad(p, x, y1, y2, half_mse=False):
    """The gradient of ``_np_loss`` by backpropagation, in float64."""
    w1, b1, w2, b2, w3, b3 = p
    h, o1, o2 = _np_forward(p, x)
    d1 = 2 * (o1 - y1) / o1.size
    d2 = (o2 - y2) / o2.size if half_mse else 0.5 * np.sign(o2 - y2) / o2.size
    dz = (d1 @ w2.T + d2 @ w3.T) * (1 - h**2)
    return [x.T @ dz, dz.sum(0), h.T @ d1, d1.sum(0), h.T @ d2, d2.sum(0)]


def _unflatten(vec, like):
    out, i = [], 0
    for a in like:
        out.append(vec[i : i + a.size].reshape(a.shape))
        i += a.size
    return out


def _np_fd_grad(p, x, y1, y2, half_mse=False):
    flat = np.concatenate([a.ravel() for a in p])
    g = central_diff_grad(lambda v: _np_loss(_unflatten(v, p), x, y1, y2, half_mse), flat, 1e-6)
    return _unflatten(g, p)


def test_numpy_value_and_gradient():
    model = _model()
    x, (y1, y2) = _data()
    p, x64 = _params(model), x.astype("float64")
    expected_value = _np_loss(p, x64, y1, y2)
    expected = _np_grad(p, x64, y1, y2)
    # The NumPy backpropagation itself, against float64 central differences.
    _assert_grads(expected, _np_fd_grad(p, x64, y1, y2), 1e-6, 1e-8)
    value, g = kgrad.value_and_grad(model, x, wrt="weights", y=[y1, y2], loss=["mse", _half_mae])
    np.testing.assert_allclose(float(np_(value)), expected_value, rtol=NP_RTOL, atol=NP_ATOL)
    _assert_grads(_flat(g, model), expected, NP_RTOL, NP_ATOL)
    # The same objective written with loss_weights.
    value, grads = _helper_value_and_grad(model, x, [y1, y2], ["mse", "mae"], [1.0, 0.5])
    np.testing.assert_allclose(value, expected_value, rtol=NP_RTOL, atol=NP_ATOL)
    _assert_grads(grads, expected, NP_RTOL, NP_ATOL)
    value, grads = _helper_value_and_grad(
        model, x, {"o2": y2, "o1": y1}, {"o1": "mse", "o2": "mae"}, {"o2": 0.5}
    )
    np.testing.assert_allclose(value, expected_value, rtol=NP_RTOL, atol=NP_ATOL)
    _assert_grads(grads, expected, NP_RTOL, NP_ATOL)


def _np_hessian(p, x, y1, y2, eps=1e-5):
    """Central differences of the float64 backpropagated gradient (smooth loss)."""
    flat = np.concatenate([a.ravel() for a in p])
    grad = lambda v: np.concatenate(
        [a.ravel() for a in _np_grad(_unflatten(v, p), x, y1, y2, half_mse=True)]
    )
    cols = []
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = eps
        cols.append((grad(flat + e) - grad(flat - e)) / (2 * eps))
    return np.stack(cols, axis=1)


def test_hessian_and_hvp_with_a_list_loss():
    model = _model()
    x, (y1, y2) = _data()
    p, x64 = _params(model), x.astype("float64")
    loss = ["mse", _half_mse]
    expected = _np_hessian(p, x64, y1, y2)
    H = kgrad.hessian(model, x, wrt="weights", y=[y1, y2], loss=loss)
    paths = [v.path for v in model.trainable_variables]
    sizes = [a.size for a in p]
    full = np.block(
        [
            [np_(H[ki][kj]).reshape(si, sj) for kj, sj in zip(paths, sizes)]
            for ki, si in zip(paths, sizes)
        ]
    )
    np.testing.assert_allclose(full, expected, rtol=FD_RTOL, atol=FD_ATOL)
    # hvp against central differences of the float64 gradient along the vector.
    rng = np.random.default_rng(1)
    vector = {path: rng.normal(size=a.shape).astype("float32") for path, a in zip(paths, p)}
    v64 = [vector[path].astype("float64") for path in paths]
    eps = 1e-5
    plus = _np_grad([a + eps * v for a, v in zip(p, v64)], x64, y1, y2, half_mse=True)
    minus = _np_grad([a - eps * v for a, v in zip(p, v64)], x64, y1, y2, half_mse=True)
    fd = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
    hv = kgrad.hvp(model, x, vector, y=[y1, y2], loss=loss)
    _assert_grads(_flat(hv, model), fd, FD_RTOL, FD_ATOL)


# ------------------------------------------------------------ errors

ERRORS = [
    ("list-too-short", ["mse"], "y", ValueError, r"list of 1 entries.*2 output.*Received: loss="),
    (
        "unknown-output-name",
        {"o1": "mse", "out2": "mae"},
        "y",
        ValueError,
        r"not outputs.*\['out2'\].*Received: loss=.*Did you mean 'o2'\?",
    ),
    ("one-array-for-two-outputs", ["mse", "mse"], "y1", ValueError, r"Received: y as one array"),
    ("one-loss-one-array", "mse", "y1", ValueError, r"does not match.*Received: y as one array"),
    ("y-dict-unknown-key", ["mse", "mae"], "y-bad-dict", ValueError, r"Received: y as a dict"),
    ("unknown-loss-name", "msee", "y", ValueError, r"Unknown loss 'msee'.*Received: loss='msee'"),
    ("not-a-loss", [3, "mse"], "y", TypeError, r"output 'o1'.*Received: loss=\[3, 'mse'\]"),
    ("no-loss-at-all", [None, None], "y", ValueError, r"nothing to compute.*Received: loss="),
]


@pytest.mark.parametrize(
    "loss, y_kind, error, pattern", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_structure_errors(loss, y_kind, error, pattern):
    model = _model()
    x, (y1, y2) = _data()
    y = {"y": [y1, y2], "y1": y1, "y-bad-dict": {"o1": y1, "out2": y2}}[y_kind]
    with pytest.raises(error, match=pattern):
        _loss.check(model, loss, y)  # eagerly, before anything runs
    with pytest.raises(error, match=pattern):
        kgrad.grad(model, x, wrt="weights", y=y, loss=loss)


@pytest.mark.parametrize(
    "loss_weights, error, pattern",
    [
        ([1.0], ValueError, r"`loss_weights` is a list of 1.*Received: loss_weights=\[1.0\]"),
        ({"o3": 1.0}, ValueError, r"Received: loss_weights=\{'o3': 1.0\}.*Did you mean"),
        ("heavy", TypeError, r"Received: loss_weights='heavy'"),
    ],
)
def test_loss_weights_errors(loss_weights, error, pattern):
    model = _model()
    _, y = _data()
    with pytest.raises(error, match=pattern):
        _loss.check(model, ["mse", "mae"], y, loss_weights)


def test_shape_mismatch_names_the_output():
    model = _model()
    x, (_, y2) = _data()
    with pytest.raises(
        ValueError,
        match=r"output 'o1'.*of shape \(5, 2\).*Received: y for output 'o1' with shape \(5, 3\)",
    ):
        kgrad.grad(model, x, wrt="weights", y=[np.zeros((N, 3), "float32"), y2], loss="mse")
