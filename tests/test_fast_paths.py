"""The per-call shortcuts give what the long way gives.

- ``kgrad._tree`` flattens, maps and packs as ``keras.tree`` does (its own
  walk for arrays in dicts, lists and tuples, ``keras.tree`` for the rest);
- a call with ``training=False`` leaves ``training`` out of the model call only
  where every layer then runs in inference mode anyway: a layer whose own
  default is ``training=True`` (or a user's layer that treats ``None`` as
  something else), and a call made from inside another layer's call in training
  mode, still get ``training=False``;
- outside a user's ``keras.StatelessScope`` kgrad's scope maps only the
  variables whose value it replaces; inside one, every variable reads the
  user's mapping.

Each expected value is a closed form of the weights.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad
from kgrad import _tree

L = keras.layers


def _same_leaves(a, b) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _structures():
    a, b, c = np.zeros(2), np.ones(3), np.full((2, 2), 2.0)
    pair = collections.namedtuple("pair", "left right")
    return [
        a,
        {"b": a, "a": b},
        {"weights": {"z/kernel": a, "a/bias": b}, "inputs": [c, (b, a)]},
        [a, (b, [c])],
        (),
        {},
        [a, None],  # None: keras.tree's own rule
        {"a": None, "b": a},
        pair(a, b),  # a named tuple: keras.tree's own rule
        {2: a, 1: b},  # keys that are not strings
        collections.OrderedDict([("b", a), ("a", b)]),
    ]


def _plus_one(t):
    return None if t is None else t + 1


def _sorted_at_every_level(structure):
    """The leaves of ``structure``, dict values by sorted key at every level."""
    if isinstance(structure, dict):
        return [leaf for k in sorted(structure) for leaf in _sorted_at_every_level(structure[k])]
    if isinstance(structure, (list, tuple)):
        return [leaf for v in structure for leaf in _sorted_at_every_level(v)]
    return [structure]


@pytest.mark.parametrize("index", range(len(_structures())))
def test_tree_functions_agree_with_keras_tree(index):
    structure = _structures()[index]
    flat = keras.tree.flatten(structure)
    nested_dicts = index == 2 and keras.backend.backend() == "torch"
    if nested_dicts:
        # Keras's torch tree sorts only the outermost dict; _tree sorts every level,
        # as keras.tree does on JAX and TensorFlow (see kgrad._tree).
        flat = _sorted_at_every_level(structure)
    assert _same_leaves(_tree.flatten(structure), flat)
    mapped = _tree.map_structure(_plus_one, structure)
    expected = keras.tree.map_structure(_plus_one, structure)
    assert type(mapped) is type(expected)
    assert [np.asarray(t).tolist() for t in keras.tree.flatten(mapped)] == [
        np.asarray(t).tolist() for t in keras.tree.flatten(expected)
    ]
    tokens = [np.full((1,), float(i)) for i in range(len(flat))]
    packed = _tree.pack_sequence_as(structure, tokens)
    assert _same_leaves(_tree.flatten(packed), tokens)  # packing inverts flattening
    if not nested_dicts:
        expected = keras.tree.pack_sequence_as(structure, tokens)
        assert _same_leaves(keras.tree.flatten(packed), keras.tree.flatten(expected))
    if isinstance(structure, dict) and type(structure) is dict:
        assert list(packed) in (list(structure), sorted(structure))


def test_pack_with_a_wrong_number_of_values_raises_keras_trees_error():
    structure = {"a": np.zeros(2), "b": np.ones(2)}
    with pytest.raises(ValueError):
        keras.tree.pack_sequence_as(structure, [1.0])
    with pytest.raises(ValueError):
        _tree.pack_sequence_as(structure, [np.zeros(1)])
    with pytest.raises(ValueError):
        _tree.pack_sequence_as(structure, [np.zeros(1)] * 3)


class _DoublesByDefault(L.Layer):
    """Doubles its input in training mode, and its own default is training."""

    def call(self, x, training=True):
        return x * 2.0 if training else x


class _DoublesOnNone(L.Layer):
    """A user's layer that tells ``training=None`` from ``training=False``."""

    def call(self, x, training=None):
        return x * 2.0 if training is None else x


@pytest.mark.parametrize("layer, factor", [(_DoublesByDefault, 2.0), (_DoublesOnNone, 1.0)])
def test_training_false_reaches_layers_whose_default_is_not_inference(layer, factor):
    model = keras.Sequential([keras.Input((3,)), layer(), L.Dense(1)])
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    kernel = np_(model.layers[-1].kernel)[:, 0]
    # Called with training=False, the first layer passes x through: d/dx is the kernel
    # per sample. With training=True, `factor` times that.
    np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.tile(kernel, (5, 1)), rtol=1e-6)
    np.testing.assert_allclose(
        np_(kgrad.grad(model, x, training=True)), np.tile(factor * kernel, (5, 1)), rtol=1e-6
    )


