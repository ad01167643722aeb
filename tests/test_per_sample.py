"""Per-sample loss gradients against a batch-size-1 loop and hand-derived NumPy backprop."""

import warnings

import keras
import numpy as np
import pytest
import reference
from helpers import np_

import kgrad

L = keras.layers
BACKEND = keras.backend.backend()


def _loop(model, x, y, **kwargs):
    """kgrad.grad on each sample alone: the reference the per-sample result must equal."""
    sample_weight = kwargs.pop("sample_weight", None)
    leaves = keras.tree.flatten(x)
    n = len(leaves[0])
    out = []
    for b in range(n):
        xb = keras.tree.map_structure(lambda t, b=b: t[b : b + 1], x)
        yb = keras.tree.map_structure(lambda t, b=b: t[b : b + 1], y)
        g = np_(kgrad.grad(model, xb, wrt="weights", y=yb, **kwargs))
        if sample_weight is not None:
            g = {k: v * sample_weight[b] for k, v in g.items()}
        out.append(g)
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


def _close(got, want, rtol=1e-4, atol=1e-6):
    got = np_(got)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


MODELS = {
    "dense_layernorm": lambda: keras.Sequential(
        [keras.Input((5,)), L.Dense(6, activation="tanh"), L.LayerNormalization(), L.Dense(3)]
    ),
    "conv1d": lambda: keras.Sequential(
        [keras.Input((7, 2)), L.Conv1D(3, 3, activation="relu"), L.Flatten(), L.Dense(3)]
    ),
    "conv2d": lambda: keras.Sequential(
        [keras.Input((6, 6, 1)), L.Conv2D(2, 3, activation="tanh"), L.Flatten(), L.Dense(3)]
    ),
    "embedding": lambda: keras.Sequential(
        [keras.Input((4,), dtype="int32"), L.Embedding(9, 3), L.Flatten(), L.Dense(3)]
    ),
    "lstm": lambda: keras.Sequential([keras.Input((4, 2)), L.LSTM(3), L.Dense(3)]),
}


def _inputs(name, rng, batch):
    if name == "embedding":
        x = rng.integers(0, 9, size=(batch, 4)).astype("int32")
        x[0, :2] = x[0, 2:]  # a repeated index within one sample
        return x
    shape = MODELS[name]().inputs[0].shape[1:]
    return rng.normal(size=(batch, *shape)).astype("float32")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_family_matches_a_batch_of_one_loop(name, rng):
    model = MODELS[name]()
    x = _inputs(name, rng, 5)
    y = rng.integers(0, 3, size=(5,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend that loops over samples says so
        got = kgrad.per_sample_grad(model, x, y, loss=loss)
    _close(got, _loop(model, x, y, loss=loss))
    # The mean of the per-sample gradients is the batch gradient (mean reduction).
    batch = np_(kgrad.grad(model, x, wrt="weights", y=y, loss=loss))
    for k, v in np_(got).items():
        np.testing.assert_allclose(v.mean(0), batch[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_the_reference_mlp_matches_hand_derived_backprop(rng):
    model = reference.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    got = np_(kgrad.per_sample_grad(model, x, y, loss="mse"))
    p = reference.params(model)
    for b in range(4):
        xb = x[b : b + 1].astype("float64")
        *_, out = reference.forward(p, xb)
        g = reference.backward(p, xb, 2 * (out - y[b : b + 1]) / out.size)
        for layer in ("h1", "h2", "out"):
            for part in ("kernel", "bias"):
                np.testing.assert_allclose(
                    got[f"mlp/{layer}/{part}"][b], g[f"{layer}/{part}"], rtol=1e-4, atol=1e-6
                )


def test_multi_output_models_take_every_compile_loss_form(rng):
    inputs = keras.Input((4,))
    h = L.Dense(5, activation="tanh", name="h")(inputs)
    model = keras.Model(inputs, {"a": L.Dense(2, name="a")(h), "b": L.Dense(1, name="b")(h)})
    x = rng.normal(size=(4, 4)).astype("float32")
    y = {"a": rng.normal(size=(4, 2)).astype("float32"), "b": rng.normal(size=(4, 1))}
    y["b"] = y["b"].astype("float32")
    for loss in ("mse", {"a": "mse", "b": "mae"}, {"a": "mse"}):
        _close(kgrad.per_sample_grad(model, x, y, loss=loss), _loop(model, x, y, loss=loss))


def test_the_compiled_loss_with_regularisation_and_sample_weights(rng):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1)),
            L.Dense(2),
        ]
    )
    model.compile(loss="mse", optimizer="sgd")
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    _close(kgrad.per_sample_grad(model, x, y), _loop(model, x, y))
    w = rng.uniform(0.5, 2.0, size=5).astype("float32")
    got = np_(kgrad.per_sample_grad(model, x, y, loss="mse", sample_weight=w))
    # Keras weighs each sample's loss: sample b's gradient is w_b times its own.
    _close(got, _loop(model, x, y, loss="mse", sample_weight=w))
    # With the compiled loss the regulariser is not weighted: each sample's gradient
    # is w_b times its data term's plus the regulariser's.
    plain = np_(kgrad.per_sample_grad(model, x, y))
    data = np_(kgrad.per_sample_grad(model, x, y, loss="mse"))
    weighted = np_(kgrad.per_sample_grad(model, x, y, sample_weight=w))
    for k in plain:
        reg = plain[k] - data[k]
        np.testing.assert_allclose(
            weighted[k],
            w.reshape(-1, *[1] * (data[k].ndim - 1)) * data[k] + reg,
            rtol=1e-4,
            atol=1e-6,
            err_msg=k,
        )


