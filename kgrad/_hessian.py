"""``kgrad.hessian`` and ``kgrad.hvp``: second derivatives of model-level objectives."""

from __future__ import annotations

import math

import keras

from kgrad import _compiled, _engine, _errors, _jac, _memory, func
from kgrad import backends as _backends
from kgrad._jacobian import _check_chunk
from kgrad._results import (
    _check_batch_first,
    _itemsize,
    _output_for_shape,
    _reorder,
    _result,
    _substitute,
)

ops = keras.ops
tree = keras.tree


def hessian(
    model,
    x,
    *,
    wrt="inputs",
    layers=None,
    of=None,
    target=None,
    y=None,
    loss=None,
    per_sample=True,
    chunk_size=None,
    training=False,
):
    """Returns second derivatives, forward over reverse.

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch.
        wrt: ``"inputs"`` (default), ``"activations"`` or ``"weights"``.
        layers, of, target, y, loss, training: as for :func:`grad`.
        per_sample: for inputs and activations, one Hessian per sample
            (``False``: the full matrix over the whole batch).
        chunk_size: at most this many Hessian columns at once.

    Returns:
        Inputs per sample: ``(B, *out_feat, *in_feat, *in_feat)``, or
        ``(B, *in_feat, *in_feat)`` when the objective is a scalar per sample (a
        loss, or a ``target`` selecting one output element). Weights: the
        Hessian of the scalar objective (the loss, or the summed outputs) as a
        nested dict ``[path_i][path_j]`` of blocks ``w_i.shape + w_j.shape``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="tanh")])
    >>> tuple(kgrad.hessian(model, np.ones((4, 2), "float32"), target=0).shape)
    (4, 2, 2)
    """
    _check_chunk(chunk_size)
    options = dict(
        wrt=wrt,
        layers=layers,
        of=of,
        target=target,
        loss=loss,
        training=training,
        per_sample=per_sample,
        chunk_size=chunk_size,
    )
    return _compiled.call("hessian", _hessian, model, {"x": x, "y": y}, options)


def _float_output(req, args):
    out = req.selected_output(args)
    _errors.check_float_output(out)
    return out


@_errors.model_level
def _hessian(req: _engine.Request, arrays, options):
    per_sample, chunk_size = options["per_sample"], options["chunk_size"]
    args = req.args()
    per_kind = {}
    for kind in req.wrt:
        struct = args[kind]
        if kind == "weights":
            flat = tree.flatten(struct)
            if not flat:  # nothing selected (a frozen model, weightless layers), as `grad`
                per_kind[kind] = {}
                continue
            n = sum(math.prod(tuple(v.shape)) for v in flat)
            _memory.check("Hessian", [(n, n)], 0, _itemsize(flat[0]) if flat else 4, "hessian")
            per_kind[kind] = {
                k: _reorder(struct, row)
                for k, row in _reorder(
                    struct, func.hessian(lambda w: req.objective({**args, "weights": w}))(struct)
                ).items()
            }
            continue
        if per_sample:  # the block-diagonal trick needs independent samples, loss or not
            req.check_per_sample(
                "Hessians with per_sample=True", "pass `per_sample=False` (the full Hessian)"
            )
        out_shape = () if req.has_loss else tuple(_output_for_shape(req, args, per_sample).shape)
        if not req.has_loss:
            _check_batch_first(req, out_shape, "hessian", per_sample)
        out_rank = max(len(out_shape) - 1, 0)
        flat = tree.flatten(struct)
        if per_sample:
            results = _per_sample_blocks(req, args, kind, struct, out_shape, chunk_size)
            per_kind[kind] = tree.pack_sequence_as(struct, results)
            continue
        results = []
        for i, leaf in enumerate(flat):

            def sub(v, i=i, kind=kind, struct=struct, flat=flat):
                return _substitute(args, kind, struct, flat, i, v)

            if req.has_loss:
                first = func.grad(lambda v, sub=sub: req.objective(sub(v)))
            else:
                first = func.jacrev(lambda v, sub=sub: _float_output(req, sub(v)))
            n_all = _memory.known_size(tuple(leaf.shape))
            n_out = _memory.known_size(out_shape) if out_rank else 1
            _memory.check("Hessian", [(n_out, n_all, n_all)], 0, _itemsize(leaf), "hessian")
            results.append(_jac.jacobian(first, leaf, mode="fwd", chunk_size=chunk_size))
        per_kind[kind] = tree.pack_sequence_as(struct, results)
    return _result(req, per_kind)


