"""Per-sample gradients of the loss: each sample's own loss term, differentiated alone.

``per_sample_grad(model, x, y)[b]`` is the gradient of the loss of the batch
that holds sample ``b`` alone (with its ``sample_weight``), computed for all
samples at once by mapping that gradient over the batch (``jax.vmap``,
``torch.func.vmap``, ``tf.vectorized_map``), which is what a hand-written
``vmap(grad)`` does. With Keras's default ``"sum_over_batch_size"`` reduction
the batch gradient is the mean of the per-sample ones.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kgrad import _batches, _compiled, _errors, _ghost, _jac, _loss, _memory, _tree, func
from kgrad._jacobian import _check_chunk

ops = keras.ops
tree = keras.tree

_WRT = ("weights", "inputs")


def per_sample_grad(
    model,
    x,
    y=None,
    *,
    loss=None,
    wrt="weights",
    layers=None,
    training=False,
    chunk_size=None,
    sample_weight=None,
):
    """Returns the gradient of each sample's own loss term.

    Sample ``b``'s gradient is that of the loss of a batch holding sample ``b``
    alone: every form of ``loss`` that ``model.compile`` accepts (``None``: the
    compiled loss, through ``model.compute_loss``, regularisation included),
    multi-output models included, and ``sample_weight`` applied as Keras
    applies ``fit``'s. With the default ``"sum_over_batch_size"`` reduction,
    the mean over samples is the batch gradient ``kgrad.grad(model, x,
    wrt="weights", y=y, loss=loss)``.

    Args:
        model: a built ``keras.Model``.
        x: the batch, or a stream of ``(x, y)`` batches (results concatenated).
        y: the targets.
        loss: a Keras loss in any form ``compile`` accepts; ``None`` uses the
            compiled loss.
        wrt: ``"weights"`` (default) or ``"inputs"``.
        layers: narrows the weights (as for :func:`kgrad.grad`).
        training: passed to the layers.
        chunk_size: at most this many samples at a time (then concatenated),
            to bound memory.
        sample_weight: one weight per sample, ``(B,)``.

    Returns:
        For ``"weights"``: a dict ``variable.path -> (B, *weight.shape)``. For
        ``"inputs"``: structured like ``x``.

    Raises:
        ValueError: samples that interact (BatchNormalization with
            ``training=True``, any layer mixing samples), no targets, a bad
            ``wrt``, ``chunk_size`` or ``sample_weight``, a result over the
            memory budget.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")],
    ...                          name="net")
    >>> x, y = np.array([[1.0, 0.0], [0.0, 2.0]], "float32"), np.zeros((2, 1), "float32")
    >>> g = kgrad.per_sample_grad(model, x, y, loss="mse")
    >>> tuple(g["net/d/kernel"].shape), tuple(g["net/d/bias"].shape)
    ((2, 2, 1), (2, 1))
    """
    if wrt not in _WRT:
        raise ValueError(
            f"`kgrad.per_sample_grad` differentiates each sample's loss with respect to the "
            f"weights or the inputs. Received: wrt={wrt!r}. Use one of {_WRT}."
        )
    options = dict(wrt=wrt, layers=layers, loss=loss, training=training, chunk_size=chunk_size)
    return _call("per_sample_grad", _per_sample_grad, model, x, y, sample_weight, options)


def per_sample_grad_norm(
    model,
    x,
    y=None,
    *,
    loss=None,
    layers=None,
    training=False,
    chunk_size=None,
    sample_weight=None,
):
    """Returns the L2 norm of each sample's loss gradient over the selected weights.

    The norm of :func:`per_sample_grad`'s gradients, sample by sample, over all
    the selected weights together: what DP-SGD clips, and what shows which
    samples carry large gradients. Exact in every case:

    - with an explicit ``loss``, a Dense, EinsumDense, Embedding, Conv1D or
      Conv2D layer of the model whose weights are all selected, called once
      in the forward pass, gets "ghost norms" (``kgrad._ghost``): from its
      inputs (a convolution's input patches) and the gradient of the summed
      per-sample losses with respect to its pre-activation output, which one
      backward pass gives, without a per-sample backward pass;
    - every other selected weight (other layer types, a compiled loss, which
      may add regularisation) gets its per-sample gradients, ``chunk_size``
      samples at a time (by default as many as a quarter of the memory budget
      holds), reduced to squared norms and dropped.

    Args:
        model: a built ``keras.Model``.
        x: the batch, or a stream of ``(x, y)`` batches (results concatenated).
        y: the targets.
        loss: a Keras loss in any form ``compile`` accepts; ``None`` uses the
            compiled loss.
        layers: narrows the weights (as for :func:`kgrad.grad`).
        training: passed to the layers.
        chunk_size: at most this many samples' gradients at a time.
        sample_weight: one weight per sample, ``(B,)``.

    Returns:
        A ``(B,)`` tensor of norms (float32).

    Raises:
        ValueError: as for :func:`per_sample_grad`.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    >>> _ = model.layers[0].kernel.assign(np.ones((2, 1)))
    >>> x, y = np.array([[1.0, 0.0], [0.0, 2.0]], "float32"), np.zeros((2, 1), "float32")
    >>> # mse of one sample: 2 (x . w) x, of norms 2 and 8
    >>> keras.ops.convert_to_numpy(kgrad.per_sample_grad_norm(model, x, y, loss="mse")).tolist()
    [2.0, 8.0]
    """
    options = dict(
        wrt="weights", layers=layers, loss=loss, training=training, chunk_size=chunk_size
    )
    return _call("per_sample_grad_norm", _per_sample_grad_norm, model, x, y, sample_weight, options)


def _call(fname, body, model, x, y, sample_weight, options):
    if y is None and not _batches.is_batches(x):
        raise ValueError(
            f"`kgrad.{fname}` differentiates each sample's loss, which needs the targets. "
            f"Received: y=None. Pass `y=` (and `loss=`, or compile the model)."
        )
    _check_chunk(options["chunk_size"])
    options = {**options, "has_sample_weight": sample_weight is not None}
    arrays = {"x": x, "y": y}
    if sample_weight is not None:
        arrays["sample_weight"] = sample_weight
    return _compiled.call(fname, body, model, arrays, options)


@_errors.model_level
def _per_sample_grad(req, arrays, options):
    wrt, chunk_size = options["wrt"], options["chunk_size"]
    one, stacked, batch = _mapped_gradient(req, wrt, _checked_sample_weight(req, arrays))
    if wrt == "weights":
        # The result, plus one chunk's gradients in flight.
        n, itemsize = _size_of(req.args()["weights"])
        rows = batch if chunk_size is None or batch is None else min(chunk_size, batch)
        _memory.check(
            "per-sample gradient",
            [(batch, n)],
            (rows or 1) * n * itemsize,
            itemsize,
            "per_sample_grad",
        )
    return _by_chunks(one, stacked, batch, chunk_size, lambda g: g)


@_errors.model_level
def _per_sample_grad_norm(req, arrays, options):
    sample_weight = _checked_sample_weight(req, arrays)
    weights = req.args(("weights",))["weights"]
    ghost = _ghost.ghost_layers(req, weights)
    total = None
    if ghost:  # the layers called once: ghost norms; the others: exact, below
        total, ghost = _ghost.squared_norms(req, weights, ghost, sample_weight)
    ghosted = {v.path for layer in ghost.values() for v in layer.trainable_variables}
    rest = [p for p in weights if p not in ghosted]
    if rest:
        exact = _exact_squared_norms(req, weights, sample_weight, options, rest)
        total = exact if total is None else total + exact
    if total is None:  # nothing selected (a frozen model, weightless layers): norms of nothing
        leaf = _tree.flatten(req.x)[0]
        zeros = ops.zeros_like(ops.cast(leaf, keras.config.floatx()))
        return (
            ops.sum(zeros, axis=tuple(range(1, len(leaf.shape)))) if len(leaf.shape) > 1 else zeros
        )
    return ops.sqrt(total)


def _exact_squared_norms(req, weights, sample_weight, options, only):
    """Squared norms over the weights ``only`` from their per-sample gradients, in chunks."""
    one, stacked, batch = _mapped_gradient(req, "weights", sample_weight, only)
    n, itemsize = _size_of([weights[p] for p in only])
    chunk_size = options["chunk_size"]
    if chunk_size is None:
        # As many samples at a time as a quarter of the memory budget holds.
        chunk_size = max(1, _memory.get_memory_budget() // (4 * max(n, 1) * itemsize))
    rows = batch if batch is None else min(chunk_size, batch)
    _memory.check(
        "per-sample gradient norm",
        [(batch,)],
        (rows or 1) * n * itemsize,
        itemsize,
        "per_sample_grad_norm",
    )

    def squares(g):
        return sum(
            ops.sum(ops.reshape(ops.square(ops.cast(leaf, "float32")), (ops.shape(leaf)[0], -1)), 1)
            for leaf in tree.flatten(g)
        )

    return _by_chunks(one, stacked, batch, chunk_size, squares)


def _checked_sample_weight(req, arrays):
    """Refuses samples that interact; returns the checked ``sample_weight`` (or None)."""
    req.check_per_sample(
        "Per-sample gradients", "drop the layers that mix samples, or use `kgrad.grad`"
    )
    sample_weight = arrays.get("sample_weight")
    if sample_weight is not None:
        _check_sample_weight(sample_weight, req.batch_size)
    return sample_weight


def _mapped_gradient(req, wrt, sample_weight, only=None):
    """``(one, stacked, batch)``: ``batched_map(one, stacked)`` gives the per-sample gradients.

    ``only``: the weight paths to differentiate (default: all selected).
    """
    args = req.args((wrt,))
    weights = args.get("weights")
    batch = req.batch_size

    def one(sample):
        xb, yb, wb = tree.map_structure(lambda t: ops.expand_dims(t, 0), sample)
        sub = dataclasses.replace(req, x=xb, y=yb, batch_size=1, sample_weight=wb)
        # Each sample's own loss, not a tf.distribute replica's share of it.
        if wrt == "weights":
            chosen = weights if only is None else {p: weights[p] for p in only}
            return func.grad(
                lambda w: _loss.unscaled(sub.objective({**args, "weights": {**weights, **w}}))
            )(chosen)
        g = func.grad(lambda xi: _loss.unscaled(sub.objective({"inputs": xi})))(xb)
        return tree.map_structure(lambda t: t[0], g)

    sw = sample_weight if sample_weight is not None else ops.ones((_batch_of(req.x),))
    return one, (req.x, req.y, sw), batch


def _by_chunks(one, stacked, batch, chunk_size, reduce):
    """``reduce(batched_map(one, chunk))`` for each chunk of ``chunk_size`` samples, joined."""
    if chunk_size is None or batch is None or chunk_size >= batch:
        return reduce(_jac.batched_map(one, stacked))
    parts = []
    for start in range(0, batch, chunk_size):
        piece = tree.map_structure(lambda t, s=start: t[s : s + chunk_size], stacked)
        parts.append(reduce(_jac.batched_map(one, piece)))
    return tree.map_structure(lambda *ls: ops.concatenate(ls, axis=0), *parts)


def _size_of(weights) -> tuple[int, int]:
    """``(number of values, largest itemsize)`` of a structure of tensors."""
    leaves = tree.flatten(weights)
    n = sum(math.prod(tuple(w.shape)) for w in leaves)
    return n, max((_itemsize(w) for w in leaves), default=4)


def _itemsize(t) -> int:
    return np.dtype(_errors.dtype_name(t)).itemsize


def _batch_of(x):
    return ops.shape(tree.flatten(x)[0])[0]


def _check_sample_weight(sample_weight, batch):
    shape = tuple(sample_weight.shape)
    if len(shape) != 1 or (batch is not None and shape[0] != batch):
        raise ValueError(
            f"`sample_weight` holds one weight per sample, shape ({batch},). Received: "
            f"sample_weight with shape {shape}. Pass a 1-D array as long as the batch."
        )
