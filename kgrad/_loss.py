"""The loss of a model's outputs, for every form that ``model.compile(loss=...)`` accepts.

A loss is one of

- a name (``"mse"``, ``"MeanSquaredError"``, ``"crossentropy"``), a
  ``keras.losses.Loss`` object, or a callable ``loss(y_true, y_pred)``: for a
  multi-output model it applies to every output;
- a list (or tuple) with one such loss per output, ``None`` for an output
  without a loss;
- a dict keyed by output name (the keys of a model with dict outputs, else
  ``model.output_names``); outputs it leaves out, or maps to ``None``, have no
  loss.

Each output's loss is reduced as Keras reduces it (``"sum_over_batch_size"``
unless a ``Loss`` object says otherwise), multiplied by its ``loss_weights``
entry if there is one, and the results are summed over the outputs, as in
Keras's ``CompileLoss``. The computation uses ``keras.ops`` only and creates no
variables, so it runs under ``jax.jit``, ``tf.function`` and ``torch.func``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import keras

from kgrad import _errors
from kgrad._loss_objects import _loss_object, _resolve_name, _shape

ops = keras.ops
tree = keras.tree


@dataclasses.dataclass
class _Outputs:
    """The structure of a model's outputs.

    ``keys`` index the outputs (dict keys in ``tree.flatten`` order, list
    positions, or ``[None]`` for a single tensor); ``names`` are what a dict
    ``loss``, ``loss_weights`` or ``y`` is keyed by (``None`` when unknown).
    """

    keys: list
    names: list[str] | None

    def label(self, i: int) -> str:
        if self.names is not None:
            return repr(self.names[i])
        return str(i)


@dataclasses.dataclass
class _Term:
    """One output's share of the objective."""

    index: int
    key: Any
    loss: Any
    weight: Any
    y: Any


# ------------------------------------------------------------------ public


def check(model: Any, loss: Any, y: Any, loss_weights: Any = None) -> None:
    """Validates the structure of ``loss``, ``loss_weights`` and ``y`` for ``model``.

    Runs eagerly, before any computation. For a model whose outputs are not
    known before it runs (a subclassed model), only what does not depend on
    them is checked; :func:`value` checks the rest with the actual outputs.

    Args:
        model: a Keras model, or a plain callable (single-output loss forms only).
        loss: a loss in any form ``model.compile`` accepts.
        y: the targets (``None``: not checked).
        loss_weights: ``None``, a number, a list (one per output) or a dict
            keyed by output name.

    Raises:
        ValueError: a list of the wrong length, unknown output names, ``y``
            not structured like the outputs, an unknown loss name, or no loss
            at all.
        TypeError: an entry that is not a loss, or ``loss_weights`` of the
            wrong type.
    """
    if not isinstance(model, keras.layers.Layer):
        _check_plain(model, loss, loss_weights)
    outputs = _model_outputs(model)
    if outputs is None:  # known once the model runs: `value` checks the rest
        for entry in _entries(loss):
            _resolve_name(entry, loss, None)
        _weights(model, _Outputs(keys=[None], names=None), loss, loss_weights, lengths=False)
        return
    _plan(model, outputs, loss, y, loss_weights, with_targets=y is not None)