def test_inputs_chunks_layers_and_streams(rng):
    model = reference.mlp()
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    whole = np_(kgrad.per_sample_grad(model, x, y, loss="mse"))
    _close(kgrad.per_sample_grad(model, x, y, loss="mse", chunk_size=4), whole)
    only = np_(kgrad.per_sample_grad(model, x, y, loss="mse", layers="out"))
    assert sorted(only) == ["mlp/out/bias", "mlp/out/kernel"]
    _close(only, {k: whole[k] for k in only})
    streamed = kgrad.per_sample_grad(
        model, ((x[i : i + 3], y[i : i + 3]) for i in (0, 3)), loss="mse"
    )
    _close(streamed, whole)
    # wrt="inputs": each sample's loss gradient, the loop's input gradient.
    gx = np_(kgrad.per_sample_grad(model, x, y, loss="mse", wrt="inputs"))
    want = np.concatenate(
        [np_(kgrad.grad(model, x[b : b + 1], y=y[b : b + 1], loss="mse")) for b in range(6)]
    )
    np.testing.assert_allclose(gx, want, rtol=1e-4, atol=1e-6)


def test_samples_that_interact_are_refused(rng):
    model = keras.Sequential([keras.Input((3,)), L.Dense(4), L.BatchNormalization(), L.Dense(1)])
    x = rng.normal(size=(4, 3)).astype("float32")
    y = np.zeros((4, 1), "float32")
    with pytest.raises(ValueError, match="samples"):
        kgrad.per_sample_grad(model, x, y, loss="mse", training=True)
    # In inference BatchNormalization uses its moving statistics: samples are independent.
    _close(kgrad.per_sample_grad(model, x, y, loss="mse"), _loop(model, x, y, loss="mse"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(wrt="activations"), "Received: wrt='activations'"),
        (dict(chunk_size=0), "Received: chunk_size=0"),
        (dict(sample_weight=np.ones((3,))), r"Received: sample_weight with shape \(3,\)"),
        (dict(y=None), "Received: y=None"),
    ],
)
def test_bad_arguments_are_refused(rng, kwargs, match):
    model = reference.mlp()
    x = rng.normal(size=(4, 3)).astype("float32")
    call = dict(y=np.zeros((4, 2), "float32"), loss="mse")
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kgrad.per_sample_grad(model, x, **call)


