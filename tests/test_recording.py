"""When results keep their autograd graph (PyTorch) and when they do not.

The reference for the differentiable side is a closed form: for the linear
model ``f(x) = x @ w + b`` the input gradient of ``sum(f)`` is ``w`` in every
row, so ``L = sum(grad**2) = B * |w|**2`` and ``dL/dw = 2 B w``.
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

BACKEND = keras.backend.backend()
ops = keras.ops
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's autograd history")


def _model():
    inp = keras.Input((3,))
    h = keras.layers.Dense(4, activation="tanh", name="h")(inp)
    return keras.Model(inp, keras.layers.Dense(2, name="o")(h))


def _calls(model, x, y):
    return {
        "grad": lambda: kgrad.grad(model, x),
        "grad_weights": lambda: kgrad.grad(model, x, wrt="weights", y=y, loss="mse"),
        "value_and_grad": lambda: kgrad.value_and_grad(model, x, y=y, loss="mse"),
        "jacobian": lambda: kgrad.jacobian(model, x),
        "jacobian_fwd": lambda: kgrad.jacobian(model, x, mode="fwd"),
        "hessian": lambda: kgrad.hessian(model, x, target=0),
        "hessian_weights": lambda: kgrad.hessian(model, x, wrt="weights", layers="h"),
        "hvp": lambda: kgrad.hvp(model, x, ops.ones_like(x), wrt="inputs", y=y, loss="mse"),
        "layer_grad": lambda: [
            (r.output, r.output_grad, r.weight_grads)
            for r in kgrad.layer_grad(model, x, y, loss="mse").values()
        ],
    }


def _tensors(out):
    import torch

    return [t for t in keras.tree.flatten(out) if isinstance(t, torch.Tensor)]


@torch_only
@pytest.mark.parametrize("name", list(_calls(None, None, None)))
def test_a_plain_call_holds_no_graph(name, rng):
    model = _model()
    x = rng.normal(size=(5, 3)).astype("float32")
    y = rng.normal(size=(5, 2)).astype("float32")
    out = _calls(model, x, y)[name]()
    tensors = _tensors(out)
    assert tensors
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    # The same numbers as a differentiable call.
    with kgrad.differentiable():
        kept = _tensors(_calls(model, x, y)[name]())
    assert any(t.requires_grad for t in kept)
    for a, b in zip(tensors, kept):
        np.testing.assert_allclose(np_(a), np_(b.detach()), rtol=1e-6, atol=1e-7)


@torch_only
def test_a_hand_written_loop_back_propagates_inside_differentiable(rng):
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1, name="d")(inp))
    x = rng.normal(size=(6, 3)).astype("float32")
    kernel = model.get_layer("d").kernel
    w = np.array(kernel.numpy())
    with kgrad.differentiable():
        loss = ops.sum(kgrad.grad(model, x) ** 2)
    loss.backward()
    np.testing.assert_allclose(np_(kernel.value.grad), 2 * 6 * w, rtol=1e-5)
    # Outside, the result has no history to back-propagate through.
    with pytest.raises(RuntimeError, match="does not require grad"):
        ops.sum(kgrad.grad(model, x) ** 2).backward()


@torch_only
def test_inputs_that_require_grad_keep_the_graph(rng):
    import torch

    model = _model()
    x = torch.tensor(rng.normal(size=(4, 3)).astype("float32"), requires_grad=True)
    g = kgrad.grad(model, x)
    assert g.requires_grad
    (second,) = torch.autograd.grad(ops.sum(g), x)
    want = np_(kgrad.hvp(model, x.detach(), ops.ones_like(x.detach()), wrt="inputs"))
    np.testing.assert_allclose(np_(second), want, rtol=1e-4, atol=1e-6)


@torch_only
def test_a_custom_train_step_differentiates_through_kgrad(rng):
    import torch

    class Critic(keras.Model):
        def train_step(self, data):
            x, _ = data
            self.zero_grad()
            loss = ops.sum(kgrad.grad(self, x) ** 2)
            loss.backward()
            with torch.no_grad():
                self.optimizer.apply(
                    [v.value.grad for v in self.trainable_weights], self.trainable_weights
                )
            return {"loss": loss}

    inp = keras.Input((3,))
    model = Critic(inp, keras.layers.Dense(1, name="d")(inp))
    x = rng.normal(size=(6, 3)).astype("float32")
    w = np.array(model.get_layer("d").kernel.numpy())
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01))
    model.fit(x, np.zeros((6, 1), "float32"), batch_size=6, epochs=1, verbose=0)
    np.testing.assert_allclose(
        np.array(model.get_layer("d").kernel.numpy()), w - 0.01 * 2 * 6 * w, rtol=1e-5
    )


def test_differentiable_changes_no_number(rng):
    model = _model()
    x = rng.normal(size=(4, 3)).astype("float32")
    with kgrad.differentiable():
        inside = np_(kgrad.jacobian(model, x))
    np.testing.assert_allclose(inside, np_(kgrad.jacobian(model, x)), rtol=1e-6, atol=1e-7)


@torch_only
@pytest.mark.parametrize("grad_mode", ["on", "no_grad"])
def test_func_grad_through_a_model_level_call_in_either_grad_mode(grad_mode, rng):
    # Under torch.no_grad() kgrad's gradients take plain autograd (cheaper than
    # torch.func outside any transform); a kgrad call inside the differentiated
    # function must still keep its graph there, or the outer gradient is zero.
    import contextlib

    import torch

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1, name="d")(inp))
    x = rng.normal(size=(6, 3)).astype("float32")
    kernel = model.get_layer("d").kernel
    w = np.array(kernel.numpy())

    def loss(weights):
        mapping = [(v, weights[v.path]) for v in model.trainable_variables]
        with keras.StatelessScope(state_mapping=mapping):
            return ops.sum(kgrad.grad(model, x) ** 2)

    mode = torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext()
    with mode:
        g = kgrad.func.grad(loss)(kgrad.func.weights_of(model))
        plain = kgrad.grad(model, x, wrt="weights")
    np.testing.assert_allclose(np_(g[kernel.path]), 2 * 6 * w, rtol=1e-5)
    # d sum(x @ w + b) / dw is the column sums of x; and no result holds a graph.
    np.testing.assert_allclose(np_(plain[kernel.path]), x.sum(0)[:, None], rtol=1e-5)
    assert not any(t.requires_grad for t in _tensors(plain))
    if grad_mode == "no_grad":
        assert not g[kernel.path].requires_grad
