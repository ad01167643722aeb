"""kgrad's JAX backend: the JAX transforms themselves.

Each transform traces with Keras's recurrent layers on their scan loop, never
on cuDNN (``_jax_kernels.scan_recurrent_layers``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np

from kgrad.backends._jax_kernels import scan_recurrent_layers
from kgrad.backends._swaps import each_call_under

name = "jax"
_on_the_scan_loop = each_call_under(scan_recurrent_layers)
#: Every forward pass of a kgrad call runs recurrent layers on their scan loop.
forward_scope = scan_recurrent_layers


def convert(x):
    """Turns NumPy arrays and Python numbers into ``jax.Array`` (tracers pass through)."""
    if isinstance(x, jax.Array):
        return x
    return jnp.asarray(x)


grad = _on_the_scan_loop(jax.grad)
value_and_grad = _on_the_scan_loop(jax.value_and_grad)
jacrev = _on_the_scan_loop(jax.jacrev)
jacfwd = _on_the_scan_loop(jax.jacfwd)
vmap = _on_the_scan_loop(jax.vmap)
jit = jax.jit


def vjp(f, *primals, **kwargs):
    """``jax.vjp``, tracing ``f`` with recurrent layers on their scan loop."""
    with scan_recurrent_layers():
        return jax.vjp(f, *primals, **kwargs)


def jvp(f, primals, tangents, **kwargs):
    """``jax.jvp``, tracing ``f`` with recurrent layers on their scan loop."""
    with scan_recurrent_layers():
        return jax.jvp(f, primals, tangents, **kwargs)


def compile_call(f):
    """``jax.jit``: every variable value is an argument, so results never go stale."""
    return jax.jit(f)


def concrete(x):
    """``x`` as NumPy, or ``None`` for a tracer."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def eager_scope():
    """Ops on concrete values run at once, also inside a ``jax.jit`` trace."""
    return jax.ensure_compile_time_eval()


def taylor_series(g, x, v, order):
    """``[g, D_v g, ..., D_v^order g]`` by ``jax.experimental.jet`` (Taylor mode).

    Returns None where ``jet`` has no rule for an operation of ``g`` (ReLU's
    and softplus's custom derivatives, for one) or ``g`` returns several
    tensors; kgrad then nests ``jax.jvp``.
    """
    from jax.experimental import jet

    zeros = jnp.zeros_like(v)
    try:
        with scan_recurrent_layers():
            y0, terms = jet.jet(g, (x,), ((v, *([zeros] * (order - 1))),))
    except Exception:  # no jet rule (or a rule that leaks a tracer): nest jvp instead
        return None
    if not isinstance(y0, jax.Array) or len(terms) != order:
        return None
    return [y0, *terms]


def lay_out(arrays):
    """Batches laid out with ``keras.distribution``'s data layout (``_jax_layout``)."""
    if keras.distribution.distribution() is None:  # the common case: as given
        return arrays
    from kgrad.backends import _jax_layout

    return _jax_layout.lay_out(arrays)


def place_results(out, variables, arrays):
    """Results constrained to their layouts under ``keras.distribution`` (``_jax_layout``)."""
    from kgrad.backends import _jax_layout

    return _jax_layout.place_results(out, variables, arrays)


def distributed():
    """Whether a ``keras.distribution`` is set (``_contract.Backend.distributed``)."""
    return keras.distribution.distribution() is not None
