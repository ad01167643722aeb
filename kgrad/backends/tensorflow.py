"""kgrad's TensorFlow backend: JAX-style transforms built on tapes.

Reverse mode uses ``tf.GradientTape``, forward mode
``tf.autodiff.ForwardAccumulator`` and batching ``tf.vectorized_map`` (pfor,
with a loop as fallback). Tapes nest, so every transform composes with the
others to any order, inside and outside ``tf.function``.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from kgrad.backends._tf_compiled import compile_call  # noqa: F401 (the compile_call hook)
from kgrad.backends._tf_kernels import _exact_moments, safe_pfor
from kgrad.backends._tf_map import _map, _move_first_axis_last, convert, vmap

name = "tensorflow"

_ZERO = tf.UnconnectedGradients.ZERO
tree = keras.tree


def _dense(grads):
    """Gradients as dense tensors (gathers such as Embedding give ``IndexedSlices``)."""
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def _argnums_tuple(argnums):
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def _split_aux(out, has_aux):
    if has_aux:
        value, aux = out
        return value, aux
    return out, None


def _with_diff_args(args, argnums):
    """Converts the differentiated arguments; returns (args list, their leaves)."""
    args = list(args)
    leaves = []
    for i in _argnums_tuple(argnums):
        args[i] = tree.map_structure(convert, args[i])
        leaves.append(tree.flatten(args[i]))
    return args, leaves


def _pack(argnums, args, flat_per_arg):
    packed = tuple(
        tree.pack_sequence_as(args[i], flat)
        for i, flat in zip(_argnums_tuple(argnums), flat_per_arg)
    )
    return packed[0] if isinstance(argnums, int) else packed


def _split(flat, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


def value_and_grad(f, argnums=0, has_aux=False):
    """Reverse mode with one ``tf.GradientTape`` per call."""

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        args, leaves = _with_diff_args(args, argnums)
        flat = [leaf for group in leaves for leaf in group]
        with tf.GradientTape(watch_accessed_variables=False) as tape, _exact_moments():
            tape.watch(flat)
            out = f(*args, **kwargs)
        value, aux = _split_aux(out, has_aux)
        grads = _dense(tape.gradient(value, flat, unconnected_gradients=_ZERO))
        g = _pack(argnums, args, _split(grads, [len(group) for group in leaves]))
        return ((value, aux), g) if has_aux else (value, g)

    return wrapped


def grad(f, argnums=0, has_aux=False):
    """The gradient part of :func:`value_and_grad`."""
    inner = value_and_grad(f, argnums, has_aux)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        out, g = inner(*args, **kwargs)
        return (g, out[1]) if has_aux else g

    return wrapped


def vjp(f, *primals, has_aux=False):
    """Reverse mode with a persistent tape, so ``vjp_fn`` can be called many times."""
    argnums = tuple(range(len(primals)))
    args, leaves = _with_diff_args(primals, argnums)
    flat = [leaf for group in leaves for leaf in group]
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape, _exact_moments():
        tape.watch(flat)
        out = f(*args)
    value, aux = _split_aux(out, has_aux)
    out_flat = tree.flatten(value)

    def vjp_fn(cotangent):
        ct_flat = [tf.cast(convert(c), o.dtype) for c, o in zip(tree.flatten(cotangent), out_flat)]
        grads = _dense(
            tape.gradient(out_flat, flat, output_gradients=ct_flat, unconnected_gradients=_ZERO)
        )
        return _pack(argnums, args, _split(grads, [len(group) for group in leaves]))

    return (value, vjp_fn, aux) if has_aux else (value, vjp_fn)


# Raised inside a graph when a ForwardAccumulator meets a loop it cannot follow.
_ACCUMULATOR_ERRORS = (TypeError, ValueError, NotImplementedError)


def jvp(f, primals, tangents, has_aux=False):
    """Forward mode with ``tf.autodiff.ForwardAccumulator``.

    Inside a graph the accumulator cannot follow a ``while`` loop that carries
    a TensorList (Keras's LSTM and GRU: "`dtype` <dtype: 'variant'> is not
    compatible"); there the product is taken by two reverse passes instead
    (:func:`_jvp_by_two_vjps`), which gives the same numbers.
    """
    return _jvp(f, primals, tangents, has_aux, fallback=True)


def _jvp(f, primals, tangents, has_aux, fallback):
    primals = [tree.map_structure(convert, p) for p in primals]
    p_flat = tree.flatten(primals)
    t_flat = [tf.cast(convert(t), p.dtype) for t, p in zip(tree.flatten(tangents), p_flat)]
    try:
        with tf.autodiff.ForwardAccumulator(p_flat, t_flat) as acc, _exact_moments():
            out = f(*primals)
    except _ACCUMULATOR_ERRORS:
        if not fallback or tf.executing_eagerly():
            raise
        return _jvp_by_two_vjps(f, primals, p_flat, t_flat, has_aux)
    value, aux = _split_aux(out, has_aux)
    tangent_out = tree.map_structure(lambda o: acc.jvp(o, unconnected_gradients=_ZERO), value)
    return (value, tangent_out, aux) if has_aux else (value, tangent_out)


def nested_jvp(f, primals, tangents, has_aux=False, inner=0):
    """``jvp`` for one level of nested forward mode (the higher-order operators).

    By two reverse passes (:func:`_jvp_by_two_vjps`) at every level:
    ``ForwardAccumulator`` nested four deep fails inside TensorFlow (IndexError,
    SystemError in forwardprop), accumulators mixed with tapes fail eagerly
    ("returned too few gradients"), and nested tapes also trace several times
    faster (order 6 of a small model: 0.2 s against 18 s).
    """
    primals = [tree.map_structure(convert, p) for p in primals]
    p_flat = tree.flatten(primals)
    t_flat = [tf.cast(convert(t), p.dtype) for t, p in zip(tree.flatten(tangents), p_flat)]
    return _jvp_by_two_vjps(f, primals, p_flat, t_flat, has_aux)


def _jvp_by_two_vjps(f, primals, p_flat, t_flat, has_aux):
    """``J t`` as the pull-back of ``t`` through the linear map ``u -> J^T u``.

    ``u -> vjp(u)`` is linear in the cotangent ``u``, and its own vjp with ``t``
    is ``J t``. Reverse mode works through every op TensorFlow can differentiate.
    """
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        with tf.GradientTape(watch_accessed_variables=False) as inner, _exact_moments():
            inner.watch(p_flat)
            out = f(*primals)
        value, aux = _split_aux(out, has_aux)
        out_flat = tree.flatten(value)
        u = [tf.zeros_like(o) for o in out_flat]
        outer.watch(u)
        pulled = _dense(
            inner.gradient(out_flat, p_flat, output_gradients=u, unconnected_gradients=_ZERO)
        )
    tangent_flat = _dense(
        outer.gradient(pulled, u, output_gradients=t_flat, unconnected_gradients=_ZERO)
    )
    tangent_out = tree.pack_sequence_as(value, tangent_flat)
    return (value, tangent_out, aux) if has_aux else (value, tangent_out)


def _tape_jacobian(tape, target, source):
    try:
        with safe_pfor():
            return tape.jacobian(target, source, unconnected_gradients=_ZERO)
    except (ValueError, NotImplementedError, TypeError, tf.errors.OpError):
        # pfor cannot convert some ops; a while loop always works.
        return tape.jacobian(
            target, source, unconnected_gradients=_ZERO, experimental_use_pfor=False
        )


def jacrev(f, argnums=0, has_aux=False):
    """Reverse-mode Jacobian: ``tape.jacobian`` for every (output, input) leaf pair."""

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        args, leaves = _with_diff_args(args, argnums)
        flat = [leaf for group in leaves for leaf in group]
        with (
            tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape,
            _exact_moments(),
        ):
            tape.watch(flat)
            out = f(*args, **kwargs)
        value, aux = _split_aux(out, has_aux)

        def per_output(o):
            jac = [_tape_jacobian(tape, o, leaf) for leaf in flat]
            return _pack(argnums, args, _split(jac, [len(group) for group in leaves]))

        jac = tree.map_structure(per_output, value)
        return (jac, aux) if has_aux else jac

    return wrapped


def hessian(f, argnums=0):
    """Reverse over reverse: ``jacrev(grad(f))``.

    Forward over reverse would put a ``ForwardAccumulator`` around a tape, and
    inside a graph that cannot follow Keras's recurrent layers; nested tapes can.
    """
    return jacrev(grad(f, argnums=argnums), argnums=argnums)


def jacfwd(f, argnums=0, has_aux=False):
    """Forward-mode Jacobian: one ``jvp`` per input basis vector, batched with pfor.

    Where a graph's ForwardAccumulator cannot follow ``f`` (see :func:`jvp`), the
    Jacobian is built in reverse mode, which gives the same matrix.
    """
    forward = _jacfwd(f, argnums, has_aux)

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except _ACCUMULATOR_ERRORS:
            if tf.executing_eagerly():
                raise
            return jacrev(f, argnums, has_aux)(*args, **kwargs)

    return wrapped


def _jacfwd(f, argnums, has_aux):
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        args, leaves = _with_diff_args(args, argnums)
        nums = _argnums_tuple(argnums)
        flat = [leaf for group in leaves for leaf in group]

        def f_flat(*xs):
            new = list(args)
            for i, group in zip(nums, _split(list(xs), [len(g) for g in leaves])):
                new[i] = tree.pack_sequence_as(args[i], group)
            return f(*new, **kwargs)

        out = f_flat(*flat)
        value, aux = _split_aux(out, has_aux)
        out_flat = tree.flatten(value)
        columns = []  # per input leaf: list over outputs of out.shape + in.shape
        for j, x in enumerate(flat):
            n = x.shape.num_elements()
            if n is None:  # dynamic shape inside tf.function
                n = tf.size(x)
                basis = tf.reshape(tf.eye(n, dtype=x.dtype), tf.concat([[n], tf.shape(x)], 0))
            else:
                basis = tf.reshape(tf.eye(n, dtype=x.dtype), (n, *x.shape))

            def push(t, j=j):
                tangents = [t if k == j else tf.zeros_like(v) for k, v in enumerate(flat)]
                res = _jvp(f_flat, flat, tangents, has_aux, fallback=False)
                return tree.flatten(res[1])

            pushed = _map(push, basis)
            columns.append([_move_first_axis_last(p, x) for p in pushed])
        per_out = [[col[k] for col in columns] for k in range(len(out_flat))]
        jac = tree.pack_sequence_as(
            value,
            [_pack(argnums, args, _split(row, [len(g) for g in leaves])) for row in per_out],
        )
        return (jac, aux) if has_aux else jac

    return wrapped


def jit(f):
    """``tf.function`` with retracing kept down (shape-relaxed signatures).

    AutoGraph is off, as in ``jax.jit``: Python control flow runs at trace time.
    """
    return tf.function(f, reduce_retracing=True, autograph=False)


def inside_graph() -> bool:
    """Whether TensorFlow is building a graph (``fit``, a user's ``tf.function``).

    Then kgrad runs inline, so the outer graph holds the whole computation.
    Eagerly, an outer ``GradientTape`` differentiates through kgrad's
    ``tf.function`` like any other op.
    """
    return not tf.executing_eagerly()


def concrete(x):
    """``x`` as NumPy, or ``None`` for a symbolic (graph) tensor."""
    if isinstance(x, tf.Tensor) and not hasattr(x, "numpy"):
        return None
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def initialized(value) -> bool:
    """False for a ``tf.Variable`` whose initialiser has not run yet.

    A model built inside a ``tf.function`` (``fit``'s first step) gets
    variables whose initialisers run when the function does; read eagerly
    while it is traced, they give empty tensors.
    """
    if not isinstance(value, tf.Variable):
        return True
    with tf.init_scope():
        return bool(value.is_initialized())


def eager_scope():
    """Lifts out of a graph being built (``tf.init_scope``) into eager execution."""
    return tf.init_scope()


# Reverse over reverse for Hessian-vector products and per-sample Hessians: a
# ForwardAccumulator around a tape cannot follow Keras's LSTM/GRU inside a
# graph, and is slow in graphs and pathological under XLA (about 1.5 s per
# PINN train step against 15 ms for nested tapes).
hvp_mode = "rev"
per_sample_hessian_mode = "rev"

# This many directions or fewer are mapped with an unrolled loop: pfor's set-up
# costs more than a few tape pulls, and under XLA pfor's while-loop fallback is
# very slow (1.5 s against 10 ms per PINN train step).
UNROLL = 8


def batched_map(fn, stacked, fold=None):
    """A loop for a few directions, ``tf.vectorized_map`` for more (``fold`` is not needed)."""
    from kgrad.backends._loop import loop_map

    n = tree.flatten(stacked)[0].shape[0]
    if n is not None and n <= UNROLL:
        return loop_map(fn, stacked)
    return vmap(fn)(stacked)
