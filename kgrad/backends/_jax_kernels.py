"""The kernel swap of kgrad's JAX backend: Keras's cuDNN recurrent layers off.

On an NVIDIA GPU, Keras's JAX ``LSTM`` (and ``Bidirectional(LSTM)``) run on
cuDNN through ``jax.experimental.rnn``, whose backward pass is a primitive
with no batching rule and no derivatives of its own: ``vmap`` of its ``vjp``
(every Jacobian, per-sample gradient and layer report) fails with "Batching
rule for 'rnn_bwd' not implemented", and so do forward mode and second
derivatives. Keras runs the layer on its ``lax.scan`` loop instead when the
backend's ``lstm`` raises ``NotImplementedError`` (as it does on a CPU), so
kgrad's transforms trace with :func:`scan_recurrent_layers` swapping it in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from kgrad.backends._swaps import swapped_attributes


def _on_the_scan_loop(*args, **kwargs):
    """Stands in for Keras's cuDNN layer functions: Keras then runs its scan loop."""
    raise NotImplementedError("kgrad differentiates Keras's recurrent layers on their scan loop")


def _keras_backend():
    from keras.src import backend

    return backend


# The `keras.src.backend` functions that run a whole recurrent layer on cuDNN
# (`bidirectional_lstm` is newer than kgrad's Keras floor, and then skipped).
_swap = swapped_attributes(
    _keras_backend, {"lstm": _on_the_scan_loop, "bidirectional_lstm": _on_the_scan_loop}
)


def scan_recurrent_layers() -> AbstractContextManager:
    """Keras's JAX recurrent layers run on their ``lax.scan`` loop, never on cuDNN.

    The loop computes the same values (to float rounding) with derivatives of
    every order that every transform maps. The swap is process-wide and
    reference-counted (:func:`kgrad.backends._swaps.swapped_attributes`):
    another thread's plain forward pass meanwhile runs the loop too. On a CPU
    Keras runs the loop anyway, and nothing changes.

    Example:

    >>> from keras.src import backend
    >>> with scan_recurrent_layers():
    ...     backend.lstm is _on_the_scan_loop
    True
    """
    return _swap()
