"""kgrad's PyTorch backend: ``torch.func``.

``torch.func`` already has JAX semantics (``argnums``, ``has_aux``, pytrees);
this module only renames a few arguments and converts NumPy inputs.
"""

from __future__ import annotations

import functools

import keras
import torch
import torch.func as tf_func

name = "torch"


def convert(x):
    """Turns NumPy arrays and Python numbers into tensors on Keras's device."""
    if isinstance(x, torch.Tensor):
        return x
    return keras.ops.convert_to_tensor(x)


grad = tf_func.grad
jacrev = tf_func.jacrev
jacfwd = tf_func.jacfwd
vjp = tf_func.vjp
jvp = tf_func.jvp


def value_and_grad(f, argnums=0, has_aux=False):
    """``torch.func.grad_and_value`` with JAX's order of results."""
    inner = tf_func.grad_and_value(f, argnums=argnums, has_aux=has_aux)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        g, value = inner(*args, **kwargs)
        return value, g

    return wrapped


def vmap(f, in_axes=0, out_axes=0):
    """``torch.func.vmap``; random ops draw independently per example, as JAX keys would."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if isinstance(out_axes, list):
        out_axes = tuple(out_axes)
    return tf_func.vmap(f, in_dims=in_axes, out_dims=out_axes, randomness="different")


def jit(f):
    """Identity: eager ``torch.func`` is what pays for arbitrary functions.

    ``torch.compile`` recompiles for every new shape and breaks on many Keras
    layers, so it is used only by kgrad's own model-level paths where measured.
    """
    return f
