"""Per-sample gradient norms of Dense and conv layers without B gradients ("ghost norms").

For a Dense layer ``z = a W + b`` (then its activation), sample ``s``'s loss
gradient is ``sum_t a_st^T d_st`` for the kernel and ``sum_t d_st`` for the
bias, where ``a_st`` is the layer's input at position ``t`` (one position for a
plain vector input; several for sequences) and ``d_st`` the gradient of sample
``s``'s own loss with respect to ``z`` there. The kernel gradient's squared norm
is ``sum_{t,u} (a_st . a_su)(d_st . d_su)`` (for one position
``|a_s|^2 |d_s|^2``), so the norm needs the inputs and the gradients with
respect to ``z``, which one backward pass of the summed per-sample losses
gives for every sample at once: the cost of one batch gradient, not of B.
A convolution is a Dense layer on its input patches, one position per output
pixel (``keras.ops.image.extract_patches`` orders a patch as the kernel's axes).
An ``EinsumDense`` layer is one too, once its equation's axes are sorted into
the batch, the positions (in the input and the output), the kernel's input
axes and its output axes. An ``Embedding`` is a Dense layer on one-hot rows:
``a_st . a_su`` is 1 where sample ``s`` looks up the same index at ``t`` and
``u``, else 0, so repeated indices sum as they should.

Used by :func:`kgrad.per_sample_grad_norm` for the layers whose weights
are all selected, with an explicit ``loss`` (a compiled loss can add
regularisation, whose gradient does not pass through ``z``); the other
selected weights get exact per-sample gradients.
"""

from __future__ import annotations

import dataclasses

import keras

from kgrad import _einsum, _jac, _layers, _loss, func

ops = keras.ops
tree = keras.tree


_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D)


def ghost_layers(req, weights: dict) -> dict:
    """Name -> layer, for the layers whose norms ghost norms give exactly.

    Plain ``Dense`` and ``Embedding`` layers, ``EinsumDense`` layers whose
    kernel axes each meet the input or the output (not both), and
    ``Conv1D``/``Conv2D`` with one group and ``"valid"`` or ``"same"`` padding;
    none with LoRA or quantisation; every weight of the layer selected; an
    explicit ``loss``.
    """
    if req.loss is None:
        return {}
    chosen = {}
    for layer in _layers._all_layers(req.model):
        kind = type(layer)
        if kind in (keras.layers.Dense, keras.layers.Embedding):
            pass
        elif kind is keras.layers.EinsumDense:
            if _einsum.split(layer) is None:
                continue
        elif kind in _CONVS:
            if getattr(layer, "groups", 1) != 1 or layer.padding not in ("valid", "same"):
                continue
        else:
            continue
        if getattr(layer, "lora_enabled", False):
            continue
        if getattr(layer, "quantization_mode", None) is not None:
            continue
        paths = [v.path for v in layer.trainable_variables]
        if paths and all(p in weights for p in paths) and len(paths) == len(layer.weights):
            chosen[_layers.key(req.model, layer)] = layer
    return chosen


def squared_norms(req, weights: dict, layers: dict, sample_weight) -> tuple:
    """``(total, used)``: ``(B,)`` squared norms over the weights of the layers ``used``.

    ``used`` are the ``layers`` called once in the forward pass; a shared layer
    (called several times) or one off the path from the inputs (never called)
    is left out, for the caller's exact per-sample gradients. ``total`` is None
    where none is left.
    """
    sub = dataclasses.replace(req, watch={**req.watch, **layers})
    args = {"weights": weights}
    _, first, _ = sub.run(args)
    used = {name: layer for name, layer in layers.items() if first.calls.get(name, 0) == 1}
    if not used:
        return None, used
    if len(used) != len(layers):
        sub = dataclasses.replace(req, watch={**req.watch, **used})
    inputs = dict(first.inputs)
    zeros = {name: ops.zeros_like(first.outputs[name]) for name in used}

    def summed_losses(probes):
        out, _, _ = sub.run({**args, "activations": probes})
        return ops.sum(per_sample_losses(req, out, sample_weight))

    d_out = func.grad(summed_losses)(zeros)
    total = None
    for name, layer in used.items():
        d = ops.cast(d_out[name], "float32")
        if type(layer) is keras.layers.Embedding:
            part = _embedding_squares(inputs[name], d)
        else:
            part = _layer_squares(layer, ops.cast(inputs[name], "float32"), d, weights)
        total = part if total is None else total + part
    return total, used


