"""The swaps kgrad makes for GPU kernels, exercised on any machine.

On a GPU, Keras's JAX LSTM runs on cuDNN, whose backward pass no transform can
map or differentiate, and torch's fused CUDA dropout draws a mapped forward
pass's mask differently from an unmapped one's. kgrad swaps both while it
differentiates; these tests stand a spy in for the GPU path, or use torch's
meta device, to see the swaps on a machine without a GPU.
"""

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad

BACKEND = keras.backend.backend()
L = keras.layers


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX backend's cuDNN recurrent layers")
def test_jax_transforms_run_recurrent_layers_on_their_scan_loop(monkeypatch, rng):
    # Compiled calls (the default); eager calls go through the same transforms.
    from keras.src import backend

    calls = []

    def cudnn_lstm(*args, **kwargs):  # the GPU path's entry: counted, then Keras loops
        calls.append(1)
        raise NotImplementedError

    monkeypatch.setattr(backend, "lstm", cudnn_lstm)
    bidirectional = hasattr(backend, "bidirectional_lstm")
    if bidirectional:
        monkeypatch.setattr(backend, "bidirectional_lstm", cudnn_lstm)
    inputs = keras.Input((5, 3))
    h = L.LSTM(4, return_sequences=True)(inputs)
    h = L.Bidirectional(L.LSTM(3))(h)
    model = keras.Model(inputs, L.Dense(1)(h))
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    model(x)
    plain = len(calls)
    assert plain >= 1  # a plain call reaches the backend's cuDNN entry
    rev = np_(kgrad.jacobian(model, x, mode="rev"))
    fwd = np_(kgrad.jacobian(model, x, mode="fwd"))
    kgrad.hessian(model, x[:1], wrt="inputs")
    kgrad.grad(model, x, wrt="weights")
    assert len(calls) == plain  # kgrad's transforms never do
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-6)
    assert backend.lstm is cudnn_lstm  # restored
    if bidirectional:
        assert backend.bidirectional_lstm is cudnn_lstm


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch backend's dropout masks")
def test_torch_dropout_masks_on_a_device_come_from_the_host_generator():
    import torch

    from kgrad.backends import _torch_kernels

    with _torch_kernels.host_dropout_masks():
        swapped = torch.nn.functional.dropout
        assert swapped is _torch_kernels._dropout_with_a_host_mask
        # A device tensor (torch's meta device stands in for a GPU): the mask is
        # drawn by the CPU generator, so it advances.
        before = torch.random.get_rng_state()
        out = swapped(torch.ones(4, 8, device="meta"), p=0.5)
        assert out.device.type == "meta" and tuple(out.shape) == (4, 8)
        assert not torch.equal(torch.random.get_rng_state(), before)
        # A CPU tensor goes to torch's own dropout unchanged.
        x = torch.arange(32.0).reshape(4, 8)
        torch.manual_seed(3)
        mine = swapped(x, p=0.5)
        torch.manual_seed(3)
        fused = _torch_kernels._device_dropout(x, p=0.5)
        assert torch.equal(mine, fused)
        assert torch.equal(swapped(x, p=0.5, training=False), x)
    assert torch.nn.functional.dropout is not _torch_kernels._dropout_with_a_host_mask
