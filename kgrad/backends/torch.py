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


jacrev = tf_func.jacrev
vjp = tf_func.vjp


def _old_style_function(err: RuntimeError) -> bool:
    """``torch.func`` refuses an ``autograd.Function`` without ``setup_context``.

    Keras's ``ops.custom_gradient`` on torch is such a Function.
    """
    return "setup_context" in str(err)


def _autograd_value_and_grad(f, argnums, has_aux, args, kwargs):
    """``value_and_grad`` by ``torch.autograd.grad``, for what ``torch.func`` refuses.

    ``create_graph=True`` keeps the result differentiable (an outer ``fit``
    step or a second derivative can go through it).
    """
    tree = keras.tree
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    args = list(args)
    leaves = []
    for i in nums:
        flat = [
            t if t.requires_grad else t.detach().requires_grad_(True) for t in tree.flatten(args[i])
        ]
        args[i] = tree.pack_sequence_as(args[i], flat)
        leaves.append(flat)
    with torch.enable_grad():
        out = f(*args, **kwargs)
    value, aux = out if has_aux else (out, None)
    flat = [t for group in leaves for t in group]
    grads = torch.autograd.grad(value, flat, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, flat)]
    packed, start = [], 0
    for i, group in zip(nums, leaves):
        packed.append(tree.pack_sequence_as(args[i], grads[start : start + len(group)]))
        start += len(group)
    g = packed[0] if isinstance(argnums, int) else tuple(packed)
    return ((value, aux), g) if has_aux else (value, g)


def grad(f, argnums=0, has_aux=False):
    """``torch.func.grad``; plain autograd where ``f`` holds an old-style Function."""
    inner = value_and_grad(f, argnums=argnums, has_aux=has_aux)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        out, g = inner(*args, **kwargs)
        return (g, out[1]) if has_aux else g

    return wrapped


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
    """``torch.func.grad_and_value`` with JAX's order of results.

    Where ``f`` runs an old-style ``autograd.Function`` (Keras's
    ``ops.custom_gradient`` on torch), which ``torch.func`` refuses, the
    gradient is taken with ``torch.autograd.grad`` instead.
    """
    inner = tf_func.grad_and_value(f, argnums=argnums, has_aux=has_aux)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        try:
            g, value = inner(*args, **kwargs)
        except RuntimeError as err:
            if not _old_style_function(err):
                raise
            # Keras's `ops.custom_gradient` (an old-style autograd.Function):
            # first-order gradients by plain autograd; torch.func transforms
            # (vmap, jvp) of such a model still fail, with torch's message.
            return _autograd_value_and_grad(f, argnums, has_aux, args, kwargs)
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