def value(
    model: Any,
    loss: Any,
    y_true: Any,
    y_pred: Any,
    loss_weights: Any = None,
    sample_weight: Any = None,
) -> Any:
    """Returns the scalar loss of ``y_pred`` against ``y_true``, reduced as Keras reduces it.

    Args:
        model: the Keras model that produced ``y_pred`` (its output names key
            a dict ``loss``), or a plain callable (single-output loss forms only).
        loss: a loss in any form ``model.compile`` accepts.
        y_true: the targets, structured like the outputs (a list, or a dict
            keyed by output name, for several outputs).
        y_pred: the model's output.
        loss_weights: ``None``, a number, a list or a dict keyed by output name.
        sample_weight: ``None`` or one weight per sample, ``(B,)``, applied to
            every output's loss as Keras applies ``fit``'s ``sample_weight``.

    Returns:
        The sum over the outputs of each output's weighted, reduced loss.

    Raises:
        ValueError: as :func:`check`, and when targets and an output have
            shapes the loss cannot compare.
    """
    outputs = _structure(model, y_pred)
    if not isinstance(model, keras.layers.Layer):
        _check_plain(model, loss, loss_weights)
    terms = _plan(model, outputs, loss, y_true, loss_weights, with_targets=True)
    total, dtypes = None, set()
    for term in terms:
        y_p = y_pred if term.key is None else y_pred[term.key]
        dtypes.add(_errors.dtype_name(y_p))
        part = _one(term, y_p, outputs, loss, sample_weight)
        if term.weight is not None:
            part = ops.multiply(part, ops.cast(term.weight, part.dtype))
        total = part if total is None else ops.add(total, part)
    if dtypes in ({"float16"}, {"bfloat16"}):
        # Computed in float32 as Keras does; returned in the outputs' (mixed-precision) dtype.
        total = ops.cast(total, dtypes.pop())
    return total


# ------------------------------------------------------------------ structure


def _model_outputs(model: Any) -> _Outputs | None:
    """The output structure of a Keras model with symbolic outputs, or None."""
    if not isinstance(model, keras.layers.Layer):
        return None
    struct = getattr(model, "_outputs_struct", None)
    if struct is None:
        try:
            struct = model.outputs
        except (AttributeError, ValueError):
            return None
        if not struct:
            return None
        if len(struct) == 1:  # Sequential: one tensor
            struct = struct[0]
    return _structure(model, struct)


def _structure(model: Any, struct: Any) -> _Outputs:
    if isinstance(struct, dict):
        keys = sorted(struct)  # the order of `tree.flatten`
        return _Outputs(keys=keys, names=[str(k) for k in keys])
    if isinstance(struct, (list, tuple)):
        keys = list(range(len(struct)))
        return _Outputs(keys=keys, names=_output_names(model, len(keys)))
    return _Outputs(keys=[None], names=_output_names(model, 1))


def _output_names(model: Any, n: int) -> list[str] | None:
    """The model's output names (``model.output_names``, else its output layers' names)."""
    if not isinstance(model, keras.layers.Layer):
        return None
    names = getattr(model, "output_names", None)
    if names and len(names) == n:
        return [str(name) for name in names]
    try:
        outputs = list(model.outputs or [])
    except (AttributeError, ValueError):
        return None
    history = [getattr(t, "_keras_history", None) for t in outputs]
    if len(outputs) == n and all(history):
        return [h[0].name for h in history]
    return None


def _model_name(model: Any) -> str:
    return f"model '{model.name}'" if hasattr(model, "name") else "the model"


def _check_plain(model: Any, loss: Any, loss_weights: Any) -> None:
    """A plain callable has no output names: only single-output loss forms."""
    if isinstance(loss, (list, tuple, dict)) or isinstance(loss_weights, (list, tuple, dict)):
        raise ValueError(
            f"A plain callable model has no output names, so `loss` must be one loss "
            f"(a name, a keras.losses.Loss or a callable), which applies to each of its "
            f"outputs. Received: loss={loss!r}, loss_weights={loss_weights!r}. Pass a "
            f"single loss, or wrap the function in a Keras model to give each output "
            f"its own loss."
        )


def _entries(loss: Any) -> list:
    if isinstance(loss, dict):
        return list(loss.values())
    if isinstance(loss, (list, tuple)):
        return list(loss)
    return [loss]