def _per_sample_blocks(req, args, kind, struct, out_shape, chunk_size):
    """Each sample's Hessian block of every leaf of ``args[kind]``, the model run once for all."""
    out_rank = max(len(out_shape) - 1, 0)
    n_out = math.prod(out_shape[1:]) if out_rank else 1
    flat = tree.flatten(struct)
    total = sum(math.prod(tuple(leaf.shape[1:])) for leaf in flat)
    chunk = min(chunk_size or total, total)
    # One chunk of directions holds every leaf's tangent output.
    working = chunk * n_out * sum(_memory.known_size(tuple(leaf.shape)) for leaf in flat)
    shapes = [(leaf.shape[0], n_out, *(2 * [math.prod(tuple(leaf.shape[1:]))])) for leaf in flat]
    itemsize = _itemsize(flat[0])
    _memory.check("Hessian", shapes, working * itemsize, itemsize, "hessian")

    def sub(values):
        return {**args, kind: values}

    if req.has_loss:
        first = func.grad(lambda v: req.objective(sub(v)))  # like struct: (B, *feat_k)
    else:
        summed = lambda v: ops.sum(_float_output(req, sub(v)), axis=0)
        first = func.jacrev(summed) if out_rank else func.grad(summed)
    # Folding directions into the batch needs the whole input, an unweighted sum
    # over samples (a loss averages over the batch size) and no random draws.
    foldable = kind == "inputs" and not req.has_loss and not req.training
    return _jac.per_sample_hessian_blocks(first, struct, chunk_size, foldable)


def hvp(
    model,
    x,
    vector,
    *,
    wrt="weights",
    layers=None,
    target=None,
    y=None,
    loss=None,
    training=False,
):
    """Returns the Hessian-vector product of the scalar objective.

    Args:
        model: a built ``keras.Model``.
        x: the batch.
        vector: the vector, structured like the ``wrt`` values: a dict keyed by
            ``variable.path`` for weights (a subset of the weights is fine; the
            others count as zero; a key with or without the model's name
            prefix, as a reloaded Sequential has it, is accepted when it names
            one weight, and the result keeps the given key), like ``x`` for
            inputs, a dict keyed by layer name for activations.
        wrt: ``"weights"`` (default), ``"inputs"`` or ``"activations"``.
        layers, y, loss, training: as for :func:`grad`.
        target: without a loss, the objective is the sum of these outputs (an
            int or tuple index into each sample's output, or a callable), as
            for :func:`hessian`.

    Returns:
        ``H @ vector``, structured like ``vector``. Never forms ``H``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")],
    ...                          name="net")
    >>> v = {"net/d/kernel": np.ones((2, 1), "float32")}
    >>> hv = kgrad.hvp(model, np.ones((3, 2), "float32"), v, y=np.zeros((3, 1)), loss="mse")
    >>> keras.ops.convert_to_numpy(hv["net/d/kernel"]).ravel().tolist()
    [4.0, 4.0]
    """
    if not isinstance(wrt, str):
        raise ValueError(f"`kgrad.hvp` takes one `wrt` kind. Received: wrt={wrt!r}.")
    options = dict(wrt=wrt, layers=layers, target=target, loss=loss, training=training)
    given = vector
    renames = _weight_key_renames(model, vector) if wrt == "weights" else {}
    if renames:
        vector = {renames.get(k, k): v for k, v in vector.items()}
    back = {new: old for old, new in renames.items()}

    def finish(_, hv):
        # `jax.jit` and `jax.jvp` sort dict keys: give the result the vector's key order,
        # and the user's own key forms.
        if back:
            hv = {back.get(k, k): v for k, v in hv.items()}
        return _reorder(given, hv)

    return _compiled.call(
        "hvp", _hvp, model, {"x": x, "y": y, "vector": vector}, options, finish=finish
    )