def test_training_false_reaches_a_lambda_function_that_reads_it():
    # Keras's Lambda passes `training` on to its function, which may read None otherwise.
    double_on_none = L.Lambda(lambda x, training=None: x * 2.0 if training is None else x)
    model = keras.Sequential([keras.Input((3,)), double_on_none, L.Dense(1)])
    x = np.random.default_rng(3).normal(size=(4, 3)).astype("float32")
    kernel = np_(model.layers[-1].kernel)[:, 0]
    np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.tile(kernel, (4, 1)), rtol=1e-6)


def test_training_false_puts_a_wrapped_torch_module_in_eval_mode():
    if keras.backend.backend() != "torch":
        pytest.skip("keras.layers.TorchModuleWrapper runs on the torch backend")
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 1)
    # TorchModuleWrapper trains its module unless `training` is False; Dropout(0.9) in
    # training mode would zero most input gradients.
    wrapped = keras.layers.TorchModuleWrapper(torch.nn.Sequential(torch.nn.Dropout(0.9), linear))
    model = keras.Sequential([keras.Input((3,)), wrapped])
    x = np.random.default_rng(4).normal(size=(6, 3)).astype("float32")
    kernel = linear.weight.detach().numpy()[0]
    np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.tile(kernel, (6, 1)), rtol=1e-6)


class _GradientInside(L.Layer):
    """Returns kgrad's input gradient of another model from inside its own call."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x, training=None):
        return kgrad.grad(self.inner, x)  # training=False: inference inside any call


def test_a_call_from_inside_a_training_layer_call_runs_in_inference_mode():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((4,)), L.Dropout(0.9), L.Dense(1)])
    x = np.random.default_rng(1).normal(size=(6, 4)).astype("float32")
    kernel = np_(inner.layers[-1].kernel)[:, 0]
    outer = _GradientInside(inner)
    # Dropout at rate 0.9 in training mode would zero most entries and scale the rest by 10.
    got = np_(outer(keras.ops.convert_to_tensor(x), training=True))
    np.testing.assert_allclose(got, np.tile(kernel, (6, 1)), rtol=1e-6)


def test_weights_inside_a_users_stateless_scope_read_its_mapping():
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="d")])
    x = np.ones((3, 2), "float32")
    kernel, bias = model.get_layer("d").kernel, model.get_layer("d").bias
    mapped = np.array([[2.0], [-3.0]], "float32")
    with keras.StatelessScope(state_mapping=[(kernel, mapped)]):
        grads = kgrad.grad(model, x, wrt="weights")
        inputs = kgrad.grad(model, x)
    # The objective is sum(x @ kernel + bias): d/dbias = batch size whatever the kernel;
    # d/dx per sample is the mapped kernel, not the variable's own value.
    np.testing.assert_allclose(np_(grads[bias.path]), [3.0])
    np.testing.assert_allclose(np_(grads[kernel.path]), np.full((2, 1), 3.0))
    np.testing.assert_allclose(np_(inputs), np.tile(mapped[:, 0], (3, 1)))
    # And outside the scope, the variable's own value again.
    np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.tile(np_(kernel)[:, 0], (3, 1)))


def test_regularisation_losses_read_the_variables_kgrad_does_not_replace():
    # Keras reads every regularised variable through the scope (its own value here).
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(2, name="d", kernel_regularizer=keras.regularizers.L2(0.1))]
    )
    model.compile(loss="mse")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    kernel = model.get_layer("d").kernel
    with_reg = np_(kgrad.grad(model, x, y=y, wrt="weights")[kernel.path])
    data_only = np_(kgrad.grad(model, x, y=y, loss="mse", wrt="weights")[kernel.path])
    # d/dW of 0.1 * sum(W**2) is 0.2 * W.
    np.testing.assert_allclose(with_reg - data_only, 0.2 * np_(kernel), rtol=1e-5, atol=1e-6)


class _Counter(L.Layer):
    """Multiplies by a count that each call raises by one (a state assigned in ``call``)."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x):
        self.count.assign(self.count + 1.0)
        return x * self.count


def test_an_assignment_inside_the_call_is_read_back_then_discarded():
    model = keras.Sequential([keras.Input((2,)), _Counter(name="c")])
    x = np.ones((3, 2), "float32")
    for _ in range(2):  # the count stays 0 between calls: each call sees 0 + 1
        np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.ones((3, 2)))
    assert float(np_(model.get_layer("c").count)) == 0.0


