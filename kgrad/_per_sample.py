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

from kgrad import _compiled, _errors, _jac, _memory, func
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
    if y is None and not _is_stream(x):
        raise ValueError(
            "`kgrad.per_sample_grad` differentiates each sample's loss, which needs the "
            "targets. Received: y=None. Pass `y=` (and `loss=`, or compile the model)."
        )
    _check_chunk(chunk_size)
    options = dict(
        wrt=wrt,
        layers=layers,
        loss=loss,
        training=training,
        chunk_size=chunk_size,
        has_sample_weight=sample_weight is not None,
    )
    arrays = {"x": x, "y": y}
    if sample_weight is not None:
        arrays["sample_weight"] = sample_weight
    return _compiled.call("per_sample_grad", _per_sample_grad, model, arrays, options)


def _is_stream(x) -> bool:
    from kgrad import _batches

    return _batches.is_batches(x)


@_errors.model_level
def _per_sample_grad(req, arrays, options):
    wrt, chunk_size = options["wrt"], options["chunk_size"]
    req.check_per_sample(
        "Per-sample gradients", "drop the layers that mix samples, or use `kgrad.grad`"
    )
    args = req.args()
    weights = args.get("weights")
    sample_weight = arrays.get("sample_weight")
    batch = req.batch_size
    if sample_weight is not None:
        sample_weight = _check_sample_weight(sample_weight, batch)
    if wrt == "weights":
        # The result, plus one chunk's gradients in flight.
        n = sum(math.prod(tuple(w.shape)) for w in tree.flatten(weights))
        itemsize = max((_itemsize(w) for w in tree.flatten(weights)), default=4)
        rows = batch if chunk_size is None or batch is None else min(chunk_size, batch)
        _memory.check(
            "per-sample gradient",
            [(batch, n)],
            (rows or 1) * n * itemsize,
            itemsize,
            "per_sample_grad",
        )

    def one(sample):
        xb, yb, wb = tree.map_structure(lambda t: ops.expand_dims(t, 0), sample)
        sub = dataclasses.replace(req, x=xb, y=yb, batch_size=1, sample_weight=wb)
        if wrt == "weights":
            return func.grad(lambda w: sub.objective({**args, "weights": w}))(weights)
        g = func.grad(lambda xi: sub.objective({"inputs": xi}))(xb)
        return tree.map_structure(lambda t: t[0], g)

    sw = sample_weight if sample_weight is not None else ops.ones((_batch_of(req.x),))
    stacked = (req.x, req.y, sw)
    if chunk_size is None or batch is None or chunk_size >= batch:
        return _jac.batched_map(one, stacked)
    parts = []
    for start in range(0, batch, chunk_size):
        piece = tree.map_structure(lambda t, s=start: t[s : s + chunk_size], stacked)
        parts.append(_jac.batched_map(one, piece))
    return tree.map_structure(lambda *ls: ops.concatenate(ls, axis=0), *parts)


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
    return sample_weight
