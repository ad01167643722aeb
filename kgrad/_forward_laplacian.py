"""The forward Laplacian of a chain of Dense and elementwise activation layers.

For the models it applies to (a ``Sequential`` or a single-path Functional
model of ``Dense`` and ``Activation`` layers with elementwise activations,
the usual physics-informed MLP), :func:`laplacian` propagates, layer by layer,
the value ``h``, its first derivatives ``J`` along the given directions and
*one summed* second-order term ``L = sum_s D_{v_s}^2 h`` (the forward
Laplacian of Li et al., as in folx):

- a Dense layer: ``h W + b``, ``J W``, ``L W``;
- an elementwise ``f``: ``f(h)``, ``f'(h) J``, ``f'(h) L + f''(h) sum_s J_s^2``.

A Dense layer multiplies ``d + 2`` rows by its kernel instead of the ``2d`` to
``3d`` of per-direction second-order tangents, and no direction's
second-order term is ever stored. ``f'`` and ``f''`` come from nested ``jvp``
of the activation itself (elementwise, so cheap), so every Keras activation on
the list below works without a hand-written rule. Every other model takes the
general path (``kgrad._taylor``), which gives the same numbers.
"""

from __future__ import annotations

from typing import Any

import keras

from kgrad import func

ops = keras.ops

# Keras activations that act elementwise (softmax, log_softmax and glu mix features).
_ELEMENTWISE = (
    "linear",
    "tanh",
    "sigmoid",
    "relu",
    "relu6",
    "leaky_relu",
    "gelu",
    "silu",
    "swish",
    "softplus",
    "softsign",
    "elu",
    "selu",
    "celu",
    "exponential",
    "mish",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "hard_tanh",
    "log_sigmoid",
    "squareplus",
    "sparse_plus",
    "tanh_shrink",
    "soft_shrink",
    "hard_shrink",
)


def _elementwise(activation: Any) -> bool:
    return any(getattr(keras.activations, n, None) is activation for n in _ELEMENTWISE)


def _supported(layer) -> bool:
    if isinstance(layer, keras.layers.Dense):
        return (
            type(layer) is keras.layers.Dense
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
            and layer.compute_dtype == layer.variable_dtype
            and _elementwise(layer.activation)
        )
    if type(layer) is keras.layers.Activation:
        return _elementwise(layer.activation)
    return False


def _single_path(model) -> list | None:
    """A Functional model's layers when each one feeds only the next one, else None."""
    if len(getattr(model, "inputs", None) or ()) != 1 or len(model.outputs or ()) != 1:
        return None
    layers, previous = [], None
    for layer in model.layers:
        nodes = getattr(layer, "_inbound_nodes", [])
        if isinstance(layer, keras.layers.InputLayer):
            if previous is not None:
                return None
            previous = layer
            continue
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
            return None
        source = nodes[0].input_tensors[0]._keras_history.operation
        if previous is None or source is not previous:
            return None
        layers.append(layer)
        previous = layer
    if not layers or model.outputs[0]._keras_history.operation is not layers[-1]:
        return None
    return layers


def chain(model) -> list | None:
    """The layers of ``model`` if the forward Laplacian applies to it, else None."""
    if type(model) is keras.Sequential:
        layers = list(model.layers)
    elif type(model) is keras.Model or type(model).__name__ == "Functional":
        try:
            layers = _single_path(model)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
    else:
        return None
    if not layers or not all(_supported(layer) for layer in layers):
        return None
    return layers


def applies(req) -> list | None:
    """The layer chain when the request's Laplacian can be propagated forward, else None.

    The output must be the model's own (``of=None``), selected by an index
    ``target`` or none: a callable target may be nonlinear.
    """
    if not req.is_keras or req.of is not None or callable(req.target):
        return None
    return chain(req.model)


def _derivatives(activation, h):
    """``f(h), f'(h), f''(h)`` of an elementwise activation, by nested ``jvp``."""
    ones = ops.ones_like(h)

    def first(z):
        return func.jvp(activation, (z,), (ones,))

    (value, slope), (_, curvature) = func.jvp(first, (h,), (ones,))
    return value, slope, curvature


def laplacian(req, layers: list, x, directions):
    """``sum_s D_{v_s}^2 out(x)`` per sample, for directions ``(S, *feat)`` shared by the samples.

    While the first derivatives are the same in every sample (up to the first
    nonlinearity), they are carried without the batch axis, as folx does: the
    first Dense layer multiplies ``S`` rows by its kernel, not ``B * S``.
    """
    given = req._variable_values()

    def value(v):
        return given[id(v)] if id(v) in given else v.value

    # Directions on axis 1 once they differ per sample, (B, S, *feat): the sum
    # over them then reads contiguous memory (2.6x faster on XLA's CPU than
    # directions first, d = 32).
    h, jac, lap, shared = x, ops.cast(directions, x.dtype), ops.zeros_like(x), True
    for layer in layers:
        if isinstance(layer, keras.layers.Dense):
            kernel = ops.cast(value(layer.kernel), h.dtype)
            h, jac, lap = ops.matmul(h, kernel), ops.matmul(jac, kernel), ops.matmul(lap, kernel)
            if layer.use_bias:
                h = h + ops.cast(value(layer.bias), h.dtype)
        if layer.activation is keras.activations.linear:
            continue
        h, slope, curvature = _derivatives(layer.activation, h)
        if shared:  # the first nonlinearity: from here on, per sample
            jac, shared = ops.expand_dims(jac, 0), False
        lap = slope * lap + curvature * ops.sum(jac * jac, axis=1)
        jac = ops.expand_dims(slope, 1) * jac
    return req.select(lap)
