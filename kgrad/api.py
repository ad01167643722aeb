"""The model-level API: derivatives of Keras models as values.

Every function takes the model and a batch ``x`` and returns the backend's
native tensors. Shared keyword arguments:

- ``wrt``: ``"inputs"``, ``"weights"``, ``"activations"`` or a list of them
  (then a tuple of results comes back, in the same order).
- ``layers``: narrows ``"weights"`` and ``"activations"`` to some layers (name,
  index into ``model.layers``, layer object, or a list of them).
- ``of``: differentiate this layer's output instead of the model's output.
- ``target``: an int or tuple index into each sample's output, or a callable
  ``y -> tensor``.
- ``y``, ``loss``: differentiate the loss (reduced as Keras reduces it)
  instead of the summed outputs; ``loss=None`` with ``y`` uses the compiled loss.
- ``training``: passed to the layers.

Without a loss the objective is the sum over the batch and the selected
outputs, which gives per-sample input derivatives when samples are independent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras

from kgrad import _compiled, _engine, _errors, _jac, _memory, func
from kgrad import backends as _backends

ops = keras.ops
tree = keras.tree

__all__ = ["grad", "value_and_grad", "jacobian", "hessian", "hvp", "layer_grad", "LayerGrad"]


def _itemsize(x) -> int:
    return 8 if "64" in _errors.dtype_name(x) else 2 if "16" in _errors.dtype_name(x) else 4


def _reorder(template, value):
    """Puts dict keys back in the template's order (JAX pytrees sort dict keys)."""
    if isinstance(value, dict) and isinstance(template, dict):
        return {
            k: _reorder(template[k], value[k]) if k in template else value[k]
            for k in [
                *[k for k in template if k in value],
                *[k for k in value if k not in template],
            ]
        }
    return value


def _package(req: _engine.Request, kind: str, value):
    """Shapes one result as the API promises."""
    value = _reorder(req.args_template[kind], value)
    if kind == "activations" and req.single_layer:
        return value[req.act_names[0]]
    return value


def _result(req: _engine.Request, per_kind: dict):
    results = tuple(_package(req, k, per_kind[k]) for k in req.wrt)
    return results[0] if req.single_wrt else results


def _substitute(args, kind, struct, flat, i, v):
    """``args`` with leaf ``i`` of ``args[kind]`` replaced by ``v``."""
    new = dict(args)
    new[kind] = tree.pack_sequence_as(struct, [v if j == i else o for j, o in enumerate(flat)])
    return new


