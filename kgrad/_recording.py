"""When model-level results keep their autograd graph (PyTorch).

TensorFlow records operations only under a ``GradientTape`` and JAX only
inside a transform, so a plain call there holds no graph. PyTorch records
whenever grad mode is on and a tensor requires grad, and a Keras model's
weights always do: a plain call would keep the graph of every result alive
(hundreds of MB for a few dozen Jacobians). kgrad's rule on PyTorch: a result
keeps its graph when grad mode is on and

- the call runs inside a Keras training step (``fit``'s ``train_step``, a
  custom ``train_step``, ``compute_loss``), or
- an argument tensor (``x``, ``y``, ``vector``) requires grad, or
- the call runs inside a ``torch.func`` transform (``kgrad.func``), or
- the call runs inside :func:`differentiable` (a hand-written training loop).

Otherwise the call runs under ``torch.no_grad()`` and returns detached
tensors.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import keras

_local = threading.local()
_STEP_FUNCTIONS = frozenset({"train_step", "compute_loss", "_compute_loss"})


class _Differentiable(contextlib.ContextDecorator):
    """The context of :func:`differentiable`: a per-thread depth, re-entrant."""

    __slots__ = ()

    def __enter__(self) -> None:
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc) -> bool:
        _local.depth -= 1
        return False


_DIFFERENTIABLE = _Differentiable()


def differentiable() -> contextlib.AbstractContextManager:
    """Keeps model-level results differentiable, for a hand-written training loop.

    On PyTorch, kgrad's model-level calls outside a Keras training step return
    tensors without autograd history, as a TensorFlow call outside a
    ``GradientTape`` does, so that results kept around do not hold their
    graphs. Inside ``fit``, a custom ``train_step`` or ``compute_loss`` they
    stay differentiable by themselves; in a loop of your own, call kgrad inside
    this context to back-propagate through the results. JAX and TensorFlow
    results are always differentiable inside their transforms and tapes, so
    there it changes nothing.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> x = np.ones((3, 2), "float32")
    >>> with kgrad.differentiable():
    ...     g = kgrad.grad(model, x)
    >>> tuple(g.shape)
    (3, 2)
    """
    return _DIFFERENTIABLE


def requested() -> bool:
    """Whether the calling thread is inside :func:`differentiable`."""
    return getattr(_local, "depth", 0) > 0


def in_training_step() -> bool:
    """Whether a Keras training step (``train_step``, ``compute_loss``) is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _STEP_FUNCTIONS:
            owner = frame.f_locals.get("self")
            if isinstance(owner, keras.Model) or frame.f_code.co_name == "train_step":
                return True
        frame = frame.f_back
    return False
