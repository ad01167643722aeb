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


def batched_map(fn, stacked, fold=None):
    """``vmap(fn)(stacked)`` over directions, as the backend maps them (see its hook).

    ``fold(stacked)``, where given, computes the same without mapping (the
    directions folded into the batch axis, see :func:`_folded_jvp`); a backend
    that cannot vectorise ``fn`` uses it instead of a loop over directions.
    """
    return _backends.hook("batched_map")(fn, stacked, fold=fold)


def _folded_jvp(f, struct, tangents, trailing=None):
    """``vmap(lambda t: flatten(jvp(f, (struct,), (t,))[1]))(tangents)`` without a map.

    Valid where ``f``'s rows depend on their own sample only. Every leaf ``k``
    of its output has the batch axis first, or, with ``trailing``, followed by
    ``trailing[k]`` axes. The ``c`` directions of ``tangents`` (leaves
    (c, B, *feat)) become ``c`` copies of the batch; one ``jvp`` of ``f`` on
    c * B samples gives every direction's rows, which are split back. A backend
    that cannot vectorise the model (torch's ``vmap`` through Keras's Conv2D)
    runs this, one pass per chunk of directions, instead of one pass per
    direction. Returns the flat list of output leaves, directions first.
    """
    leaves = tree.flatten(struct)
    flat_t = tree.flatten(tangents)
    c, b = int(flat_t[0].shape[0]), ops.shape(leaves[0])[0]

    def tile(leaf):  # (c * B, *feat): c copies of the batch, in memory of their own
        return ops.tile(leaf, (c, *([1] * (len(leaf.shape) - 1))))

    tiled = _pack_like(struct, [tile(leaf) for leaf in leaves])
    # The tangents are broadcast over the batch; a copy has memory of its own too.
    folded = [ops.copy(ops.reshape(t, (c * b, *tuple(t.shape)[2:]))) for t in flat_t]
    folded = _pack_like(struct, folded)
    results = []
    for k, o in enumerate(tree.flatten(func.jvp(f, (tiled,), (folded,))[1])):
        shape = tuple(ops.shape(o))
        lead = 0 if trailing is None else len(shape) - 1 - trailing[k]
        o = ops.reshape(o, (*shape[:lead], c, b, *shape[lead + 1 :]))
        results.append(ops.moveaxis(o, lead, 0))  # (c, *out, B, ...)
    return results


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


def per_sample_hessian_blocks(g, struct, chunk_size=None, foldable=False):
    """Per-sample Hessian blocks of every leaf of ``struct``, in one mapped pass.

    ``g`` maps ``struct`` (leaves (B, *feat_k)) to its batch-summed first
    derivative, structured like ``struct`` (leaves (*out, B, *feat_k)). Each
    direction is one-hot at one feature of one leaf in *every* sample: pushed
    forward through ``g``, it gives, row by row, each sample's Hessian column
    (cross-sample blocks are zero, since samples are independent). So the model
    runs once for every leaf, not once per leaf, and once per feature, not per
    batch element. Returns one (B, *out, *feat_k, *feat_k) block per leaf:
    the second derivative with respect to that leaf (the cross-leaf blocks are
    not returned). ``foldable``: ``struct`` is the model's whole input and ``g``
    sums the samples without weighting them (no loss), so a backend that cannot
    map the model may fold the directions into the batch (:func:`_folded_jvp`).
    """
    leaves = tree.flatten(struct)
    if _backends.hook("per_sample_hessian_mode") == "rev":
        return _per_sample_hessian_blocks_rev(g, struct, leaves, chunk_size)
    feats = [tuple(leaf.shape[1:]) for leaf in leaves]
    batch = ops.shape(leaves[0])[0]
    sizes = [math.prod(f) for f in feats]
    total = sum(sizes)
    chunk = chunk_size or total
    fold = None
    if foldable:
        trailing = [len(f) for f in feats]
        fold = lambda t: _folded_jvp(g, struct, t, trailing)  # noqa: E731
    pieces = [[] for _ in leaves]
    for start in range(0, total, chunk):
        rows = range(start, min(start + chunk, total))
        tangents = _pack_like(struct, _pytree_tangents(leaves, rows, 1, batch))
        cols = batched_map(lambda t: tree.flatten(func.jvp(g, (struct,), (t,))[1]), tangents, fold)
        _keep_own_rows(pieces, cols, sizes, rows)
    results = []
    for feat, part in zip(feats, pieces):
        cols = ops.concatenate(part, axis=0)  # (n_k, *out, B, *feat_k)
        rank = len(cols.shape)
        n_out = rank - 2 - len(feat)
        perm = (1 + n_out, *range(1, 1 + n_out), *range(2 + n_out, rank), 0)
        cols = ops.transpose(cols, perm)  # (B, *out, *feat_k, n_k)
        results.append(ops.reshape(cols, (*ops.shape(cols)[:-1], *feat)))
    return results


