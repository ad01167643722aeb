"""Jacobian and Hessian building blocks shared by every backend.

Per-sample derivatives use the batch-sum trick: when samples are independent,
differentiating ``sum_b f(x)_b`` with respect to the whole batch gives every
sample's derivative at once, without mapping the model over samples (which
PyTorch's ``vmap`` cannot do for Keras's Conv2D).
"""

from __future__ import annotations

import math

import keras

from kgrad import backends as _backends
from kgrad import func

ops = keras.ops
tree = keras.tree


def _basis(shape, dtype, rows):
    """One-hot rows ``rows`` (a range) of the identity over ``shape``: (len(rows), *shape)."""
    n = math.prod(shape)
    eye = ops.one_hot(ops.arange(rows.start, rows.stop), n, dtype=dtype)
    return ops.reshape(eye, (len(rows), *shape))


def batched_map(fn, stacked):
    """``vmap(fn)(stacked)`` over directions, as the backend maps them (see its hook)."""
    return _backends.hook("batched_map")(fn, stacked)


def static_size(shape) -> int | None:
    """The number of elements of ``shape``, or None when an axis is unknown (a graph's batch)."""
    if any(d is None for d in shape):
        return None
    return math.prod(int(d) for d in shape)


def _dynamic_batch_error(what: str) -> ValueError:
    return ValueError(
        f"{what} in pieces needs to know how many pieces there are, but the batch axis is "
        f"dynamic here (a TensorFlow graph with an unknown batch size). Received: "
        f"chunk_size with a batch of unknown size. Drop `chunk_size`, or give the graph a "
        f"static batch size (e.g. `drop_remainder=True` in tf.data)."
    )


def jacobian(f, x, mode="rev", chunk_size=None):
    """Jacobian of ``f`` (tensor -> tensor) at tensor ``x``: ``out.shape + x.shape``."""
    n_in = static_size(tuple(x.shape))
    if mode == "fwd" and (chunk_size is None or n_in is None):
        if chunk_size is not None:
            raise _dynamic_batch_error("A forward-mode Jacobian")
        try:
            return func.jacfwd(f)(x)
        except Exception as err:
            if not _backends.hook("cannot_vmap")(err):
                raise
            # The backend cannot vectorise this model (torch's Conv2D): go by columns.
            chunk_size = n_in
    if mode == "rev":
        out, pullback = func.vjp(f, x)
        out_shape = tuple(out.shape)
        n = static_size(out_shape)
        if n is None:  # rows of unknown number (a dynamic batch in a graph)
            if chunk_size is not None:
                raise _dynamic_batch_error("A reverse-mode Jacobian")
            return func.jacrev(f)(x)
        if n == 1:  # one row: a single pull, no batching
            return ops.reshape(pullback(ops.ones_like(out))[0], (*out_shape, *ops.shape(x)))
        chunk_size = chunk_size or n  # all rows at once: jacrev, as vjp + vmap
        pieces = []
        for start in range(0, n, chunk_size):
            rows = range(start, min(start + chunk_size, n))
            cot = _basis(out_shape, out.dtype, rows)
            pieces.append(batched_map(lambda c: pullback(c)[0], cot))
        flat = ops.concatenate(pieces, axis=0)
        return ops.reshape(flat, (*out_shape, *ops.shape(x)))
    pieces = []
    for start in range(0, n_in, chunk_size):
        rows = range(start, min(start + chunk_size, n_in))
        tan = _basis(tuple(x.shape), x.dtype, rows)
        pieces.append(batched_map(lambda t: func.jvp(f, (x,), (t,))[1], tan))
    cols = ops.concatenate(pieces, axis=0)  # (n_in, *out)
    out_rank = len(cols.shape) - 1
    cols = ops.transpose(cols, (*range(1, out_rank + 1), 0))
    return ops.reshape(cols, (*ops.shape(cols)[:out_rank], *x.shape))