def test_a_regulariser_inside_a_users_stateless_scope_reads_its_mapping():
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(2, name="d", kernel_regularizer=keras.regularizers.L2(0.1))]
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    kernel = model.get_layer("d").kernel
    mapped = rng.normal(size=(3, 2)).astype("float32")
    model.compile(loss="mse")
    with keras.StatelessScope(state_mapping=[(kernel, mapped)]):
        with_reg = np_(kgrad.grad(model, x, y=y, wrt="weights")[kernel.path])
        data_only = np_(kgrad.grad(model, x, y=y, loss="mse", wrt="weights")[kernel.path])
    # d/dW of 0.1 * sum(W**2), at the mapped kernel, not the variable's own value.
    np.testing.assert_allclose(with_reg - data_only, 0.2 * mapped, rtol=1e-5, atol=1e-6)


def test_a_call_that_passed_its_checks_does_not_let_a_bad_one_through():
    model = keras.Sequential([keras.Input((3,)), L.Dense(1)])
    good = np.ones((4, 3), "float32")
    kgrad.grad(model, good)
    kgrad.grad(model, good, y=np.ones((4, 1), "float32"), loss="mse")
    with pytest.raises(ValueError, match="Received: x with shape"):
        kgrad.grad(model, np.ones((4, 5), "float32"))
    with pytest.raises(TypeError, match="Received: x with dtype int32"):
        kgrad.grad(model, np.ones((4, 3), "int32"))
    with pytest.raises(ValueError, match="same number of samples"):
        kgrad.grad(model, good, y=np.ones((5, 1), "float32"), loss="mse")


class _Typed:
    def __init__(self, dtype):
        self.dtype = dtype


def test_dtype_names_are_keras_names_and_none_follows_floatx():
    from kgrad import _errors

    expected = {np.dtype("float64"): "float64", float: "float32", np.dtype("int64"): "int64"}
    for _ in range(2):  # the second round reads the remembered names
        for dtype, name in expected.items():
            assert _errors.dtype_name(_Typed(dtype)) == name
    before = keras.config.floatx()
    try:
        for floatx in ("float16", "float64"):
            keras.config.set_floatx(floatx)
            assert _errors.dtype_name(_Typed(None)) == floatx
    finally:
        keras.config.set_floatx(before)


def test_weights_given_in_another_dtype_are_converted():
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="d")])
    kernel, bias = model.get_layer("d").kernel, model.get_layer("d").bias
    weights = {kernel.path: np.array([[2.0], [-1.0]]), bias.path: np.array([0.5])}  # float64
    x = np.array([[1.0, 3.0]], "float32")
    out = np_(kgrad.func.functional_call(model, weights, x))
    np.testing.assert_allclose(out, [[2.0 - 3.0 + 0.5]])
    assert str(out.dtype) == "float32"


def test_cached_calls_read_the_variables_as_they_are_at_each_call():
    # On TensorFlow a cached call captures the model's tf.Variables (outside a
    # scope) and takes a scope's values as arguments; either way each call
    # reads the values of that moment. Closed form: d sum(x @ K + b) / dx = K.
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="d")])
    kernel = model.get_layer("d").kernel
    x = np.ones((3, 2), "float32")

    def expect(k):
        np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.tile(k[:, 0], (3, 1)))
        grads = kgrad.grad(model, x, wrt="weights")
        np.testing.assert_allclose(np_(grads[kernel.path]), np.full((2, 1), 3.0))

    for k in ([[1.0], [2.0]], [[-4.0], [0.5]]):  # assigned between calls
        kernel.assign(np.array(k, "float32"))
        expect(np.array(k))
    mapped = np.array([[7.0], [-7.0]], "float32")
    with keras.StatelessScope(state_mapping=[(kernel, mapped)]):
        expect(mapped)
    expect(np.array([[-4.0], [0.5]]))  # the captured path again, after the scope's


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's captures")
def test_tensorflow_captures_again_when_a_variable_is_another_object():
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="d")])
    kernel = model.get_layer("d").kernel
    x = np.ones((3, 2), "float32")
    kgrad.grad(model, x)
    # Keras holds each value in a tf.Variable; one replaced by another object
    # (as re-initialising does) must be read, not the captured old one.
    kernel._value = tf.Variable(np.array([[3.0], [-1.0]], "float32"))
    np.testing.assert_allclose(np_(kgrad.grad(model, x)), np.tile([3.0, -1.0], (3, 1)))
