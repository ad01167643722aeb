"""kgrad's PyTorch backend: ``torch.func``.

``torch.func`` already has JAX semantics (``argnums``, ``has_aux``, pytrees);
this module only renames a few arguments and converts NumPy inputs.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import keras
import numpy as np
import torch
import torch.func as tf_func

from kgrad import _recording, _tree
from kgrad.backends._torch_autograd import (
    _autograd_value_and_grad,
    _detached,
    _plain_autograd_suffices,
)
from kgrad.backends._torch_kernels import (
    _forward_ad_lock,
    _forward_mode,
    _with_transform_kernels,
    host_dropout_masks,
    transform_kernels,
)

name = "torch"
#: Each Hessian-vector product of one batch is a backward pass through one
#: retained double-backward graph (see ``_contract.Backend.reusable_hvp``).
reusable_hvp = True


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


def scope_ready(value, variable) -> bool:
    """A tensor of the variable's dtype and shape on its device: Keras would not convert it."""
    own = variable._value
    return (
        isinstance(value, torch.Tensor)
        and own is not None
        and value.dtype == own.dtype
        and value.device == own.device
        and value.shape == own.shape
    )


def grad(f, argnums=0, has_aux=False):
    """``torch.func.grad``; plain autograd where ``f`` holds an old-style Function."""
    inner = value_and_grad(f, argnums=argnums, has_aux=has_aux)

    def wrapped(*args, **kwargs):
        out, g = inner(*args, **kwargs)
        return (g, out[1]) if has_aux else g

    return wrapped


def jvp(f, primals, tangents, has_aux=False):
    """``torch.func.jvp``, on kernels whose derivatives compose (see ``transform_kernels``).

    Runs one thread at a time (torch's forward-mode state is per process, see
    ``_forward_ad_lock``); so does any ``vmap`` of a function calling it, for
    the duration of each ``jvp``. Reverse-mode transforms in other threads
    run meanwhile.
    """
    with _forward_ad_lock, transform_kernels():
        return tf_func.jvp(f, primals, tangents, has_aux=has_aux)


def vjp(f, *primals, has_aux=False):
    """``torch.func.vjp``; the forward pass runs on kernels whose derivatives compose."""
    with transform_kernels():
        return tf_func.vjp(f, *primals, has_aux=has_aux)


jacfwd = _forward_mode(_with_transform_kernels(tf_func.jacfwd))
jacfwd.__doc__ = (
    "``torch.func.jacfwd`` on kernels whose derivatives compose; one thread at a time "
    "(torch's forward-mode state is per process, see ``_forward_ad_lock``)."
)
jacrev = _with_transform_kernels(tf_func.jacrev)
jacrev.__doc__ = "``torch.func.jacrev`` on kernels whose derivatives compose."


def value_and_grad(f, argnums=0, has_aux=False):
    """``torch.func.grad_and_value`` with JAX's order of results.

    Outside every ``torch.func`` transform, and where ``f`` runs an
    old-style ``autograd.Function`` (Keras's ``ops.custom_gradient`` on torch),
    which ``torch.func`` refuses, the gradient is taken with
    ``torch.autograd.grad`` instead (see ``_plain_autograd_suffices``).
    """

    def wrapped(*args, **kwargs):
        if _plain_autograd_suffices(args, argnums):
            return _autograd_value_and_grad(f, argnums, has_aux, args, kwargs, create_graph=False)
        try:
            g, value = tf_func.grad_and_value(f, argnums=argnums, has_aux=has_aux)(*args, **kwargs)
        except RuntimeError as err:
            if not _old_style_function(err):
                raise
            # Keras's `ops.custom_gradient` (an old-style autograd.Function):
            # first-order gradients by plain autograd; torch.func transforms
            # (vmap, jvp) of such a model still fail, with torch's message.
            return _autograd_value_and_grad(f, argnums, has_aux, args, kwargs)
        return value, g

    return wrapped


#: The ``randomness`` values :func:`vmap` takes (see ``kgrad.func.vmap``).
vmap_randomness = ("same", "different")


def vmap(f, in_axes=0, out_axes=0, randomness="same"):
    """``torch.func.vmap``; random ops draw the same values for every example by default.

    ``randomness="same"`` is what JAX and TensorFlow do with an unmapped seed,
    so ``kgrad.func.vmap`` means the same on every backend; ``"different"``
    draws per example. A ``jvp`` (or ``jacfwd``) inside the mapped function
    holds the forward-mode lock while it runs (see ``_forward_ad_lock``), the
    rest of the map does not.
    """
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if isinstance(out_axes, list):
        out_axes = tuple(out_axes)
    return _with_transform_kernels(tf_func.vmap)(
        f, in_dims=in_axes, out_dims=out_axes, randomness=randomness
    )


def _vmap_unsupported(err: RuntimeError) -> bool:
    return "vmap" in str(err)