class _Shape:
    """Stands for an output tensor whose shape is all that is needed."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _output_for_shape(req: _engine.Request, args, per_sample: bool):
    """The selected output (or a stand-in with its shape), for shape and structure.

    JAX and TensorFlow compile it away (nothing uses its value). PyTorch runs
    eagerly, so it runs the model without a graph and, for per-sample
    requests, on the first sample only (every output is batch-first then).
    """
    if _backends.name() != "torch":
        return req.selected_output(args)
    import torch

    with torch.no_grad():
        if not (per_sample and req.batch_size > 1):
            return req.selected_output(args)
        small = dict(args)
        small["inputs"] = tree.map_structure(lambda a: a[:1], args.get("inputs", req.x))
        if "activations" in small:
            small["activations"] = tree.map_structure(lambda a: a[:1], small["activations"])
        out = req.selected_output(small)
        if not hasattr(out, "shape") or not len(out.shape) or out.shape[0] != 1:
            return req.selected_output(args)  # not batch-first: look at the whole batch
    return _Shape((req.batch_size, *out.shape[1:]))


def _check_batch_first(req: _engine.Request, out_shape, fname, per_sample):
    """Per-sample results need the selected output to keep the batch axis first."""
    if not per_sample or not any(k in _engine.BATCHED for k in req.wrt):
        return
    known = out_shape and None not in (out_shape[0], req.batch_size)
    if len(out_shape) == 0 or (known and out_shape[0] != req.batch_size):
        raise ValueError(
            f"`kgrad.{fname}` with per_sample=True needs the selected output to keep the "
            f"batch axis first (size {req.batch_size}), but it has shape {out_shape}. "
            f"Received: target={req.target!r}, of={req.of_key!r}. Return one value per "
            f"sample from a callable `target` (e.g. `lambda y: y[:, 0]`, not "
            f"`keras.ops.sum(y)`), or pass `per_sample=False`."
        )


def _objective_check(req: _engine.Request):
    if not req.has_loss and any(k in _engine.BATCHED for k in req.wrt):
        req.check_per_sample(
            "Input and activation gradients without a loss",
            "give a `loss` (the gradient of the batch loss is well defined)",
        )


def value_and_grad(
    model,
    x,
    *,
    wrt="inputs",
    layers=None,
    of=None,
    target=None,
    y=None,
    loss=None,
    training=False,
):
    """Returns ``(objective, gradient)`` for a model and a batch.

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``,
            then only ``wrt="inputs"``).
        x: the batch (NumPy or backend tensors; nested for multi-input models).
        wrt: what to differentiate with respect to (see :mod:`kgrad.api`).
        layers: narrows ``"weights"`` and ``"activations"``.
        of: a layer whose output replaces the model's output.
        target: index or callable selecting the outputs to differentiate.
        y: targets; with ``loss`` the objective is the loss.
        loss: a Keras loss object, name or callable ``loss(y_true, y_pred)``.
        training: passed to the layers.

    Returns:
        ``(objective, gradient)``; the gradient is structured as for :func:`grad`.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> value, g = kgrad.value_and_grad(model, np.ones((3, 2), "float32"))
    >>> tuple(g.shape)
    (3, 2)
    """
    options = dict(wrt=wrt, layers=layers, of=of, target=target, loss=loss, training=training)
    return _compiled.call("value_and_grad", _value_and_grad, model, {"x": x, "y": y}, options)


def _value_and_grad(req: _engine.Request, arrays, options):
    _objective_check(req)
    value, g = func.value_and_grad(req.objective)(req.args())
    return value, _result(req, g)


def grad(
    model,
    x,
    *,
    wrt="inputs",
    layers=None,
    of=None,
    target=None,
    y=None,
    loss=None,
    training=False,
):
    """Returns the gradient of the objective (the loss, or the summed outputs).

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch.
        wrt: ``"inputs"``, ``"weights"``, ``"activations"`` or a list of them.
        layers: narrows ``"weights"`` and ``"activations"``.
        of: a layer whose output replaces the model's output.
        target: index or callable selecting the outputs to differentiate.
        y: targets for ``loss``.
        loss: a Keras loss (object, name or callable).
        training: passed to the layers.

    Returns:
        For ``"inputs"``: structured like ``x`` (per-sample gradients without a
        loss). For ``"weights"``: a dict keyed by ``variable.path``. For
        ``"activations"``: a dict keyed by layer name, or the bare tensor when
        ``layers`` named one layer. A tuple of these for a list ``wrt``.

    Raises:
        ValueError: unknown layers, bad ``target``, samples that interact.
        TypeError: integer inputs with ``wrt="inputs"``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential(
    ...     [keras.Input((2,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(1)],
    ...     name="net")
    >>> x = np.ones((4, 2), "float32")
    >>> tuple(kgrad.grad(model, x).shape)
    (4, 2)
    >>> sorted(kgrad.grad(model, x, wrt="weights", layers="d"))
    ['net/d/bias', 'net/d/kernel']
    >>> tuple(kgrad.grad(model, x, wrt="activations", layers="d").shape)
    (4, 3)
    """
    options = dict(wrt=wrt, layers=layers, of=of, target=target, loss=loss, training=training)
    return _compiled.call("grad", _grad, model, {"x": x, "y": y}, options)


def _grad(req: _engine.Request, arrays, options):
    _objective_check(req)
    return _result(req, func.grad(req.objective)(req.args()))


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


def _hessian(req: _engine.Request, arrays, options):
    per_sample, chunk_size = options["per_sample"], options["chunk_size"]
    args = req.args()
    per_kind = {}
    for kind in req.wrt:
        struct = args[kind]
        if kind == "weights":
            flat = tree.flatten(struct)
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
        results = []
        for i, leaf in enumerate(flat):

            def sub(v, i=i, kind=kind, struct=struct, flat=flat):
                return _substitute(args, kind, struct, flat, i, v)

            if req.has_loss:
                scalar = lambda v, sub=sub: req.objective(sub(v))
                first = func.grad(scalar)  # (B, *feat)
            else:
                if per_sample:
                    summed = lambda v, sub=sub: ops.sum(req.selected_output(sub(v)), axis=0)
                    first = func.jacrev(summed) if out_rank else func.grad(summed)
                else:
                    first = func.jacrev(lambda v, sub=sub: req.selected_output(sub(v)))
            feat = tuple(leaf.shape[1:])
            n_feat = math.prod(feat)
            if per_sample:
                n_out = math.prod(out_shape[1:]) if out_rank else 1
                shape = (leaf.shape[0], n_out, n_feat, n_feat)
                _memory.check(
                    "Hessian",
                    [shape],
                    min(chunk_size or n_feat, n_feat)
                    * _itemsize(leaf)
                    * n_out
                    * _memory.known_size(tuple(leaf.shape)),
                    _itemsize(leaf),
                    "hessian",
                )
                results.append(_jac.per_sample_hessian_columns(first, leaf, chunk_size))
            else:
                n_all = _memory.known_size(tuple(leaf.shape))
                n_out = _memory.known_size(out_shape) if out_rank else 1
                _memory.check("Hessian", [(n_out, n_all, n_all)], 0, _itemsize(leaf), "hessian")
                results.append(_jac.jacobian(first, leaf, mode="fwd", chunk_size=chunk_size))
        per_kind[kind] = tree.pack_sequence_as(struct, results)
    return _result(req, per_kind)


def hvp(model, x, vector, *, wrt="weights", layers=None, y=None, loss=None, training=False):
    """Returns the Hessian-vector product of the scalar objective.

    Args:
        model: a built ``keras.Model``.
        x: the batch.
        vector: the vector, structured like the ``wrt`` values: a dict keyed by
            ``variable.path`` for weights (a subset of the weights is fine; the
            others count as zero), like ``x`` for inputs, a dict keyed by layer
            name for activations.
        wrt: ``"weights"`` (default), ``"inputs"`` or ``"activations"``.
        layers, y, loss, training: as for :func:`grad`.

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
    options = dict(wrt=wrt, layers=layers, loss=loss, training=training)
    # `jax.jit` and `jax.jvp` sort dict keys: give the result the vector's key order.
    return _compiled.call(
        "hvp",
        _hvp,
        model,
        {"x": x, "y": y, "vector": vector},
        options,
        finish=lambda _, hv: _reorder(vector, hv),
    )


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
    if _backends.name() == "tensorflow":
        # Reverse over reverse: a ForwardAccumulator around a tape cannot follow
        # Keras's LSTM/GRU inside a graph, and nested tapes are as fast here.
        def along(p):
            g = tree.flatten(func.grad(objective)(p))
            return sum(ops.sum(a * b) for a, b in zip(g, tree.flatten(vector)))

        return func.grad(along)(primal)
    _, hv = func.jvp(func.grad(objective), (primal,), (vector,))
    return hv


@dataclasses.dataclass(frozen=True)
class LayerGrad:
    """One layer's activation, its gradient and its weight gradients.

    Attributes:
        name: the layer's name.
        index: its position in ``model.layers``.
        output: the layer's output (activation) on the batch.
        output_grad: d objective / d output (``None`` for a non-float output or a
            layer that did not run).
        weight_grads: short weight name (``"kernel"``; ``"dense/kernel"`` inside a
            nested model) -> gradient; empty for weightless layers.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> lg = kgrad.layer_grad(model, np.ones((3, 2), "float32"))["d"]
    >>> lg.index, sorted(lg.weight_grads)
    (0, ['bias', 'kernel'])
    """

    name: str
    index: int
    output: Any
    output_grad: Any
    weight_grads: dict


def _short_name(layer, variable) -> str:
    prefix = f"{layer.path}/" if getattr(layer, "path", None) else ""
    if prefix and variable.path.startswith(prefix):
        return variable.path[len(prefix) :]
    marker = f"{layer.name}/"
    pos = variable.path.find(marker)
    return variable.path[pos + len(marker) :] if pos >= 0 else variable.path


def layer_grad(model, x, y=None, *, loss=None, layers=None, target=None, training=False):
    """Returns every layer's activation, activation gradient and weight gradients.

    The objective is the loss when ``y`` is given (``loss=None``: the compiled
    loss), else the sum of the (``target``-selected) outputs.

    Args:
        model: a built ``keras.Model``.
        x: the batch.
        y: targets (optional).
        loss: a Keras loss (object, name or callable).
        layers: the layers to report (default: all of ``model.layers``).
        target: index or callable selecting outputs when there is no loss.
        training: passed to the layers.

    Returns:
        ``dict[name, LayerGrad]`` in model order, weightless layers included.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, name="a"),
    ...                           keras.layers.Dropout(0.5, name="drop"),
    ...                           keras.layers.Dense(1, name="b")])
    >>> report = kgrad.layer_grad(model, np.ones((3, 2), "float32"), np.zeros((3, 1)),
    ...                           loss="mse")
    >>> list(report), report["drop"].weight_grads
    (['a', 'drop', 'b'], {})
    """
    options = dict(
        wrt=("activations", "weights"), layers=layers, target=target, loss=loss, training=training
    )
    return _compiled.call(
        "layer_grad", _layer_grad, model, {"x": x, "y": y}, options, finish=_layer_grads
    )


def _layer_grad(req: _engine.Request, arrays, options):
    """``{name: (output, output_grad, {short weight name: gradient})}`` in model order."""
    model = req.model
    if not req.has_loss:
        req.check_per_sample(
            "Activation gradients without a loss",
            "give a `loss` (the gradient of the batch loss is well defined)",
        )
    args = req.args()

    def objective(a):
        out, watch, value = req.run(a, extra=req.objective_from_output)
        return value, {name: watch.outputs[name] for name in req.act_names}

    g, outputs = func.grad(objective, has_aux=True)(args)
    result = {}
    for layer in req.layers:
        name = _engine._layers.key(model, layer)
        wgrads = {
            _short_name(layer, v): g["weights"][v.path]
            for v in layer.trainable_variables
            if v.path in g["weights"]
        }
        result[name] = (outputs.get(name), g["activations"].get(name), wgrads)
    return result


def _layer_grads(model, raw) -> dict[str, LayerGrad]:
    top = list(model.layers)
    names = {_engine._layers.key(model, layer): i for i, layer in enumerate(top)}
    return {
        name: LayerGrad(
            name=name,
            index=names.get(name, -1),
            output=output,
            output_grad=output_grad,
            weight_grads=dict(wgrads),
        )
        for name, (output, output_grad, wgrads) in raw.items()
    }
