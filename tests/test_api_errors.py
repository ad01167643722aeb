"""Bad input to the model-level API: a clear built-in error, never a wrong number."""

import keras
import numpy as np
import pytest
import reference as ref

import kgrad

L = keras.layers


@pytest.fixture
def model():
    return ref.mlp()


@pytest.fixture
def x(rng):
    return rng.normal(size=(4, 3)).astype("float32")


def test_unknown_layer_lists_names_and_suggests(model, x):
    with pytest.raises(ValueError, match=r"Received: layers='h3'.*Did you mean 'h[12]'.*'drop'"):
        kgrad.grad(model, x, wrt="activations", layers="h3")
    with pytest.raises(ValueError, match=r"Received: of='outt'.*Did you mean 'out'"):
        kgrad.grad(model, x, of="outt")
    with pytest.raises(ValueError, match=r"index is out of range.*Received: layers=7"):
        kgrad.grad(model, x, wrt="weights", layers=7)
    with pytest.raises(ValueError, match="not part of model"):
        kgrad.grad(model, x, wrt="weights", layers=L.Dense(2, name="stranger"))
    with pytest.raises(TypeError, match="Received: layers=1.5"):
        kgrad.grad(model, x, wrt="weights", layers=1.5)


def test_invalid_wrt(model, x):
    with pytest.raises(ValueError, match=r"Received: wrt='input'.*Did you mean 'inputs'"):
        kgrad.grad(model, x, wrt="input")
    with pytest.raises(ValueError, match="without repeats"):
        kgrad.grad(model, x, wrt=["inputs", "inputs"])


def test_integer_and_boolean_inputs(model):
    with pytest.raises(TypeError, match=r"int(32|64).*Received"):
        kgrad.grad(model, np.ones((2, 3), dtype="int64"))
    with pytest.raises(TypeError, match="bool"):
        kgrad.jacobian(model, np.ones((2, 3), dtype=bool))


def test_target_out_of_range_is_not_clamped(model, x):
    with pytest.raises(ValueError, match=r"index 2 is out of range.*size 2.*Received: target=2"):
        kgrad.grad(model, x, target=2)
    with pytest.raises(ValueError, match="out of range"):
        kgrad.jacobian(model, x, target=-3)
    with pytest.raises(ValueError, match="at most 1"):
        kgrad.grad(model, x, target=(0, 0))


def test_samples_that_interact_while_per_sample(rng):
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization(name="bn"), L.Dense(2)])
    x = rng.normal(size=(4, 3)).astype("float32")
    with pytest.raises(ValueError, match=r"\['bn'\].*training=True"):
        kgrad.jacobian(model, x, training=True)
    with pytest.raises(ValueError, match="per sample.*`per_sample=False`"):
        kgrad.hessian(model, x, training=True)
    with pytest.raises(ValueError, match="per sample.*give a `loss`"):
        kgrad.grad(model, x, training=True)
    # Per-sample Hessian blocks of a batch loss are just as undefined; the
    # message suggests only what works.
    with pytest.raises(ValueError, match="per sample.*`per_sample=False`") as err:
        kgrad.hessian(model, x, y=np.zeros((4, 2)), loss="mse", training=True)
    assert "give a `loss`" not in str(err.value)
    kgrad.hessian(model, x, y=np.zeros((4, 2)), loss="mse", training=True, per_sample=False)
    # Allowed: inference mode, a batch loss, and weight gradients.
    kgrad.jacobian(model, x)
    kgrad.grad(model, x, y=np.zeros((4, 2)), loss="mse", training=True)
    kgrad.grad(model, x, wrt="weights", training=True)


def test_oversize_jacobian_and_hessian(model, x):
    kgrad.set_memory_budget(1000)
    try:
        with pytest.raises(ValueError, match=r"Jacobian needs about .*chunk_size.*hvp"):
            kgrad.jacobian(model, np.ones((64, 3), "float32"))
        with pytest.raises(ValueError, match=r"Hessian needs about"):
            kgrad.hessian(model, x, wrt="weights")
    finally:
        kgrad.set_memory_budget(None)
    with pytest.raises(ValueError, match="positive"):
        kgrad.set_memory_budget(-1)


def test_y_without_loss_on_an_uncompiled_model(model, x):
    with pytest.raises(ValueError, match=r"not compiled.*loss=None.*model.compile"):
        kgrad.grad(model, x, y=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="without targets"):
        kgrad.grad(model, x, loss="mse")


def test_unbuilt_model(x):
    with pytest.raises(ValueError, match=r"not built.*Received: an unbuilt Sequential"):
        kgrad.jacobian(keras.Sequential([L.Dense(2)]), x)


def test_empty_batch(model):
    with pytest.raises(ValueError, match="empty batch"):
        kgrad.jacobian(model, np.zeros((0, 3), "float32"))


def test_bad_mode_chunk_and_vector(model, x):
    with pytest.raises(ValueError, match=r"Received: mode='reverse'"):
        kgrad.jacobian(model, x, mode="reverse")
    with pytest.raises(ValueError, match=r"Received: chunk_size=0"):
        kgrad.jacobian(model, x, chunk_size=0)
    with pytest.raises(ValueError, match=r"Did you mean 'mlp/h1/kernel'"):
        kgrad.hvp(model, x, {"mlp/h1/kernal": np.ones((3, 4))}, y=np.zeros((4, 2)), loss="mse")
    with pytest.raises(ValueError, match=r"Expected \(3, 4\). Received: shape \(4, 3\)"):
        kgrad.hvp(model, x, {"mlp/h1/kernel": np.ones((4, 3))}, y=np.zeros((4, 2)), loss="mse")


def test_nan_and_inf_propagate():
    f = lambda x: keras.ops.sqrt(x)
    g = keras.ops.convert_to_numpy(kgrad.grad(f, np.array([[0.0, -1.0, 4.0]], "float32")))
    assert np.isinf(g[0, 0]) and np.isnan(g[0, 1]) and g[0, 2] == pytest.approx(0.25)
