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
vjp = tf_func.vjp


def _math_attention():
    """Routes ``scaled_dot_product_attention`` to its math kernel.

    The fused CPU/GPU attention kernels have no forward-mode derivative
    ("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"),
    so forward-mode transforms run attention as plain differentiable ops.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def jvp(f, primals, tangents, has_aux=False):
    """``torch.func.jvp``, with attention on its forward-differentiable kernel."""
    with _math_attention():
        return tf_func.jvp(f, primals, tangents, has_aux=has_aux)


def jacfwd(f, argnums=0, has_aux=False):
    """``torch.func.jacfwd``, with attention on its forward-differentiable kernel."""
    inner = tf_func.jacfwd(f, argnums=argnums, has_aux=has_aux)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with _math_attention():
            return inner(*args, **kwargs)

    return wrapped


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


def _vmap_unsupported(err: RuntimeError) -> bool:
    return "vmap" in str(err)


def hessian(f, argnums=0):
    """Forward over reverse; reverse over reverse where ``vmap`` cannot run the forward.

    ``torch.func.jacfwd`` maps the forward pass with ``vmap``, which fails inside
    Keras's Conv2D ("Tensor.clone(memory_format) inside vmap"). Reverse over
    reverse maps only backward passes, which work; the Hessian is the same.
    """
    fwd = jacfwd(tf_func.jacrev(f, argnums=argnums), argnums=argnums)
    rev = tf_func.jacrev(tf_func.jacrev(f, argnums=argnums), argnums=argnums)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        try:
            return fwd(*args, **kwargs)
        except RuntimeError as err:
            if not _vmap_unsupported(err):
                raise
            return rev(*args, **kwargs)

    return wrapped


def jit(f):
    """Identity: eager ``torch.func`` is what pays for arbitrary functions.

    ``torch.compile`` recompiles for every new shape and breaks on many Keras
    layers, so it is used only by kgrad's own model-level paths where measured.
    """
    return f