def _plan(
    model: Any,
    outputs: _Outputs,
    loss: Any,
    y: Any,
    loss_weights: Any,
    with_targets: bool,
) -> list[_Term]:
    """Matches losses, weights and targets to the outputs; raises on a mismatch."""
    losses = _per_output(model, outputs, loss, "loss")
    if isinstance(loss, (list, tuple, dict)):
        for i, entry in enumerate(losses):
            _resolve_name(entry, loss, outputs.label(i) if len(losses) > 1 else None)
    else:
        _resolve_name(loss, loss, None)
    active = [i for i, entry in enumerate(losses) if entry is not None]
    if not active:
        raise ValueError(
            f"Every output of {_model_name(model)} has the loss None, so there is "
            f"nothing to compute. Received: loss={loss!r}. Give at least one output a loss."
        )
    weights = _weights(model, outputs, loss, loss_weights)
    targets = _targets(model, outputs, loss, y, active) if with_targets else [None] * len(losses)
    return [
        _Term(index=i, key=outputs.keys[i], loss=losses[i], weight=weights[i], y=targets[i])
        for i in active
    ]


def _names_text(outputs: _Outputs) -> str:
    return f" named {outputs.names}" if outputs.names is not None else ""


def _per_output(model: Any, outputs: _Outputs, spec: Any, what: str) -> list:
    """``spec`` (a loss or loss weights) as one entry per output."""
    n = len(outputs.keys)
    if isinstance(spec, (list, tuple)):
        if len(spec) != n:
            raise ValueError(
                f"`{what}` is a list of {len(spec)} entries, but {_model_name(model)} has "
                f"{n} output(s){_names_text(outputs)}. Received: {what}={spec!r}. Pass "
                f"one entry per output (None for an output without a loss), or a dict "
                f"keyed by output name."
            )
        return list(spec)
    if isinstance(spec, dict):
        if outputs.names is None:
            raise ValueError(
                f"`{what}` is a dict keyed by output name, but the outputs of "
                f"{_model_name(model)} have no names to match it with. Received: "
                f"{what}={spec!r}. Pass a list with one entry per output instead."
            )
        unknown = [k for k in spec if k not in outputs.names]
        left_out = " (outputs left out get no loss)" if what == "loss" else ""
        if unknown:
            raise ValueError(
                f"`{what}` has keys that are not outputs of {_model_name(model)}: "
                f"{unknown}. Its outputs are named {outputs.names}. Received: "
                f"{what}={spec!r}.{_errors.closest(str(unknown[0]), outputs.names)} Key "
                f"the dict by output name{left_out}."
            )
        return [spec.get(name) for name in outputs.names]
    return [spec] * n


def _weights(
    model: Any, outputs: _Outputs, loss: Any, loss_weights: Any, lengths: bool = True
) -> list:
    """One weight (or None) per output; ``lengths=False`` checks only the types."""
    if loss_weights is None:
        return [None] * len(outputs.keys)
    if isinstance(loss_weights, numbers.Real) and not isinstance(loss_weights, bool):
        return [loss_weights] * len(outputs.keys)
    if not isinstance(loss_weights, (list, tuple, dict)):
        raise TypeError(
            f"`loss_weights` must be a number, a list with one weight per output or a "
            f"dict keyed by output name. Received: loss_weights={loss_weights!r} of type "
            f"{type(loss_weights).__name__}, loss={loss!r}."
        )
    if lengths:
        weights = _per_output(model, outputs, loss_weights, "loss_weights")
    else:
        weights = _entries(loss_weights)
    for w in weights:
        if w is not None and (not isinstance(w, numbers.Real) or isinstance(w, bool)):
            raise TypeError(
                f"Each entry of `loss_weights` must be a number (or None). Received: "
                f"loss_weights={loss_weights!r}, with an entry {w!r} of type "
                f"{type(w).__name__}."
            )
    return weights


def _describe(y: Any) -> str:
    if isinstance(y, dict):
        return f"a dict with keys {list(y)}"
    if isinstance(y, (list, tuple)):
        shapes = [_shape(leaf) for leaf in tree.flatten(y)]
        return f"a {type(y).__name__} of {len(y)} arrays with shapes {shapes}"
    return f"one array of shape {_shape(y)}"


