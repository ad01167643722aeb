"""kgrad's PyTorch backend: ``torch.func``.

``torch.func`` already has JAX semantics (``argnums``, ``has_aux``, pytrees);
this module only renames a few arguments and converts NumPy inputs.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import keras
import torch
import torch.func as tf_func

name = "torch"


def convert(x):
    """Turns NumPy arrays and Python numbers into tensors on Keras's device."""
    if isinstance(x, torch.Tensor):
        return x
    return keras.ops.convert_to_tensor(x)


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


def _composite_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm`` written with elementary ops.

    Same values as the fused kernel (to float rounding); its derivatives of
    every order come from the elementary ops' own formulas.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dim=dims, keepdim=True)
    centered = input - mean
    out = centered * torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


_norm_lock = threading.Lock()
_norm_depth = 0
_fused_layer_norm = None


@contextlib.contextmanager
def _composite_norms():
    """Runs ``layer_norm`` as elementary ops while a transform records its graph.

    torch 2.13's fused ``layer_norm`` has wrong derivatives of its derivatives
    where a transform maps or pushes forward through it: differentiating its
    ``jvp`` (``grad`` of ``jvp``), or the weight gradient of a ``vmap``-ed
    backward with respect to the norm's input, treats the saved mean and
    inverse standard deviation as constants (reproduction in
    docs/backends.md). Keras's ``LayerNormalization`` calls the fused kernel
    through the module attribute, so swapping the attribute reaches it. The
    swap is reference-counted (nested and concurrent transforms); another
    thread calling ``layer_norm`` meanwhile gets the same values.
    """
    global _norm_depth, _fused_layer_norm
    functional = torch.nn.functional
    with _norm_lock:
        if _norm_depth == 0:
            _fused_layer_norm = functional.layer_norm
            functional.layer_norm = _composite_layer_norm
        _norm_depth += 1
    try:
        yield
    finally:
        with _norm_lock:
            _norm_depth -= 1
            if _norm_depth == 0:
                functional.layer_norm = _fused_layer_norm


@contextlib.contextmanager
def transform_kernels():
    """Kernels whose derivatives compose: math attention, composite layer norm."""
    with _math_attention(), _composite_norms():
        yield


def _with_transform_kernels(transform):
    """Wraps ``transform(*args)``'s result so each call runs under :func:`transform_kernels`."""

    @functools.wraps(transform)
    def make(f, *args, **kwargs):
        inner = transform(f, *args, **kwargs)

        @functools.wraps(f)
        def wrapped(*call_args, **call_kwargs):
            with transform_kernels():
                return inner(*call_args, **call_kwargs)

        return wrapped

    return make


def jvp(f, primals, tangents, has_aux=False):
    """``torch.func.jvp``, on kernels whose derivatives compose (see ``transform_kernels``)."""
    with transform_kernels():
        return tf_func.jvp(f, primals, tangents, has_aux=has_aux)


def vjp(f, *primals, has_aux=False):
    """``torch.func.vjp``; the forward pass runs on kernels whose derivatives compose."""
    with transform_kernels():
        return tf_func.vjp(f, *primals, has_aux=has_aux)


jacfwd = _with_transform_kernels(tf_func.jacfwd)
jacfwd.__doc__ = "``torch.func.jacfwd`` on kernels whose derivatives compose."
jacrev = _with_transform_kernels(tf_func.jacrev)
jacrev.__doc__ = "``torch.func.jacrev`` on kernels whose derivatives compose."


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
    return _with_transform_kernels(tf_func.vmap)(
        f, in_dims=in_axes, out_dims=out_axes, randomness="different"
    )


def _vmap_unsupported(err: RuntimeError) -> bool:
    return "vmap" in str(err)


def hessian(f, argnums=0):
    """Forward over reverse, ``jacfwd(grad(f))``; reverse over reverse where ``vmap`` fails.

    The inner derivative is ``grad``, not ``jacrev``: for a scalar ``f`` it is
    one backward pass instead of a mapped one, and its derivatives are right
    even on torch 2.13's fused layer norm, whose mapped backward differentiates
    wrongly (see :func:`_composite_norms`, which also guards ``jacrev``).

    ``torch.func.jacfwd`` maps the forward pass with ``vmap``, which fails inside
    Keras's Conv2D ("Tensor.clone(memory_format) inside vmap"). Reverse over
    reverse maps only backward passes, which work; the Hessian is the same.
    """
    fwd = jacfwd(tf_func.grad(f, argnums=argnums), argnums=argnums)
    rev = jacrev(tf_func.grad(f, argnums=argnums), argnums=argnums)

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