@pytest.mark.parametrize("name", ["dense_layernorm", "conv2d", "embedding", "lstm"])
def test_norms_are_the_norms_of_the_loop_gradients(name, rng):
    model = MODELS[name]()
    x = _inputs(name, rng, 5)
    y = rng.integers(0, 3, size=(5,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    loop = _loop(model, x, y, loss=loss)
    want = np.sqrt(sum(np.sum(g.reshape(5, -1).astype("float64") ** 2, 1) for g in loop.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend that loops over samples says so
        got = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss))
        chunked = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss, chunk_size=2))
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked, want, rtol=1e-5, atol=1e-7)
    last = model.layers[-1].name
    only = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss, layers=last))
    want_last = np.sqrt(
        sum(np.sum(g.reshape(5, -1) ** 2, 1) for k, g in loop.items() if f"/{last}/" in k)
    )
    np.testing.assert_allclose(only, want_last, rtol=1e-5, atol=1e-7)


def test_the_default_chunk_follows_the_memory_budget(rng):
    # A budget that holds about two samples' gradients: the norms come in pieces,
    # exactly; a budget below one sample's gradient is refused.
    # The compiled loss: no ghost norms, every weight by per-sample gradients.
    model = reference.mlp()
    model.compile(loss="mse", optimizer="sgd")
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    want = np_(kgrad.per_sample_grad_norm(model, x, y))
    n = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    previous = kgrad.get_memory_budget()
    try:
        kgrad.set_memory_budget(4 * 4 * n * 2 + 64)
        np.testing.assert_allclose(np_(kgrad.per_sample_grad_norm(model, x, y)), want, rtol=1e-6)
        kgrad.set_memory_budget(4 * n // 2)
        with pytest.raises(ValueError, match="memory budget"):
            kgrad.per_sample_grad_norm(model, x, y)
    finally:
        kgrad.set_memory_budget(previous)


def _materialised(model, x, y, **kwargs):
    g = np_(kgrad.per_sample_grad(model, x, y, **kwargs))
    n = len(x)
    return np.sqrt(sum(np.sum(v.reshape(n, -1).astype("float64") ** 2, 1) for v in g.values()))


def _spy(monkeypatch):
    from kgrad import _ghost, _per_sample

    seen = {"ghost": [], "exact": []}
    ghost, exact = _ghost.squared_norms, _per_sample._exact_squared_norms

    def ghost_spy(req, weights, layers, sample_weight):
        seen["ghost"].append(sorted(layers))
        return ghost(req, weights, layers, sample_weight)

    def exact_spy(req, weights, sample_weight, options, only):
        seen["exact"].append(sorted(only))
        return exact(req, weights, sample_weight, options, only)

    monkeypatch.setattr(_ghost, "squared_norms", ghost_spy)
    monkeypatch.setattr(_per_sample, "_exact_squared_norms", exact_spy)
    kgrad.clear_cache()  # the spies act when a call is traced
    return seen


def test_ghost_norms_of_dense_layers_match_materialised_norms(rng, monkeypatch):
    seen = _spy(monkeypatch)
    model = reference.mlp()
    x = rng.normal(size=(6, 3)).astype("float32")
    y = rng.normal(size=(6, 2)).astype("float32")
    got = np_(kgrad.per_sample_grad_norm(model, x, y, loss="mse"))
    # (A backend may trace a call more than once.)
    assert {tuple(g) for g in seen["ghost"]} == {("h1", "h2", "out")} and not seen["exact"]
    np.testing.assert_allclose(got, _materialised(model, x, y, loss="mse"), rtol=1e-5)
    w = rng.uniform(0.5, 2.0, size=6).astype("float32")
    np.testing.assert_allclose(
        np_(kgrad.per_sample_grad_norm(model, x, y, loss="mse", sample_weight=w)),
        _materialised(model, x, y, loss="mse", sample_weight=w),
        rtol=1e-5,
    )


def test_ghost_norms_on_sequences_softmax_and_mixed_layers(rng, monkeypatch):
    seen = _spy(monkeypatch)
    inputs = keras.Input((4, 3))
    h = L.Dense(5, activation="softmax", name="seq")(inputs)  # four positions: Gram form
    h = L.Conv1D(2, 2, activation="tanh", name="conv")(h)
    h = L.LayerNormalization(name="norm")(h)  # no ghost norm: exact per-sample gradients
    outputs = L.Dense(3, use_bias=False, name="head")(L.Flatten()(h))
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(5, 4, 3)).astype("float32")
    y = rng.integers(0, 3, size=(5,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    got = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss))
    assert {tuple(g) for g in seen["ghost"]} == {("conv", "head", "seq")}
    norm = tuple(sorted(v.path for v in model.get_layer("norm").trainable_variables))
    assert {tuple(e) for e in seen["exact"]} == {norm}
    np.testing.assert_allclose(got, _materialised(model, x, y, loss=loss), rtol=1e-5)


