"""``kgrad.jacobian``: per-sample and full Jacobians, in reverse or forward mode."""

from __future__ import annotations

import keras

from kgrad import _compiled, _engine, _errors, _jac, _memory
from kgrad._results import (
    _check_batch_first,
    _itemsize,
    _output_for_shape,
    _result,
    _substitute,
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


def _jacobian(req: _engine.Request, arrays, options):
    of, target = options["of"], options["target"]
    per_sample, mode, chunk_size = options["per_sample"], options["mode"], options["chunk_size"]
    args = req.args()
    probe_out = _output_for_shape(req, args, per_sample)
    if not hasattr(probe_out, "shape"):
        raise ValueError(
            "`kgrad.jacobian` needs a single output tensor, but the output is a "
            f"{type(probe_out).__name__}. Received: of={of!r}, target={target!r}. Select one "
            "output with `of=` or `target=lambda y: y[...]`."
        )
    out_shape = tuple(probe_out.shape)
    _check_batch_first(req, out_shape, "jacobian", per_sample)
    per_kind = {}
    for kind in req.wrt:
        if kind in _engine.BATCHED and per_sample:
            req.check_per_sample(
                "Jacobians with per_sample=True", "pass `per_sample=False` (the full Jacobian)"
            )
        leaves_struct = args[kind]
        flat = tree.flatten(leaves_struct)
        results = []
        batched = kind in _engine.BATCHED and per_sample
        for i, leaf in enumerate(flat):

            def selected(v, i=i, kind=kind, struct=leaves_struct, flat=flat):
                return req.selected_output(_substitute(args, kind, struct, flat, i, v))

            rows = out_shape[1:] if batched else out_shape
            wrt_feat = tuple(leaf.shape[1:]) if batched else tuple(leaf.shape)
            n_out, n_in = _jac.static_size(rows), _jac.static_size(wrt_feat)
            m = _choose_mode(mode, n_in, n_out)
            result_shape = (*out_shape, *wrt_feat)
            n_dirs = (n_out if m == "rev" else n_in) or 1
            chunk = min(chunk_size or n_dirs, n_dirs)
            itemsize = _itemsize(leaf)
            # In flight: one output-sized and one input-sized tensor per direction.
            in_flight = (
                chunk
                * itemsize
                * (_memory.known_size(out_shape) + _memory.known_size(tuple(leaf.shape)))
            )
            _memory.check("Jacobian", [result_shape], in_flight, itemsize, "jacobian")
            if batched and m == "fwd":
                jac = _jac.per_sample_jacfwd(selected, leaf, chunk_size)
            elif batched:
                summed = lambda v, selected=selected: ops.sum(selected(v), axis=0)
                jac = _jac.jacobian(summed, leaf, mode="rev", chunk_size=chunk_size)
                jac = _jac.move_batch_first(jac, len(rows))
            else:
                jac = _jac.jacobian(selected, leaf, mode=m, chunk_size=chunk_size)
            results.append(jac)
        per_kind[kind] = tree.pack_sequence_as(leaves_struct, results)
    return _result(req, per_kind)