def hessian(f, argnums=0):
    """Forward over reverse, ``jacfwd(grad(f))``; reverse over reverse where ``vmap`` fails.

    The inner derivative is ``grad``, not ``jacrev``: for a scalar ``f`` it is
    one backward pass instead of a mapped one, and its derivatives are right
    even on torch 2.13's fused layer norm, whose mapped backward differentiates
    wrongly (see :func:`transform_kernels`, which also guards ``jacrev``).

    ``torch.func.jacfwd`` maps the forward pass with ``vmap``, which fails inside
    Keras's Conv2D ("Tensor.clone(memory_format) inside vmap"). Reverse over
    reverse maps only backward passes, which work; the Hessian is the same.

    Forward over reverse runs one thread at a time, as ``jacfwd`` does (torch's
    forward-mode state is per process, see ``_forward_ad_lock``); reverse over
    reverse does not need to.
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


def eager_call(f, arrays):
    """Runs a model-level call; see :mod:`kgrad._recording` for when it keeps a graph.

    Inside ``torch.compile`` (Keras's ``jit_compile=True``), kgrad's part of the
    step runs eagerly: ``torch.compile`` miscompiles some forward-mode
    ``torch.func`` code ("ZeroTensors are immutable"); autograd still flows
    through it, and the rest of the step stays compiled.
    """
    if torch.compiler.is_compiling():
        return torch.compiler.disable(f, recursive=True)()
    record = torch.is_grad_enabled() and (
        _recording.requested()
        or any(isinstance(t, torch.Tensor) and t.requires_grad for t in _leaves(arrays))
        or torch._C._functorch.maybe_current_level() is not None
        or _recording.in_training_step()
    )
    if record:
        return f()
    enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # `torch.no_grad()` without its wrapper objects
    try:
        out = f()
    finally:
        torch._C._set_grad_enabled(enabled)
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in _tree.flatten(out)):
        return out  # made under no_grad: nothing to detach (the common case)
    return _tree.map_structure(_detached, out)


def _leaves(arrays) -> list:
    """The arrays of ``{"x": ..., "y": ...}`` (``None`` entries left out), or of any structure."""
    if type(arrays) is dict:
        return _tree.flatten([v for v in arrays.values() if v is not None])
    return _tree.flatten(arrays)


def concrete(x):
    """``x`` as NumPy, or ``None`` inside a ``torch.func`` transform (a wrapped tensor)."""
    if isinstance(x, torch.Tensor):
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return None
        return x.detach().cpu().numpy()
    return np.asarray(x)


@contextlib.contextmanager
def eager_scope():
    """Plain tensors and no graph, also inside a ``torch.func`` transform."""
    with torch._C._DisableFuncTorch(), torch.no_grad():
        yield


def no_grad():
    """``torch.no_grad()``: values without a graph."""
    return torch.no_grad()


def cannot_vmap(err: Exception) -> bool:
    """torch's ``vmap`` fails inside some Keras layers (Conv2D's channels-last clone)."""
    return isinstance(err, RuntimeError) and "vmap" in str(err)


def batched_map(fn, stacked, fold=None):
    """``torch.func.vmap`` over directions, on the transform kernels; a fold or loop if it fails.

    The mapped axis runs over directions (Jacobian rows or columns) of one
    function, so random ops (Dropout with ``training=True``) draw the same
    values for every direction, as in the unmapped forward pass. Where
    ``vmap`` cannot map the model (Keras's Conv2D), ``fold(stacked)`` computes
    the directions as copies of the batch in one pass (per-sample derivatives
    with respect to the inputs, see ``kgrad._jac._folded_jvp``); other maps
    loop over the directions, with a warning.
    """
    from kgrad.backends._loop import loop_map, warn_loop

    try:
        with transform_kernels():
            return tf_func.vmap(fn, randomness="same")(stacked)
    except RuntimeError as err:
        if not cannot_vmap(err):
            raise
        if fold is not None:
            with transform_kernels():
                return fold(stacked)
        n = keras.tree.flatten(stacked)[0].shape[0]
        warn_loop(f"torch.func.vmap cannot vectorise this model ({str(err).splitlines()[0]})", n)
        return loop_map(fn, stacked)


def call_seed(model) -> int:
    """A seed determined by the model's random state, read without advancing it.

    Keras's unseeded Dropout on PyTorch draws from torch's global generator,
    not from the layer's seed state (which then never changes), so the global
    generator's state is part of the seed: whatever advances the random state
    (a training-mode forward pass, ``fit``'s step, a user's draw) gives kgrad
    a new mask, as the seed states do on JAX and TensorFlow, while repeated
    kgrad calls in between see the same one.
    """
    values = [
        int(n)
        for v in model.variables
        if "seed_generator" in v.path
        for n in keras.ops.convert_to_numpy(v.value).ravel()
    ]
    with _rng_lock:  # not while another thread's `seeded` holds its re-seeded state
        states = [torch.random.get_rng_state()]
        if torch.cuda.is_initialized():  # Dropout on a GPU draws from the CUDA generators
            states += [s.cpu() for s in torch.cuda.get_rng_state_all()]
        global_state = hash(b"".join(s.numpy().tobytes() for s in states))
    return hash((tuple(values), global_state)) & 0x7FFF_FFFF_FFFF_FFFF


_rng_lock = threading.RLock()


@contextlib.contextmanager
def seeded(seed):
    """Starts every forward pass of a kgrad call from the same random state.

    Re-seeding a forked generator makes every forward pass of one call (value,
    gradient, each Jacobian column, each finite difference) draw the same
    Dropout mask. The global generator is restored afterwards; forward passes
    that re-seed it run one thread at a time. With a GPU, unseeded Dropout
    masks are drawn on the host (``_torch_kernels.host_dropout_masks``).
    """
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    masks = host_dropout_masks() if devices else contextlib.nullcontext()
    with _rng_lock, torch.random.fork_rng(devices=devices), masks:
        torch.manual_seed(seed)
        yield