@pytest.mark.parametrize(
    "conv, data_format",
    [
        (dict(filters=3, kernel_size=3, strides=2, padding="same"), "channels_last"),
        (dict(filters=4, kernel_size=(2, 3), dilation_rate=2, activation="relu"), "channels_first"),
        (dict(filters=2, kernel_size=3, use_bias=False, activation="tanh"), "channels_last"),
    ],
    ids=["strided-same", "dilated-relu-channels_first", "no-bias"],
)
def test_ghost_norms_of_convolutions(rng, monkeypatch, conv, data_format):
    if data_format == "channels_first" and BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions are channels_last only")
    seen = _spy(monkeypatch)
    shape = (7, 7, 2) if data_format == "channels_last" else (2, 7, 7)
    model = keras.Sequential(
        [
            keras.Input(shape),
            L.Conv2D(**conv, data_format=data_format, name="c"),
            L.Flatten(),
            L.Dense(3, name="o"),
        ]
    )
    x = rng.normal(size=(4, *shape)).astype("float32")
    y = rng.integers(0, 3, size=(4,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    got = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss))
    assert {tuple(g) for g in seen["ghost"]} == {("c", "o")} and not seen["exact"]
    np.testing.assert_allclose(got, _materialised(model, x, y, loss=loss), rtol=1e-5)
    # The convolution's share alone: its per-sample kernel and bias gradients.
    only = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss, layers="c"))
    g = np_(kgrad.per_sample_grad(model, x, y, loss=loss, layers="c"))
    want = np.sqrt(sum(np.sum(v.reshape(4, -1).astype("float64") ** 2, 1) for v in g.values()))
    np.testing.assert_allclose(only, want, rtol=1e-5)


def test_a_compiled_loss_and_multi_output_models(rng, monkeypatch):
    seen = _spy(monkeypatch)
    inputs = keras.Input((4,))
    h = L.Dense(5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1))(inputs)
    model = keras.Model(inputs, {"a": L.Dense(2, name="a")(h), "b": L.Dense(1, name="b")(h)})
    model.compile(loss={"a": "mse", "b": "mae"}, optimizer="sgd")
    x = rng.normal(size=(4, 4)).astype("float32")
    y = {"a": rng.normal(size=(4, 2)), "b": rng.normal(size=(4, 1))}
    y = {k: v.astype("float32") for k, v in y.items()}
    # The compiled loss adds the regulariser, whose gradient bypasses the layers'
    # outputs: exact per-sample gradients, no ghost norms.
    np.testing.assert_allclose(
        np_(kgrad.per_sample_grad_norm(model, x, y)), _materialised(model, x, y), rtol=1e-5
    )
    assert not seen["ghost"] and seen["exact"]
    loss = {"a": "mse", "b": "mae"}
    np.testing.assert_allclose(
        np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss)),
        _materialised(model, x, y, loss=loss),
        rtol=1e-5,
    )
    assert seen["ghost"] and all(len(g) == 3 for g in seen["ghost"])


