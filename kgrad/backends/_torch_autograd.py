"""Plain ``torch.autograd`` gradients, where they give what ``torch.func`` gives.

Outside every ``torch.func`` transform, ``torch.func.grad`` wraps every tensor
the function touches; plain autograd gives the same numbers at less cost.
kgrad's PyTorch backend (``kgrad.backends.torch``) takes this path where
:func:`_plain_autograd_suffices` says it may, and for old-style
``autograd.Function`` s (Keras's ``ops.custom_gradient``), which
``torch.func`` refuses.
"""

from __future__ import annotations

import torch

from kgrad import _recording, _tree


def _autograd_value_and_grad(f, argnums, has_aux, args, kwargs, create_graph=True):
    """``value_and_grad`` by ``torch.autograd.grad``.

    Used for what ``torch.func`` refuses, and outside every ``torch.func``
    transform, where it gives the same numbers at less cost (``torch.func``
    wraps every tensor the function touches). ``create_graph=True`` keeps the
    result differentiable (an outer ``fit`` step or a second derivative can go
    through it); with ``False`` the value and aux are returned detached.
    """
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    args = list(args)
    leaves = []
    for i in nums:
        flat = [
            t if t.requires_grad else t.detach().requires_grad_(True)
            for t in _tree.flatten(args[i])
        ]
        args[i] = _tree.pack_sequence_as(args[i], flat)
        leaves.append(flat)
    # kgrad's model-level calls inside `f` keep their graphs, as they do inside
    # a torch.func transform (see kgrad._recording), so the gradient flows through them.
    enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(True)  # `torch.enable_grad()` without its wrapper objects
    try:
        with _recording.differentiable():
            out = f(*args, **kwargs)
    finally:
        torch._C._set_grad_enabled(enabled)
    value, aux = out if has_aux else (out, None)
    flat = [t for group in leaves for t in group]
    if flat and value.requires_grad:
        grads = torch.autograd.grad(value, flat, create_graph=create_graph, allow_unused=True)
    else:  # no argument (an empty dict of weights), or none that the value depends on
        grads = [None] * len(flat)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, flat)]
    if not create_graph:
        value = value.detach()
        if aux is not None:
            aux = _tree.map_structure(_detached, aux)
    packed, start = [], 0
    for i, group in zip(nums, leaves):
        packed.append(_tree.pack_sequence_as(args[i], grads[start : start + len(group)]))
        start += len(group)
    g = packed[0] if isinstance(argnums, int) else tuple(packed)
    return ((value, aux), g) if has_aux else (value, g)


def _detached(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _plain_autograd_suffices(args, argnums) -> bool:
    """Whether ``value_and_grad`` can take plain autograd's cheaper path.

    That is, under ``torch.no_grad()`` (where kgrad runs a plain model-level
    call, see ``eager_call``), outside every ``torch.func`` transform, for
    floating-point tensor arguments. There ``torch.func.grad`` differentiates
    ``f`` all the same and returns results without history, and so does plain
    autograd with ``create_graph=False``; nothing needs functorch's levels.
    With grad mode on, an outer graph may differentiate the result through
    tensors that ``f`` captures (a model's weights), which ``torch.func``
    tracks; anything else gets ``torch.func``'s own errors.
    """
    if torch.is_grad_enabled() or torch._C._functorch.maybe_current_level() is not None:
        return False
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    try:
        return all(_float_tensors(args[i]) for i in nums)
    except IndexError:
        return False


def _float_tensors(tree_) -> bool:
    """Whether every leaf of a tensor, dict, list or tuple is a float tensor (else False)."""
    if isinstance(tree_, torch.Tensor):
        return tree_.is_floating_point()
    if type(tree_) is dict:
        return all(_float_tensors(v) for v in tree_.values())
    if type(tree_) in (list, tuple):
        return all(_float_tensors(v) for v in tree_)
    return False  # other containers and leaves take torch.func's path