def per_sample_jacfwd(g, x, chunk_size=None):
    """Per-sample Jacobians in forward mode with broadcast one-hot tangents.

    ``g`` maps the batch ``x`` (B, *feat) to a batch-first output (B, *out) whose
    rows depend on their own sample only. The tangent one-hot at feature j in
    *every* sample pushes forward to every sample's Jacobian column j at once,
    so the cost is one forward pass per input feature, not per batch element.
    Returns (B, *out, *feat).
    """
    feat = tuple(x.shape[1:])
    n = math.prod(feat)
    b = ops.shape(x)[0]
    chunk = chunk_size or n
    pieces = []
    for start in range(0, n, chunk):
        rows = range(start, min(start + chunk, n))
        one = _basis(feat, x.dtype, rows)  # (c, *feat)
        tan = ops.broadcast_to(ops.expand_dims(one, 1), (len(rows), b, *feat))
        pieces.append(batched_map(lambda t: func.jvp(g, (x,), (t,))[1], tan))  # (c, B, *out)
    cols = ops.concatenate(pieces, axis=0)  # (n, B, *out)
    rank = len(cols.shape)
    cols = ops.transpose(cols, (*range(1, rank), 0))  # (B, *out, n)
    return ops.reshape(cols, (*ops.shape(cols)[:-1], *feat))


def per_sample_hessian_columns(g, x, chunk_size=None):
    """Per-sample second derivatives by forward-over-reverse with broadcast tangents.

    ``g`` maps the batch ``x`` (B, *feat) to a batch-summed first derivative of
    shape (*out, B, *feat). For every input feature j, the tangent that is one-hot
    at feature j in *every* sample gives, row by row, each sample's Hessian
    column j (cross-sample blocks are zero). Returns (B, *out, *feat, *feat).
    """
    if _backends.hook("per_sample_hessian_mode") == "rev":
        return _per_sample_hessian_rows(g, x, chunk_size)
    feat = tuple(x.shape[1:])
    n = math.prod(feat)
    b = ops.shape(x)[0]
    chunk = chunk_size or n
    pieces = []
    for start in range(0, n, chunk):
        rows = range(start, min(start + chunk, n))
        one = _basis(feat, x.dtype, rows)  # (c, *feat)
        tan = ops.broadcast_to(ops.expand_dims(one, 1), (len(rows), b, *feat))
        pieces.append(batched_map(lambda t: func.jvp(g, (x,), (t,))[1], tan))
    cols = ops.concatenate(pieces, axis=0)  # (n, *out, B, *feat)
    rank = len(cols.shape)
    n_out = rank - 2 - len(feat)
    # -> (B, *out, *feat, n)
    perm = (1 + n_out, *range(1, 1 + n_out), *range(2 + n_out, rank), 0)
    cols = ops.transpose(cols, perm)
    return ops.reshape(cols, (*ops.shape(cols)[:-1], *feat))


def _per_sample_hessian_rows(g, x, chunk_size=None):
    """:func:`per_sample_hessian_columns` by reverse over reverse.

    The cotangent one-hot at output ``o`` and feature ``j`` in every sample pulls
    back, through the batch-summed first derivative ``g``, to every sample's
    Hessian row ``(o, j)`` (cross-sample blocks are zero).
    """
    feat = tuple(x.shape[1:])
    b = ops.shape(x)[0]
    first, pullback = func.vjp(g, x)
    shape = tuple(first.shape)
    out = shape[: len(shape) - 1 - len(feat)]
    n = math.prod(out) * math.prod(feat)
    chunk = chunk_size or n
    pieces = []
    for start in range(0, n, chunk):
        rows = range(start, min(start + chunk, n))
        one = _basis((*out, *feat), first.dtype, rows)  # (c, *out, *feat)
        cot = ops.broadcast_to(ops.expand_dims(one, 1 + len(out)), (len(rows), *out, b, *feat))
        pieces.append(batched_map(lambda c: pullback(c)[0], cot))  # (c, B, *feat)
    rows_ = ops.concatenate(pieces, axis=0)  # (n, B, *feat)
    rows_ = ops.reshape(rows_, (*out, *feat, b, *feat))
    k = len(out) + len(feat)
    perm = (k, *range(k), *range(k + 1, k + 1 + len(feat)))
    return ops.transpose(rows_, perm)


def move_batch_first(j, n_out):
    """(*out, B, *feat) -> (B, *out, *feat)."""
    rank = len(j.shape)
    perm = (n_out, *range(n_out), *range(n_out + 1, rank))
    return ops.transpose(j, perm)
