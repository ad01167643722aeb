"""Per-sample gradient norms of Dense layers without forming the gradients ("ghost norms").

For a Dense layer ``z = a W + b`` (then its activation), sample ``s``'s loss
gradient is ``sum_t a_st^T d_st`` for the kernel and ``sum_t d_st`` for the
bias, where ``a_st`` is the layer's input at position ``t`` (one position for a
plain vector input; several for sequences) and ``d_st`` the gradient of sample
``s``'s own loss with respect to ``z`` there. The kernel gradient's squared norm
is ``sum_{t,u} (a_st . a_su)(d_st . d_su)`` (for one position
``|a_s|^2 |d_s|^2``), so the norm needs the inputs and the gradients with
respect to ``z``, which one backward pass of the summed per-sample losses
gives for every sample at once: the cost of one batch gradient, not of B.

Used by :func:`kgrad.per_sample_grad_norm` for the Dense layers whose weights
are all selected, with an explicit ``loss`` (a compiled loss can add
regularisation, whose gradient does not pass through ``z``); the other
selected weights get exact per-sample gradients.
"""

from __future__ import annotations

import dataclasses

import keras

from kgrad import _jac, _layers, _loss, func

ops = keras.ops
tree = keras.tree


def ghost_layers(req, weights: dict) -> dict:
    """Name -> Dense layer, for the layers whose norms ghost norms give exactly."""
    if req.loss is None:
        return {}
    chosen = {}
    for layer in _layers._all_layers(req.model):
        if type(layer) is not keras.layers.Dense or getattr(layer, "lora_enabled", False):
            continue
        if getattr(layer, "quantization_mode", None) is not None:
            continue
        paths = [v.path for v in layer.trainable_variables]
        if paths and all(p in weights for p in paths) and len(paths) == len(layer.weights):
            chosen[_layers.key(req.model, layer)] = layer
    return chosen


def squared_norms(req, weights: dict, layers: dict, sample_weight) -> object:
    """``(B,)``: the squared norms of each sample's gradient over ``layers``' weights."""
    sub = dataclasses.replace(req, watch={**req.watch, **layers})
    args = {"weights": weights}
    _, first, _ = sub.run(args)
    first.check_called_once(list(layers))
    inputs = dict(first.inputs)
    zeros = {name: ops.zeros_like(first.outputs[name]) for name in layers}

    def summed_losses(probes):
        out, _, _ = sub.run({**args, "activations": probes})
        return ops.sum(per_sample_losses(req, out, sample_weight))

    d_out = func.grad(summed_losses)(zeros)
    total = None
    for name, layer in layers.items():
        a = ops.cast(inputs[name], "float32")
        kernel = ops.cast(weights[layer.kernel.path], "float32")
        d = ops.cast(d_out[name], "float32")
        if layer.activation is not None and layer.activation is not keras.activations.linear:
            z = ops.matmul(a, kernel)
            if layer.bias is not None:
                z = z + ops.cast(weights[layer.bias.path], "float32")
            _, pull = func.vjp(layer.activation, z)
            (d,) = pull(d)
        part = _kernel_squares(a, d)
        if layer.bias is not None:
            per_sample = ops.sum(_positions(d), axis=1)
            part = part + ops.sum(ops.square(per_sample), axis=1)
        total = part if total is None else total + part
    return total


def per_sample_losses(req, y_pred, sample_weight):
    """``(B,)``: each sample's own loss, as for a batch holding that sample alone."""

    def one(sample):
        yp, yt, w = tree.map_structure(lambda t: ops.expand_dims(t, 0), sample)
        return _loss.value(req.model, req.loss, yt, yp, sample_weight=w)

    weights = sample_weight
    if weights is None:
        weights = ops.ones((ops.shape(tree.flatten(y_pred)[0])[0],))
    return _jac.batched_map(one, (y_pred, req.y, weights))


def _positions(t):
    """``(B, T, features)``: every axis between the batch and the last one flattened."""
    shape = ops.shape(t)
    return ops.reshape(t, (shape[0], -1, shape[-1]))


def _kernel_squares(a, d):
    a, d = _positions(a), _positions(d)
    if a.shape[1] == 1:
        return ops.sum(ops.square(a), axis=(1, 2)) * ops.sum(ops.square(d), axis=(1, 2))
    gram_a = ops.einsum("btk,bsk->bts", a, a)
    gram_d = ops.einsum("btk,bsk->bts", d, d)
    return ops.sum(gram_a * gram_d, axis=(1, 2))
