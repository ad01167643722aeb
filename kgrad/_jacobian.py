"""``kgrad.jacobian``: per-sample and full Jacobians, in reverse or forward mode."""

from __future__ import annotations

import keras

from kgrad import _compiled, _engine, _errors, _jac, _memory, func
from kgrad._results import (
    _as_dtype_of,
    _check_batch_first,
    _itemsize,
    _output_for_shape,
    _result,
)

ops = keras.ops
tree = keras.tree


def _choose_mode(mode, n_in, n_out):
    if mode not in ("auto", "rev", "fwd"):
        raise ValueError(
            f"`mode` must be 'auto', 'rev' or 'fwd'. Received: mode={mode!r}."
            f"{_errors.closest(str(mode), ('auto', 'rev', 'fwd'))}"
        )
    if mode == "auto":
        if n_in is None or n_out is None:  # unknown sizes (a dynamic batch in a graph)
            return "rev"
        return "fwd" if n_in < n_out else "rev"
    return mode


def _check_chunk(chunk_size):
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"`chunk_size` must be a positive int or None. Received: chunk_size={chunk_size!r}."
        )


def jacobian(
    model,
    x,
    *,
    wrt="inputs",
    layers=None,
    of=None,
    target=None,
    per_sample=True,
    mode="auto",
    chunk_size=None,
    training=False,
):
    """Returns the Jacobian of the (selected) output.

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch.
        wrt, layers, of, target, training: as for :func:`grad`.
        per_sample: ``True`` gives one Jacobian per sample; ``False`` the full
            Jacobian ``out.shape + wrt.shape``, cross-sample blocks included.
        mode: ``"rev"`` (one backward pass per output element), ``"fwd"``
            (one forward pass per input element) or ``"auto"`` (the cheaper).
        chunk_size: compute at most this many rows (``"rev"``) or columns
            (``"fwd"``) at once, bounding peak memory.

    Returns:
        Per sample: ``(B, *out_feat, *wrt_feat)`` for inputs and activations and
        ``(B, *out_feat, *weight.shape)`` per weight; structured as for :func:`grad`.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> tuple(kgrad.jacobian(model, np.ones((5, 3), "float32")).shape)
    (5, 2, 3)
    """
    _check_chunk(chunk_size)
    options = dict(
        wrt=wrt,
        layers=layers,
        of=of,
        target=target,
        training=training,
        per_sample=per_sample,
        mode=mode,
        chunk_size=chunk_size,
    )
    return _compiled.call("jacobian", _jacobian, model, {"x": x}, options)


def _single_output(out, of, target):
    if not hasattr(out, "shape"):
        raise ValueError(
            "`kgrad.jacobian` needs a single output tensor, but the output is a "
            f"{type(out).__name__}. Received: of={of!r}, target={target!r}. Select one "
            "output with `of=` or `target=lambda y: y[...]`."
        )
    _errors.check_float_output(out)
    return out


@_errors.model_level
def _jacobian(req: _engine.Request, arrays, options):
    """Every leaf of a ``wrt`` kind is differentiated together: one vjp (or one
    mapped jvp) over the kind's whole pytree, so the model runs once per kind,
    and the primal output gives the shapes."""
    of, target = options["of"], options["target"]
    per_sample, mode, chunk_size = options["per_sample"], options["mode"], options["chunk_size"]
    args = req.args()
    per_kind = {}
    for kind in req.wrt:
        batched = kind in _engine.BATCHED and per_sample
        if batched:
            req.check_per_sample(
                "Jacobians with per_sample=True", "pass `per_sample=False` (the full Jacobian)"
            )
        struct = args[kind]
        leaves = tree.flatten(struct)
        if not leaves:  # nothing selected (a frozen model, weightless layers), as `grad`
            per_kind[kind] = struct
            continue

        def selected(v, kind=kind):
            return _single_output(req.selected_output({**args, kind: v}), of, target)

        wrt_feats = [tuple(leaf.shape[1:]) if batched else tuple(leaf.shape) for leaf in leaves]
        n_in = _jac.static_size((sum(_jac.static_size(f) or 0 for f in wrt_feats),))
        if any(_jac.static_size(f) is None for f in wrt_feats):
            n_in = None
        out = pullback = None
        if mode != "fwd":  # the primal output gives the shapes; reverse mode reuses it
            out, pullback = func.vjp(selected, struct)
            out_shape = tuple(out.shape)
        else:
            out_shape = tuple(_output_for_shape(req, args, per_sample).shape)
        _check_batch_first(req, out_shape, "jacobian", per_sample)
        rows = out_shape[1:] if batched else out_shape
        n_out = _jac.static_size(rows)
        m = _choose_mode(mode, n_in, n_out)
        n_dirs = (n_out if m == "rev" else n_in) or 1
        chunk = min(chunk_size or n_dirs, n_dirs)
        itemsize = _itemsize(leaves[0]) if leaves else 4
        # In flight: one output-sized and one input-sized tensor per direction.
        in_flight = (
            chunk
            * itemsize
            * (
                _memory.known_size(out_shape)
                + sum(_memory.known_size(tuple(leaf.shape)) for leaf in leaves)
            )
        )
        result_shapes = [(*out_shape, *feat) for feat in wrt_feats]
        _memory.check("Jacobian", result_shapes, in_flight, itemsize, "jacobian")
        if m == "fwd":
            if n_in is None:
                if chunk_size is not None:
                    raise _jac._dynamic_batch_error("A forward-mode Jacobian")
                jacs = tree.flatten(func.jacfwd(selected)(struct))
            else:
                # The whole input, no random draws: directions can be folded into the batch.
                foldable = kind == "inputs" and not req.training
                jacs = _jac.pytree_jacfwd(selected, struct, batched, chunk_size, foldable)
        elif n_out is None:  # rows of unknown number (a dynamic batch in a graph)
            if chunk_size is not None:
                raise _jac._dynamic_batch_error("A reverse-mode Jacobian")
            jacs = tree.flatten(func.jacrev(selected)(struct))
        else:
            if out is None:
                out, pullback = func.vjp(selected, struct)
            jacs = _jac.pytree_jacrev(out, pullback, struct, batched, chunk_size)
        # Forward mode gives the output's dtype (float16 under mixed precision);
        # every Jacobian comes back in the dtype of what it is taken with respect to.
        jacs = [_as_dtype_of(j, leaf) for j, leaf in zip(jacs, leaves)]
        per_kind[kind] = tree.pack_sequence_as(struct, jacs)
    return _result(req, per_kind)
