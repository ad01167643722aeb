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
from typing import Any

import keras

from kgrad import _compiled, _engine, _errors, func
from kgrad._hessian import hessian, hvp
from kgrad._jacobian import jacobian
from kgrad._results import _objective_check, _result

ops = keras.ops
tree = keras.tree

__all__ = ["grad", "value_and_grad", "jacobian", "hessian", "hvp", "layer_grad", "LayerGrad"]


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


@_errors.model_level
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


@_errors.model_level
def _grad(req: _engine.Request, arrays, options):
    _objective_check(req)
    return _result(req, func.grad(req.objective)(req.args()))


@dataclasses.dataclass(frozen=True)
class LayerGrad:
    """One layer's activation, its gradient and its weight gradients.

    Attributes:
        name: the layer's name.
        index: its position in ``model.layers``; for a layer inside a nested
            model (``name`` ``"encoder/dense"``), the position of the top-level
            layer that contains it (``"encoder"``).
        output: the layer's output (activation) on the batch.
        output_grad: d objective / d output (``None`` for a non-float output or a
            layer that did not run).
        weight_grads: short weight name (``"kernel"``; ``"dense/kernel"`` inside a
            nested model) -> gradient; empty for weightless layers.
        weight_paths: the same short names -> the full ``variable.path``, the
            keys of ``kgrad.grad(wrt="weights")``, so the two can be joined.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> lg = kgrad.layer_grad(model, np.ones((3, 2), "float32"))["d"]
    >>> lg.index, sorted(lg.weight_grads)
    (0, ['bias', 'kernel'])
    >>> lg.weight_paths["kernel"] == model.get_layer("d").kernel.path
    True
    """

    name: str
    index: int
    output: Any
    output_grad: Any
    weight_grads: dict
    weight_paths: dict = dataclasses.field(default_factory=dict)


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


@_errors.model_level
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

    def paths(name, wgrads):
        layer = _engine._layers.resolve_one(model, name, "layers")
        return {
            short: v.path
            for v in layer.trainable_variables
            if (short := _short_name(layer, v)) in wgrads
        }

    return {
        name: LayerGrad(
            name=name,
            index=names[name.split("/")[0]],  # nested: the top-level layer holding it
            output=output,
            output_grad=output_grad,
            weight_grads=dict(wgrads),
            weight_paths=paths(name, wgrads),
        )
        for name, (output, output_grad, wgrads) in raw.items()
    }