def _per_sample_hessian_blocks_rev(g, struct, leaves, chunk_size):
    """:func:`per_sample_hessian_blocks` by reverse over reverse (one ``vjp`` for all leaves).

    The cotangent one-hot at output ``o`` and feature ``j`` of one leaf in every
    sample pulls back, through ``g``, to every sample's Hessian row ``(o, j)``.
    """
    feats = [tuple(leaf.shape[1:]) for leaf in leaves]
    b = ops.shape(leaves[0])[0]
    first, pullback = func.vjp(g, struct)
    flat_first = tree.flatten(first)
    shape = tuple(flat_first[0].shape)
    out = shape[: len(shape) - 1 - len(feats[0])]
    sizes = [math.prod(out) * math.prod(f) for f in feats]
    total = sum(sizes)
    chunk = chunk_size or total
    pieces = [[] for _ in leaves]
    for start in range(0, total, chunk):
        rows = range(start, min(start + chunk, total))
        cots, offset = [], 0
        for f, n, like in zip(feats, sizes, flat_first):
            one = _one_hot_rows(rows, offset, (*out, *f), like.dtype)  # (c, *out, *f_k)
            one = ops.expand_dims(one, 1 + len(out))
            cots.append(ops.broadcast_to(one, (len(rows), *out, b, *f)))
            offset += n
        cot = _pack_like(first, cots)
        pulled = batched_map(lambda c: tree.flatten(pullback(c)[0]), cot)  # (c, B, *feat_k)
        _keep_own_rows(pieces, pulled, sizes, rows)
    results = []
    for f, part in zip(feats, pieces):
        rows_ = ops.concatenate(part, axis=0)  # (n_k, B, *feat_k)
        rows_ = ops.reshape(rows_, (*out, *f, b, *f))
        k = len(out) + len(f)
        results.append(ops.transpose(rows_, (k, *range(k), *range(k + 1, k + 1 + len(f)))))
    return results


def _keep_own_rows(pieces, mapped, sizes, rows):
    """Appends to ``pieces[k]`` the rows of ``mapped[k]`` whose direction lies in leaf ``k``."""
    offset = 0
    for k, n in enumerate(sizes):
        lo, hi = max(offset, rows.start), min(offset + n, rows.stop)
        if hi > lo:
            pieces[k].append(mapped[k][lo - rows.start : hi - rows.start])
        offset += n


def _pack_like(struct, flat):
    """``tree.pack_sequence_as(struct, flat)`` with dict keys in ``struct``'s order.

    ``keras.tree`` packs dicts in sorted key order; ``torch.func`` needs tangents
    with exactly the primals' structure, key order included.
    """
    packed = tree.pack_sequence_as(struct, flat)

    def reorder(template, value):
        if isinstance(template, dict):
            return {k: reorder(template[k], value[k]) for k in template}
        if isinstance(template, (list, tuple)) and not hasattr(template, "shape"):
            return type(template)(reorder(t, v) for t, v in zip(template, value))
        return value

    return reorder(struct, packed)


def _split_columns(cols, leaves, lead):
    """Splits ``cols`` (n_total, ...) into one (size_i, ...) piece per leaf.

    ``lead`` is how many leading axes of each leaf are not differentiated
    (1 for a per-sample batch axis), so leaf ``i`` owns ``prod(shape[lead:])``
    consecutive directions.
    """
    sizes = [math.prod(tuple(leaf.shape)[lead:]) for leaf in leaves]
    pieces, start = [], 0
    for n in sizes:
        pieces.append(cols[start : start + n])
        start += n
    return pieces


def _one_hot_rows(rows, offset, shape, dtype):
    """Directions ``rows`` of a concatenation, restricted to the part at ``offset`` of ``shape``.

    Row ``r`` is one-hot at element ``r - offset`` of ``shape`` where that lies in
    it, and all zero where the direction belongs to another part (no negative
    ``one_hot`` indices). Returns (len(rows), *shape).
    """
    hot = ops.equal(
        ops.expand_dims(ops.arange(rows.start, rows.stop) - offset, 1),
        ops.expand_dims(ops.arange(math.prod(shape)), 0),
    )
    return ops.reshape(ops.cast(hot, dtype), (len(rows), *shape))