def test_a_shared_layer_gets_exact_norms_and_the_others_ghost_norms(rng, monkeypatch):
    seen = _spy(monkeypatch)
    inputs = keras.Input((4,))
    shared = L.Dense(4, activation="tanh", name="shared")
    model = keras.Model(inputs, L.Dense(2, name="head")(shared(shared(inputs))))
    x = rng.normal(size=(3, 4)).astype("float32")
    y = rng.normal(size=(3, 2)).astype("float32")
    got = np_(kgrad.per_sample_grad_norm(model, x, y, loss="mse"))
    # Each sample alone: its loss is the mean over its own outputs.
    want = []
    for i in range(3):
        g = kgrad.grad(model, x[i : i + 1], y=y[i : i + 1], loss="mse", wrt="weights")
        want.append(np.sqrt(sum(np.sum(np_(v).astype("float64") ** 2) for v in g.values())))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert seen["ghost"] == [["head", "shared"]]
    assert seen["exact"] == [sorted(v.path for v in shared.trainable_variables)]


def test_ghost_norms_of_einsum_dense_embedding_and_attention(rng, monkeypatch):
    seen = _spy(monkeypatch)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    y = rng.integers(0, 3, size=(5,))
    # Positions, several kernel axes on each side, a left "...", and an input axis
    # that the einsum sums over.
    inputs = keras.Input((4, 3))
    h = L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de", activation="tanh", name="e1")(
        inputs
    )
    h = L.EinsumDense("...b,bc->...c", 5, bias_axes="c", name="e2")(L.Reshape((4, 6))(h))
    outputs = L.EinsumDense("abc,cd->ad", (3,), bias_axes="d", name="e3")(h)
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(5, 4, 3)).astype("float32")
    got = np_(kgrad.per_sample_grad_norm(model, x, y, loss=loss))
    assert {tuple(g) for g in seen["ghost"]} == {("e1", "e2", "e3")} and not seen["exact"]
    np.testing.assert_allclose(got, _materialised(model, x, y, loss=loss), rtol=1e-5)
    # An elementwise kernel axis ("c" in the input and the output): exact gradients.
    seen["ghost"].clear()
    scale = keras.Sequential([keras.Input((3,)), L.EinsumDense("ac,c->ac", 3, name="scale")])
    x3 = rng.normal(size=(5, 3)).astype("float32")
    got = np_(kgrad.per_sample_grad_norm(scale, x3, y, loss=loss))
    assert not seen["ghost"] and seen["exact"]
    np.testing.assert_allclose(got, _materialised(scale, x3, y, loss=loss), rtol=1e-5)
    # Embedding lookups of a 2-d grid of indices, one index repeated in every sample.
    seen["ghost"].clear()
    ids = keras.Input((3, 4), dtype="int32")
    emb = L.Embedding(6, 3, name="emb")(ids)
    model = keras.Model(ids, L.Dense(3, name="o")(L.Flatten()(emb)))
    x2 = rng.integers(0, 6, size=(5, 3, 4)).astype("int32")
    x2[:, 0, :] = 2
    got = np_(kgrad.per_sample_grad_norm(model, x2, y, loss=loss))
    assert {tuple(g) for g in seen["ghost"]} == {("emb", "o")}
    np.testing.assert_allclose(got, _materialised(model, x2, y, loss=loss), rtol=1e-5)
    # Self-attention: its projections are EinsumDense layers inside a layer, which
    # kgrad does not address (only a model's layers): exact gradients for them.
    seen["ghost"].clear()
    seen["exact"].clear()
    tokens = keras.Input((4,), dtype="int32")
    h = L.Embedding(7, 4, name="tok")(tokens)
    h = L.MultiHeadAttention(2, 3, name="mha")(h, h)
    model = keras.Model(tokens, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(h)))
    x4 = rng.integers(0, 7, size=(5, 4)).astype("int32")
    got = np_(kgrad.per_sample_grad_norm(model, x4, y, loss=loss))
    np.testing.assert_allclose(got, _materialised(model, x4, y, loss=loss), rtol=1e-5)
    assert {tuple(g) for g in seen["ghost"]} == {("head", "tok")}
    mha = model.get_layer("mha").trainable_variables
    assert {tuple(e) for e in seen["exact"]} == {tuple(sorted(v.path for v in mha))}
