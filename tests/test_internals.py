"""The guards on the framework internals that kgrad swaps while it differentiates.

Each guard is checked by simulating what a future release could do: remove the
internal, change its signature, or stop calling it. The error must name the
installed versions and the tested range, and kgrad must refuse to differentiate
rather than run without the swap.
"""

import sys
import types

import keras
import numpy as np
import pytest

import kgrad
from kgrad.backends import _internals

BACKEND = keras.backend.backend()


def _model():
    inputs = keras.Input((3,))
    h = keras.layers.LayerNormalization()(inputs)
    outputs = keras.layers.Dense(1, activation="silu")(h)
    return keras.Model(inputs, outputs)


def test_a_missing_function_names_the_versions_and_the_range():
    module = types.ModuleType("fake_nn")
    with pytest.raises(ImportError) as info:
        _internals.require_function(
            module, "_compute_moments", ["x"], package="keras", framework="Keras"
        )
    message = str(info.value)
    low, high = _internals.TESTED["keras"]
    assert "fake_nn._compute_moments" in message
    assert f"Received: keras=={keras.__version__}" in message
    assert f"keras {low} to {high}" in message
    assert "pip install" in message


def test_a_changed_signature_is_refused_and_a_matching_one_returned():
    module = types.ModuleType("fake_nn")
    module.moments = lambda x, axis: None
    with pytest.raises(ImportError, match=r"takes \(x, axis\), not \(x, axes, keepdims"):
        _internals.require_function(
            module, "moments", ["x", "axes", "keepdims"], package="keras", framework="Keras"
        )
    module.moments = lambda x, axes, keepdims, synchronized=False: None
    found = _internals.require_function(
        module, "moments", ["x", "axes", "keepdims"], package="keras", framework="Keras"
    )
    assert found is module.moments


def test_a_caller_that_no_longer_reaches_the_internal_is_refused():
    def moments(x, axes):
        return x, axes

    with pytest.raises(ImportError, match="no longer calls `_compute_moments`"):
        _internals.require_reached(
            moments, "_compute_moments", package="keras", framework="Keras", via="moments"
        )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow backend's swap")
class TestTensorFlow:
    def test_the_installed_keras_passes(self):
        _internals.check_tensorflow()

    @pytest.mark.parametrize(
        "change",
        ["missing", "signature", "unreached"],
    )
    def test_a_changed_keras_is_refused(self, monkeypatch, change):
        from keras.src.backend.tensorflow import nn as keras_tf_nn

        if change == "missing":
            monkeypatch.delattr(keras_tf_nn, "_compute_moments")
        elif change == "signature":
            monkeypatch.setattr(keras_tf_nn, "_compute_moments", lambda x, axis: None)
        else:
            monkeypatch.setattr(keras_tf_nn, "moments", lambda x, axes, keepdims=False: None)
        with pytest.raises(ImportError, match="_compute_moments"):
            _internals.check_tensorflow()

    def test_kgrad_refuses_to_differentiate_without_the_swap(self, monkeypatch):
        from keras.src.backend.tensorflow import nn as keras_tf_nn

        from kgrad.backends import _tf_kernels

        model, x = _model(), np.ones((2, 3), "float32")
        original = keras_tf_nn._compute_moments

        def renamed(inputs, axes, keepdims):  # Keras's forward still runs
            return original(inputs, axes, keepdims)

        monkeypatch.setattr(_tf_kernels, "_checked", False)
        monkeypatch.setattr(keras_tf_nn, "_compute_moments", renamed)
        with pytest.raises(ImportError, match="second and higher derivatives"):
            kgrad.hessian(model, x, wrt="inputs")
        monkeypatch.undo()
        hessian = keras.ops.convert_to_numpy(kgrad.hessian(model, x, wrt="inputs"))
        assert np.all(np.isfinite(hessian))


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch backend's swaps")
class TestTorch:
    def test_the_installed_torch_passes(self):
        _internals.check_torch()

    @pytest.mark.parametrize("change", ["layer_norm", "silu", "attention"])
    def test_a_changed_torch_is_refused(self, monkeypatch, change):
        import torch

        if change == "layer_norm":
            monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda input, shape: None)
        elif change == "silu":
            monkeypatch.delattr(torch.nn.functional, "silu")
        else:
            monkeypatch.setitem(sys.modules, "torch.nn.attention", None)
        with pytest.raises(ImportError, match=f"Received: keras=={keras.__version__}, torch=="):
            _internals.check_torch()

    def test_kgrad_refuses_to_differentiate_without_the_swap(self, monkeypatch):
        import torch

        from kgrad.backends import _torch_kernels

        model, x = _model(), np.ones((2, 3), "float32")
        original = torch.nn.functional.layer_norm

        def renamed(input, shape, weight=None, bias=None, eps=1e-5):  # the forward still runs
            return original(input, shape, weight, bias, eps)

        monkeypatch.setattr(_torch_kernels, "_checked", False)
        monkeypatch.setattr(torch.nn.functional, "layer_norm", renamed)
        with pytest.raises(ImportError, match="layer_norm"):
            kgrad.hessian(model, x, wrt="inputs")
        monkeypatch.undo()
        hessian = keras.ops.convert_to_numpy(kgrad.hessian(model, x, wrt="inputs"))
        assert np.all(np.isfinite(hessian))