def _weight_key_renames(model, vector) -> dict[str, str]:
    """Vector keys given with or without the model's name prefix -> the model's paths.

    A Sequential saved and loaded again loses its name prefix in ``variable.path``
    (``net/out/kernel`` becomes ``out/kernel``), so keys of either form are
    accepted when they name exactly one weight.
    """
    if not isinstance(vector, dict) or not hasattr(model, "trainable_variables"):
        return {}
    paths = {v.path for v in model.trainable_variables}
    prefix = f"{getattr(model, 'name', '')}/"
    renames = {}
    for key in vector:
        if not isinstance(key, str) or key in paths:
            continue
        candidates = [prefix + key]
        if key.startswith(prefix):
            candidates.append(key[len(prefix) :])
        found = [c for c in candidates if c in paths and c not in vector]
        if len(found) == 1:
            renames[key] = found[0]
    return renames


@_errors.model_level
def _hvp(req: _engine.Request, arrays, options):
    wrt, vector = options["wrt"], arrays["vector"]
    if not req.has_loss:
        if wrt != "weights":
            req.check_per_sample(
                "Hessian-vector products without a loss",
                "give a `loss` (the Hessian of the batch loss is well defined)",
            )
    args = req.args()
    full = args[wrt]
    if wrt in ("weights", "activations"):
        if not isinstance(vector, dict):
            raise TypeError(
                f"For wrt={wrt!r}, `vector` must be a dict keyed like the {wrt}. "
                f"Received: vector of type {type(vector).__name__}."
            )
        _errors.check_keys(vector, list(full), f"`vector` (the {wrt} of the selected layers)")
        if not vector:  # an empty selection (a frozen model, weightless layers), as `grad`
            return {}
        primal = {k: full[k] for k in vector}

        def objective(sub):
            return req.objective({**args, wrt: {**full, **sub}})
    else:
        primal = full
        objective = lambda v: req.objective({**args, wrt: v})
    for p, v in zip(tree.flatten(primal), tree.flatten(vector)):
        if tuple(p.shape) != tuple(v.shape):
            raise ValueError(
                f"`vector` must have the shapes of the {wrt}. Expected {tuple(p.shape)}. "
                f"Received: shape {tuple(v.shape)}."
            )
    vector = tree.map_structure(lambda v, p: ops.cast(v, p.dtype), vector, primal)
    if _backends.hook("hvp_mode") == "rev":

        def along(p):
            g = tree.flatten(func.grad(objective)(p))
            return sum(ops.sum(a * b) for a, b in zip(g, tree.flatten(vector)))

        return func.grad(along)(primal)
    _, hv = func.jvp(func.grad(objective), (primal,), (vector,))
    return hv


def hvp_operator(model, x, *, wrt="weights", layers=None, y=None, loss=None, training=False):
    """Returns ``vector -> H @ vector`` for one batch, linearised once.

    The gradient is differentiated in reverse mode once (``func.vjp`` of
    ``func.grad``), and each product is one backward pass through the retained
    graph: no forward pass per product. For backends whose ``reusable_hvp``
    hook is True (torch); the weights are read once, when it is built, so the
    operator must not outlive one computation. ``vector`` holds every
    selected value (for weights, a dict keyed by ``variable.path``).
    """
    if not _backends.hook("reusable_hvp"):
        raise NotImplementedError(
            f"A reusable Hessian-vector product operator is built on backends that keep a "
            f"double-backward graph (torch). Received: the {keras.backend.backend()} backend. "
            f"Call kgrad.hvp for each product instead."
        )
    options = dict(wrt=wrt, layers=layers, target=None, loss=loss, training=training)
    return _compiled.call("hvp_operator", _hvp_operator, model, {"x": x, "y": y}, options)


def _hvp_operator(req: _engine.Request, arrays, options):
    wrt = options["wrt"]
    args = req.args()
    primal = args[wrt]
    _, pull = func.vjp(func.grad(lambda p: req.objective({**args, wrt: p})), primal)

    def apply(vector):
        # Packed as `primal` is, in its key order (torch's pytrees keep insertion order).
        leaves = [ops.cast(v, p.dtype) for v, p in zip(tree.flatten(vector), tree.flatten(primal))]
        vector = _reorder(primal, tree.pack_sequence_as(primal, leaves))
        with _backends.hook("no_grad")():
            (hv,) = pull(vector)
        return hv

    return apply