def _pytree_tangents(leaves, rows, lead, batch=None):
    """One-hot tangents for directions ``rows`` over every leaf at once.

    Direction ``k`` is one-hot at feature ``k`` of the concatenated features
    ``leaf.shape[lead:]`` of all leaves; with ``lead == 1`` it is broadcast over
    the batch axis (size ``batch``). Returns one (len(rows), *leaf.shape) tensor
    per leaf.
    """
    tangents, start = [], 0
    for leaf in leaves:
        feat = tuple(leaf.shape)[lead:]
        n = math.prod(feat)
        one = _one_hot_rows(rows, start, feat, leaf.dtype)
        if lead:
            one = ops.broadcast_to(ops.expand_dims(one, 1), (len(rows), batch, *feat))
        tangents.append(one)
        start += n
    return tangents


def pytree_jacfwd(f, struct, per_sample, chunk_size=None, foldable=False):
    """Forward-mode Jacobians of ``f`` (pytree -> tensor) for every leaf of ``struct``.

    All leaves are differentiated together: each direction is one-hot in one
    leaf, so the (mapped) forward pass runs once for all of them, not once per
    leaf. With ``per_sample`` every leaf is batch-first (B, *feat), the output
    is batch-first and rows depend on their own sample only; the tangents are
    broadcast over the batch, so one direction per feature gives every
    sample's column. Returns a list of (B, *out, *feat) per leaf, or
    (*out, *leaf.shape) without ``per_sample``. ``foldable``: ``struct`` is the
    model's whole input, so a backend that cannot map the model may fold the
    directions into the batch (:func:`_folded_jvp`).
    """
    leaves = tree.flatten(struct)
    lead = 1 if per_sample else 0
    batch = ops.shape(leaves[0])[0] if per_sample else None
    total = sum(math.prod(tuple(leaf.shape)[lead:]) for leaf in leaves)
    chunk = chunk_size or total
    pieces = []
    fold = None
    if foldable and per_sample:
        fold = lambda t: _folded_jvp(f, struct, t)[0]  # noqa: E731
    for start in range(0, total, chunk):
        rows = range(start, min(start + chunk, total))
        tangents = _pack_like(struct, _pytree_tangents(leaves, rows, lead, batch))
        pieces.append(batched_map(lambda t: func.jvp(f, (struct,), (t,))[1], tangents, fold))
    cols = ops.concatenate(pieces, axis=0)  # (total, *out) or (total, B, *out)
    rank = len(cols.shape)
    results = []
    for leaf, part in zip(leaves, _split_columns(cols, leaves, lead)):
        moved = ops.transpose(part, (*range(1, rank), 0))  # (..., size)
        results.append(ops.reshape(moved, (*ops.shape(moved)[:-1], *tuple(leaf.shape)[lead:])))
    return results


def pytree_jacrev(out, pullback, struct, per_sample, chunk_size=None):
    """Reverse-mode Jacobians of an output for every leaf of ``struct`` at once.

    ``out`` and ``pullback`` come from one ``func.vjp`` over the whole pytree,
    so the forward pass runs once for all leaves. With ``per_sample`` the
    output is batch-first (B, *rows) and rows depend on their own sample only:
    the cotangent one-hot at row ``r`` in every sample pulls back to every
    sample's row ``r``. Returns a list of (B, *rows, *feat) per leaf, or
    (*out, *leaf.shape) without ``per_sample``.
    """
    leaves = tree.flatten(struct)
    out_shape = tuple(out.shape)
    rows_shape = out_shape[1:] if per_sample else out_shape
    n = math.prod(rows_shape)
    if n == 1:  # one row: a single pull, no batching
        pulled = tree.flatten(pullback(ops.ones_like(out))[0])
        return [
            ops.reshape(g, (ops.shape(leaf)[0], *rows_shape, *tuple(leaf.shape)[1:]))
            if per_sample
            else ops.reshape(g, (*out_shape, *ops.shape(leaf)))
            for g, leaf in zip(pulled, leaves)
        ]
    chunk = chunk_size or n
    pieces = []
    for start in range(0, n, chunk):
        rows = range(start, min(start + chunk, n))
        cot = _basis(rows_shape, out.dtype, rows)  # (c, *rows)
        if per_sample:
            c = len(rows)
            cot = ops.broadcast_to(ops.expand_dims(cot, 1), (c, *ops.shape(out)))
        pieces.append(batched_map(lambda c: tree.flatten(pullback(c)[0]), cot))
    results = []
    for i, leaf in enumerate(leaves):
        flat = ops.concatenate([p[i] for p in pieces], axis=0)  # (n, *leaf.shape)
        jac = ops.reshape(flat, (*rows_shape, *ops.shape(leaf)))
        results.append(move_batch_first(jac, len(rows_shape)) if per_sample else jac)
    return results


def move_batch_first(j, n_out):
    """(*out, B, *feat) -> (B, *out, *feat)."""
    rank = len(j.shape)
    perm = (n_out, *range(n_out), *range(n_out + 1, rank))
    return ops.transpose(j, perm)
