"""The kernel swaps of kgrad's PyTorch backend, reference-counted in one place.

torch's fused attention has no forward-mode derivative and torch 2.13's fused
layer norm differentiates its own derivatives wrongly, so kgrad's transforms
run both on kernels whose derivatives compose (:func:`transform_kernels`).
torch's forward-mode AD state is per process, so forward-mode transforms run
one thread at a time (:data:`_forward_ad_lock`).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from kgrad.backends import _internals
from kgrad.backends._swaps import each_call_under, reference_counted, swapped_attributes


def _math_attention():
    """A context manager routing ``scaled_dot_product_attention`` to its math kernel.

    The fused CPU/GPU attention kernels have no forward-mode derivative
    ("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"),
    so forward-mode transforms run attention as plain differentiable ops.
    torch's ``sdpa_kernel`` sets process-wide flags on enter and restores the
    flags it saw on exit, without counting, so it is entered only by
    :func:`transform_kernels`, once for all the transforms running at a time.
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


def _composite_silu(input, inplace=False):
    """``torch.nn.functional.silu`` as ``x * sigmoid(x)``.

    The fused kernel's derivative (``aten::silu_backward``) has no forward-mode
    derivative ("Trying to use forward AD with aten::silu_backward"), so
    second derivatives in forward mode (Hessians, Laplacians) of swish/silu
    models fail on it.
    """
    return input * torch.sigmoid(input)


# torch.nn.functional attribute -> the composite that transforms run on.
_COMPOSITES = {"layer_norm": _composite_layer_norm, "silu": _composite_silu}

# What the first of the transforms running at a time switched: the entered
# `sdpa_kernel` context (it holds the attention flags from before) and the
# `torch.nn.functional` functions it replaced.
_attention_context = None
_fused: dict = {}
# Whether `_internals.check_torch` passed (once per process, on the first swap).
_checked = False


def _switch_kernels():
    global _attention_context, _checked
    if not _checked:
        _internals.check_torch()
        _checked = True
    attention = _math_attention()
    attention.__enter__()  # restores the flags itself if switching fails
    _attention_context = attention
    functional = torch.nn.functional
    for name, composite in _COMPOSITES.items():
        _fused[name] = getattr(functional, name)
        setattr(functional, name, composite)


def _restore_kernels():
    global _attention_context
    for name, fused in _fused.items():
        setattr(torch.nn.functional, name, fused)
    _fused.clear()
    attention, _attention_context = _attention_context, None
    attention.__exit__(None, None, None)


_kernels = reference_counted(_switch_kernels, _restore_kernels)


def transform_kernels() -> contextlib.AbstractContextManager:
    """Kernels whose derivatives compose: math attention, composite layer norm and silu.

    **Attention.** See :func:`_math_attention`: attention runs on the math
    kernel, which every transform can differentiate.

    **Layer norm.** torch 2.13's fused ``layer_norm`` has wrong derivatives of
    its derivatives where a transform maps or pushes forward through it:
    differentiating its ``jvp`` (``grad`` of ``jvp``), or the weight gradient
    of a ``vmap``-ed backward with respect to the norm's input, treats the
    saved mean and inverse standard deviation as constants (reproduction in
    docs/backends.md). Keras's ``LayerNormalization`` calls the fused kernel
    through the module attribute, so swapping the attribute for
    :func:`_composite_layer_norm` reaches it.

    **SiLU (swish).** See :func:`_composite_silu`; Keras calls it through the
    module attribute too.

    The switches are process-wide (torch's attention flags are global, and so
    is the module attribute), so they are made together and reference-counted
    under one lock: the first transform to enter (in any thread) saves the
    attention flags and ``layer_norm`` and switches; nested and concurrent
    transforms only count; the last one to leave, also by an exception,
    restores them. Meanwhile another thread calling attention, ``layer_norm`` or ``silu``
    outside a transform gets the same values, to float rounding, from the math
    and composite kernels.
    """
    return _kernels()


# torch's own dropout, to which `_dropout_with_a_host_mask` passes what it leaves alone.
_device_dropout = torch.nn.functional.dropout


def _dropout_with_a_host_mask(input, p=0.5, training=True, inplace=False):
    """``torch.nn.functional.dropout`` whose mask is drawn by the CPU generator.

    On a GPU, torch's fused dropout kernel and the Bernoulli draw that
    ``torch.func.vmap`` maps it to consume the CUDA generator differently, so a
    mapped forward pass (forward-mode Jacobians) and an unmapped one (the value,
    reverse mode) would drop different units. A mask drawn on the host from the
    generator that ``seeded`` re-seeds is the same in both, and moved to the
    input's device. Inputs on the CPU, in-place and inference calls go to
    torch's own function unchanged.
    """
    if input.device.type == "cpu" or inplace or not training or not 0.0 < p < 1.0:
        return _device_dropout(input, p=p, training=training, inplace=inplace)
    keep = 1.0 - p
    mask = torch.bernoulli(torch.full(tuple(input.shape), keep)).to(input.device, torch.bool)
    return torch.where(mask, input / keep, torch.zeros_like(input))


#: Keras's unseeded Dropout (which calls ``torch.nn.functional.dropout`` through
#: the module attribute) draws its masks on the host: entered by ``seeded``
#: (every forward pass of a kgrad call with ``training=True``) when torch sees a GPU.
host_dropout_masks = swapped_attributes(
    lambda: torch.nn.functional, {"dropout": _dropout_with_a_host_mask}
)


# torch's forward-mode AD keeps its state per process, not per thread: the
# dual level (`torch.autograd.forward_ad._current_level` and the C++ list of
# levels) and `torch._functorch.eager_transforms.JVP_NESTING`, by which
# `torch.func.jvp` decides whether to open a level or join an enclosing one.
# A `jvp` in a second thread then joins the first thread's level, which the
# first thread deletes when it finishes ("Trying to access a forward AD level
# with an invalid index"), or finds none ("Trying to create a dual Tensor for
# forward AD but no level exists"). kgrad's forward-mode transforms therefore
# run one thread at a time. The lock is re-entrant: nested transforms in one
# thread (`jacfwd` of `jvp`, a Hessian) take it again.
_forward_ad_lock = threading.RLock()


#: Wraps ``transform(*args)``'s result so each call holds ``_forward_ad_lock``.
_forward_mode = each_call_under(lambda: _forward_ad_lock)
#: Wraps ``transform(*args)``'s result so each call runs under :func:`transform_kernels`.
_with_transform_kernels = each_call_under(transform_kernels)
