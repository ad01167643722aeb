"""x as a stream of batches: the results equal one call on the concatenated batch."""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

L = keras.layers
SIZES = (4, 4, 2)


@pytest.fixture
def setup(rng, monkeypatch):
    monkeypatch.setenv("KGRAD_PROGRESS", "0")
    model = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(5, activation="tanh", name="h"),
            L.Dropout(0.5, name="drop"),
            L.Dense(2, name="out"),
        ],
        name="net",
    )
    x = rng.normal(size=(sum(SIZES), 3)).astype("float32")
    y = rng.normal(size=(sum(SIZES), 2)).astype("float32")
    return model, x, y


def _split(a):
    ends = np.cumsum(SIZES)[:-1]
    return np.split(a, ends)


def _gen(x, y=None):
    if y is None:
        yield from _split(x)
    else:
        yield from zip(_split(x), _split(y))


def _close(a, b):
    for u, v in zip(keras.tree.flatten(np_(a)), keras.tree.flatten(np_(b))):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_per_sample_results_concatenate(setup):
    model, x, _ = setup
    _close(kgrad.grad(model, _gen(x)), kgrad.grad(model, x))
    _close(kgrad.jacobian(model, _gen(x)), kgrad.jacobian(model, x))
    _close(kgrad.jacobian(model, _gen(x), wrt="weights"), kgrad.jacobian(model, x, wrt="weights"))
    _close(kgrad.hessian(model, _gen(x), target=0), kgrad.hessian(model, x, target=0))
    # Without a loss the objective is a sum over samples: weight gradients add up.
    _close(kgrad.grad(model, _gen(x), wrt="weights"), kgrad.grad(model, x, wrt="weights"))


def test_loss_results_are_the_whole_data_loss(setup):
    model, x, y = setup
    for wrt in ("weights", "inputs", ("activations", "weights")):
        _close(
            kgrad.grad(model, _gen(x, y), wrt=wrt, layers="h", loss="mse"),
            kgrad.grad(model, x, wrt=wrt, layers="h", y=y, loss="mse"),
        )
    v1, g1 = kgrad.value_and_grad(model, _gen(x, y), wrt="weights", loss="mse")
    v2, g2 = kgrad.value_and_grad(model, x, wrt="weights", y=y, loss="mse")
    _close(v1, v2)
    _close(g1, g2)
    vec = {k: np.ones(tuple(w.shape), "float32") for k, w in kgrad.func.weights_of(model).items()}
    _close(kgrad.hvp(model, _gen(x, y), vec, loss="mse"), kgrad.hvp(model, x, vec, y=y, loss="mse"))
    h1 = kgrad.hessian(model, _gen(x, y), wrt="weights", layers="out", loss="mse")
    _close(h1, kgrad.hessian(model, x, wrt="weights", layers="out", y=y, loss="mse"))
    r1 = kgrad.layer_grad(model, _gen(x, y), loss="mse")
    r2 = kgrad.layer_grad(model, x, y, loss="mse")
    assert list(r1) == list(r2) == ["h", "drop", "out"]
    for name in r2:
        _close(r1[name].output, r2[name].output)
        _close(r1[name].output_grad, r2[name].output_grad)
        _close(r1[name].weight_grads, r2[name].weight_grads)


def test_tf_data_and_py_dataset(setup):
    model, x, y = setup
    expected = kgrad.grad(model, x, wrt="weights", y=y, loss="mse")
    tf = pytest.importorskip("tensorflow")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    _close(kgrad.grad(model, ds, wrt="weights", loss="mse"), expected)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(SIZES)

        def __getitem__(self, i):
            return _split(x)[i], _split(y)[i]

    _close(kgrad.grad(model, Batches(), wrt="weights", loss="mse"), expected)


def test_bad_batch_streams(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="separate `y`"):
        kgrad.grad(model, _gen(x), y=y, loss="mse")
    with pytest.raises(ValueError, match="per_sample=False"):
        kgrad.jacobian(model, _gen(x), per_sample=False)
    with pytest.raises(ValueError, match="no batches"):
        kgrad.grad(model, iter([]))
    with pytest.raises(ValueError, match="weights only"):
        kgrad.hvp(model, _gen(x, y), x, wrt="inputs", loss="mse")
    with pytest.raises(ValueError, match="sample weights"):
        kgrad.grad(model, iter([(x, y, np.ones(len(x)))]), loss="mse")


def test_progress_bar(setup, monkeypatch, capsys):
    model, x, _ = setup
    monkeypatch.setenv("KGRAD_PROGRESS", "1")
    kgrad.grad(model, list_free_batches(x))
    assert "3/3" in capsys.readouterr().out


def list_free_batches(x):
    class Sized:
        def __len__(self):
            return len(SIZES)

        def __iter__(self):
            return iter(_split(x))

    return Sized()