def _layer_squares(layer, a, d, weights):
    """``(B,)``: the squared norm of each sample's kernel and bias gradients."""
    kernel = ops.cast(weights[layer.kernel.path], "float32")
    bias = None if layer.bias is None else ops.cast(weights[layer.bias.path], "float32")
    if layer.activation is not None and layer.activation is not keras.activations.linear:
        _, pull = func.vjp(layer.activation, _pre_activation(layer, a, kernel, bias))
        (d,) = pull(d)
    if type(layer) is keras.layers.EinsumDense:
        a_pos, d_pos, bias_sums = _einsum.positions(layer, a, d)
    else:
        a_pos, d_pos = _positions(layer, a, d)
        bias_sums = ops.sum(d_pos, axis=1)
    part = _kernel_squares(a_pos, d_pos)
    if bias is not None:
        part = part + ops.sum(ops.square(_rows(bias_sums)), axis=(1, 2))
    return part


def _embedding_squares(ids, d):
    """``(B,)``: ``sum_{t,u} [i_t == i_u] (d_t . d_u)`` per sample, ``d`` the output gradient."""
    d = _rows(d)
    ids = ops.reshape(ops.cast(ids, "int32"), (ops.shape(d)[0], -1))
    same = ops.cast(ops.equal(ids[:, :, None], ids[:, None, :]), d.dtype)
    gram_d = ops.einsum("btk,bsk->bts", d, d)
    return ops.sum(same * gram_d, axis=(1, 2))


def _pre_activation(layer, a, kernel, bias):
    """The layer's output before its activation, as its ``call`` computes it."""
    if type(layer) is keras.layers.EinsumDense:
        z = ops.einsum(layer.equation, a, kernel)
        return z if bias is None else z + bias
    if type(layer) is keras.layers.Dense:
        z = ops.matmul(a, kernel)
        return z if bias is None else z + bias
    z = ops.conv(
        a,
        kernel,
        strides=list(layer.strides),
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )
    if bias is None:
        return z
    if layer.data_format == "channels_last":
        return z + ops.reshape(bias, (1,) * (layer.rank + 1) + (-1,))
    return z + ops.reshape(bias, (1, -1) + (1,) * layer.rank)


def _positions(layer, a, d):
    """``(B, T, K)`` inputs and ``(B, T, C)`` gradients, one row per position.

    For a convolution, a position is an output pixel, and its input row is the
    patch the kernel sees there, ordered as the kernel's ``(*size, in)`` axes.
    """
    if type(layer) is keras.layers.Dense:
        return _rows(a), _rows(d)
    channels_last = layer.data_format == "channels_last"
    if layer.rank == 1:  # as a 2-d image of height 1
        axis = 1 if channels_last else 2
        a, d = ops.expand_dims(a, axis), ops.expand_dims(d, axis)
        size, strides = (1, *layer.kernel_size), (1, *layer.strides)
        dilation = (1, *layer.dilation_rate)
    else:
        size, strides, dilation = layer.kernel_size, layer.strides, layer.dilation_rate
    patches = ops.image.extract_patches(
        a,
        size,
        strides=strides,
        dilation_rate=dilation,
        padding=layer.padding,
        data_format=layer.data_format,
    )
    if not channels_last:  # (B, K, H, W) -> (B, H, W, K)
        patches = ops.transpose(patches, (0, 2, 3, 1))
        d = ops.transpose(d, (0, 2, 3, 1))
    return _rows(patches), _rows(d)


def per_sample_losses(req, y_pred, sample_weight):
    """``(B,)``: each sample's own loss, as for a batch holding that sample alone."""

    def one(sample):
        yp, yt, w = tree.map_structure(lambda t: ops.expand_dims(t, 0), sample)
        return _loss.unscaled(_loss.value(req.model, req.loss, yt, yp, sample_weight=w))

    weights = sample_weight
    if weights is None:
        weights = ops.ones((ops.shape(tree.flatten(y_pred)[0])[0],))
    return _jac.batched_map(one, (y_pred, req.y, weights))


def _rows(t):
    """``(B, T, features)``: every axis between the batch and the last one flattened."""
    shape = ops.shape(t)
    return ops.reshape(t, (shape[0], -1, shape[-1]))


def _kernel_squares(a, d):
    """``(B,)``: ``|sum_t a_t^T d_t|^2`` per sample, by the cheaper of two forms.

    The Gram form ``sum_{t,u} (a_t . a_u)(d_t . d_u)`` costs ``T^2 (K + C)`` per
    sample; forming the ``K x C`` gradient costs ``T K C``.
    """
    t, k, c = a.shape[1], a.shape[2], d.shape[2]
    if t == 1:
        return ops.sum(ops.square(a), axis=(1, 2)) * ops.sum(ops.square(d), axis=(1, 2))
    if t is not None and t * (k + c) > k * c:
        g = ops.einsum("btk,btc->bkc", a, d)
        return ops.sum(ops.square(g), axis=(1, 2))
    gram_a = ops.einsum("btk,bsk->bts", a, a)
    gram_d = ops.einsum("btk,bsk->bts", d, d)
    return ops.sum(gram_a * gram_d, axis=(1, 2))
