"""Batching for kgrad's TensorFlow backend: ``tf.vectorized_map`` with a loop fallback."""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from kgrad.backends._tf_kernels import safe_pfor

tree = keras.tree


def convert(x):
    """Turns NumPy arrays, Python numbers and variables into ``tf.Tensor``."""
    if isinstance(x, tf.Tensor):
        return x
    return tf.convert_to_tensor(x)


def _move_first_axis_last(p, x):
    """(n, *out) with n = x.size -> (*out, *x.shape); shapes may be dynamic."""
    rank = len(p.shape)
    moved = tf.transpose(p, list(range(1, rank)) + [0])
    return tf.reshape(moved, tf.concat([tf.shape(p)[1:], tf.shape(x)], 0))


def _map(fn, elems):
    """``tf.vectorized_map`` where pfor can convert ``fn``; otherwise a loop."""
    try:
        with safe_pfor():
            return tf.vectorized_map(fn, elems, fallback_to_while_loop=True)
    except (ValueError, NotImplementedError, TypeError, tf.errors.OpError) as err:
        n = tree.flatten(elems)[0].shape[0]
        if n is None:
            raise
        from kgrad.backends._loop import warn_loop

        warn_loop(f"tf.vectorized_map failed ({type(err).__name__})", n)
        results = [fn(tree.map_structure(lambda e, i=i: e[i], elems)) for i in range(n)]
        return tree.map_structure(lambda *r: tf.stack(r), *results)


def vmap(f, in_axes=0, out_axes=0):
    """Maps ``f`` with ``tf.vectorized_map`` after moving each mapped axis to the front."""

    @functools.wraps(f)
    def wrapped(*args):
        # `kgrad.func.vmap` has checked `in_axes` against `args`, and the sizes of
        # the mapped axes of tensors (`_func_checks._check_mapped_axes`).
        axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        mapped, static = {}, {}
        for i, (a, ax) in enumerate(zip(args, axes)):
            if ax is None:
                static[i] = a
            else:
                leaves = tree.flatten(a)
                leaf_axes = [ax] * len(leaves) if isinstance(ax, int) else tree.flatten(ax)
                mapped[i] = (
                    a,
                    [
                        _moveaxis(convert(x), ax_, 0) if ax_ is not None else None
                        for x, ax_ in zip(leaves, leaf_axes)
                    ],
                    [convert(x) for x in leaves],
                )
        elems = {i: [m for m in moved if m is not None] for i, (_, moved, _) in mapped.items()}
        # Again after conversion: a Python list or number given as a mapped argument.
        sizes = {
            int(x.shape[0]) for group in elems.values() for x in group if x.shape[0] is not None
        }
        if len(sizes) > 1:
            raise ValueError(
                f"vmap got inconsistent sizes for the mapped axes. Received sizes: "
                f"{sorted(sizes)}. Make every mapped axis the same length."
            )

        def body(batch):
            call = []
            for i in range(len(args)):
                if i in static:
                    call.append(static[i])
                    continue
                a, moved, orig = mapped[i]
                it = iter(batch[i])
                leaves = [next(it) if m is not None else o for m, o in zip(moved, orig)]
                call.append(tree.pack_sequence_as(a, leaves))
            return f(*call)

        out = _map(body, elems)
        if isinstance(out_axes, int):
            return tree.map_structure(lambda o: _moveaxis(o, 0, out_axes), out)
        return tree.map_structure(
            lambda o, ax: o if ax is None else _moveaxis(o, 0, ax), out, out_axes
        )

    return wrapped


def _moveaxis(x, source, destination):
    if source == destination:  # also for a result of unknown rank (nested forward mode)
        return x
    rank = len(x.shape)
    source %= rank
    destination %= rank
    if source == destination:
        return x
    perm = [d for d in range(rank) if d != source]
    perm.insert(destination, source)
    return tf.transpose(x, perm)