def _targets(model: Any, outputs: _Outputs, loss: Any, y: Any, active: list[int]) -> list:
    """``y`` as one target per output (None for outputs without a loss)."""
    n = len(outputs.keys)
    fix = (
        "Pass `y` structured like the outputs: a list with one array per output "
        "(or one per output that has a loss), or a dict keyed by output name."
    )
    if isinstance(y, dict):
        names = outputs.names or []
        unknown = [k for k in y if k not in names]
        missing = [names[i] for i in active if names and names[i] not in y]
        if not names or unknown or missing:
            hint = _errors.closest(str(unknown[0]), names) if unknown and names else ""
            raise ValueError(
                f"`y` is a dict, but its keys do not match the outputs of "
                f"{_model_name(model)} that have a loss ({[outputs.label(i) for i in active]})."
                f" Received: y as {_describe(y)}, loss={loss!r}.{hint} {fix}"
            )
        return [y.get(name) for name in names]
    if isinstance(y, (list, tuple)):
        if len(y) == n:
            return list(y)
        if len(y) == len(active):  # one target per output with a loss, as Keras allows
            targets = [None] * n
            for i, target in zip(active, y):
                targets[i] = target
            return targets
    elif n == 1:
        return [y]
    elif len(active) == 1:
        targets = [None] * n
        targets[active[0]] = y
        return targets
    raise ValueError(
        f"`y` does not match the outputs of {_model_name(model)}, which has {n} "
        f"output(s){_names_text(outputs)}, {len(active)} of them with a loss. Received: "
        f"y as {_describe(y)}, loss={loss!r}. {fix}"
    )


def _one(term: _Term, y_pred: Any, outputs: _Outputs, loss: Any, sample_weight: Any = None) -> Any:
    """One output's reduced loss, with a readable error for mismatched shapes."""
    fn = _loss_object(term.loss, term.y, y_pred)
    try:
        result = fn(term.y, y_pred, sample_weight=sample_weight)
    except Exception as err:  # the backend's shape error, made readable
        y_shapes = [_shape(leaf) for leaf in tree.flatten(term.y)]
        out_shapes = [_shape(leaf) for leaf in tree.flatten(y_pred)]
        if y_shapes == out_shapes:
            raise
        want = out_shapes[0] if len(out_shapes) == 1 else out_shapes
        got = y_shapes[0] if len(y_shapes) == 1 else y_shapes
        first = str(err).splitlines()[0] if str(err) else ""
        if len(outputs.keys) == 1:
            head = "The loss could not compare the targets with the model's output"
            expected, received = "`y`", "y"
        else:
            label = outputs.label(term.index)
            head = f"The loss for output {label} could not compare its targets with that output"
            expected = f"the `y` for output {label}"
            received = f"y for output {label}"
        raise ValueError(
            f"{head}, whose shape differs. Expected {expected} of shape {want} (or what the "
            f"loss accepts for it, e.g. class indices for a sparse loss). Received: "
            f"{received} with shape {got}, loss={loss!r}. The loss raised: "
            f"{type(err).__name__}: {first}"
        ) from err
    dtype = "float64" if _errors.dtype_name(result) == "float64" else keras.config.floatx()
    return ops.cast(result, dtype)


def unscaled(value: Any) -> Any:
    """``value`` without the replica share Keras's losses take under ``tf.distribute``.

    In a ``tf.distribute`` replica context (``strategy.run``, ``fit`` under
    ``MirroredStrategy``) Keras divides every loss by the number of replicas;
    a per-sample result is each sample's own, so it is multiplied back.
    Elsewhere ``value`` is returned as is.
    """
    from keras.src.losses import loss as keras_loss

    return keras_loss.unscale_loss_for_distribution(value)
