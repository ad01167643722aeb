"""Grad-CAM: class activation maps weighted by the pooled gradient of a spatial layer."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kgrad import _errors, _layers, func
from kgrad.attribution import _common

ops = keras.ops
tree = keras.tree


def gradcam(
    model,
    x,
    *,
    target=None,
    layer=None,
    relu: bool = True,
    resize: bool = True,
    training: bool = False,
):
    """Grad-CAM maps, one per sample.

    For the activation ``A`` of ``layer`` (channels last) and the gradient
    ``G = ∂ out[target] / ∂A``, each sample's channel weights are ``G``
    averaged over that sample's spatial axes (not over the batch), and its map
    is ``Σ_c weight_c · A_c``, then ``ReLU`` when ``relu``; there is no
    normalisation. With ``resize``, the map is upsampled to the input's
    spatial size by corner-aligned linear interpolation, as
    ``scipy.ndimage.zoom(order=1)`` (which tf-keras-vis uses) does. The whole
    computation is one compiled call.

    Args:
        model: a built ``keras.Model``, nested models included.
        x: the batch (nested for multi-input models; the first input sets the
            size of the resized map), or a dataset of batches.
        target: as for :func:`kgrad.attribution.saliency`.
        layer: the layer (name, qualified name such as ``"backbone/conv"``,
            index or object) whose output is weighted; ``None`` picks the last
            layer of ``model.layers`` whose output has spatial axes (rank 3 or
            more, matching the input's rank when the input is an image or a
            sequence of vectors).
        relu: keep only the positive evidence (Grad-CAM's ReLU).
        resize: upsample to the input's spatial shape, giving ``(B, H, W)``
            for images; ``False`` keeps the layer's ``(B, h, w)``.
        training: passed to the layers.

    Returns:
        A tensor ``(B, *spatial)``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
    ...     keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    >>> cam = kgrad.attribution.gradcam(model, np.ones((2, 8, 8, 1), "float32"), target=1)
    >>> tuple(cam.shape)
    (2, 8, 8)
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"`kgrad.attribution.gradcam` weights a layer's activations, so `model` must be "
            f"a Keras model. Received: model of type {type(model).__name__}."
        )

    def compute(batch):
        t = _common.resolve_target(model, batch, target, "gradcam")
        chosen = _pick_layer(model, batch, layer)
        size = _input_size(tree.flatten(batch)[0]) if resize else None
        return _common.call(
            "gradcam",
            _gradcam,
            model,
            batch,
            t,
            training,
            wrt="activations",
            layers=chosen,
            relu=bool(relu),
            size=size,
        )

    return _common.stream("gradcam", compute, x, target)


@_errors.model_level
def _gradcam(req, arrays, options):
    req.check_per_sample("Grad-CAM maps", "a model without batch statistics")
    index = arrays.get("target_index")
    (name,) = req.act_names

    def objective(args):
        out, watch, _ = req.run(args)
        return _common.selected_sum(req, out, index), watch.outputs[name]

    g, act = func.grad(objective, has_aux=True)(req.args(("activations",)))
    g = g["activations"][name]
    if not hasattr(act, "shape") or len(act.shape) < 3:
        shape = tuple(act.shape) if hasattr(act, "shape") else type(act).__name__
        raise ValueError(
            f"Grad-CAM needs a layer output with spatial axes, (B, *spatial, channels). "
            f"Received: layer {name!r} with output {shape}. Pick a convolutional layer with "
            f"`layer=`."
        )
    spatial = tuple(range(1, len(act.shape) - 1))
    weights = ops.mean(g, axis=spatial, keepdims=True)
    cam = ops.sum(act * weights, axis=-1)
    if options["relu"]:
        cam = ops.relu(cam)
    size = options["size"]
    if size is not None:
        cam = resize(cam, size, name)
    return cam


def _input_size(first) -> tuple:
    return tuple(int(d) for d in first.shape[1:])


def resize(cam, size: tuple, name: str = "layer"):
    """Corner-aligned linear upsampling of ``(B, *spatial)`` maps to ``size``.

    ``size`` is the input's per-sample shape: with channels (one axis more than
    the map) the last axis is dropped; without (token ids) it is used as is.
    """
    spatial = tuple(cam.shape[1:])
    if len(size) == len(spatial) + 1:
        size = size[:-1]
    if len(size) != len(spatial):
        raise ValueError(
            f"Grad-CAM resizes the map to the input's spatial shape, but layer {name!r} has "
            f"{len(spatial)} spatial axes {spatial} and the input's sample shape is {size}. "
            f"Received: resize=True. Pass resize=False for the layer's own resolution."
        )
    for axis, (n_in, n_out) in enumerate(zip(spatial, size), start=1):
        if n_in != n_out:
            cam = _linear(cam, axis, int(n_in), int(n_out))
    return cam


def _linear(cam, axis: int, n_in: int, n_out: int):
    """Interpolates one axis as ``scipy.ndimage.zoom(order=1, grid_mode=False)``."""
    shape = [1] * len(cam.shape)
    shape[axis] = n_out
    if n_in == 1:
        return ops.repeat(cam, n_out, axis=axis)
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.minimum(np.floor(pos).astype("int32"), n_in - 2)
    frac = (pos - lo).reshape(shape)
    dtype = keras.backend.standardize_dtype(cam.dtype)
    below = ops.take(cam, lo, axis=axis)
    above = ops.take(cam, lo + 1, axis=axis)
    return below + ops.cast(frac, dtype) * (above - below)


def _pick_layer(model, x, layer: Any) -> str:
    """The qualified name of ``layer``, or of the last layer with a spatial output."""
    firsts = [
        sub.name
        for sub in model._flatten_layers(include_self=False)
        if getattr(sub, "data_format", None) == "channels_first"
    ]
    if firsts:  # their outputs, and those of the layers after them, have channels on axis 1
        raise ValueError(
            f"Grad-CAM reads channels from the last axis, but model {model.name!r} has "
            f"layers with data_format='channels_first' ({', '.join(firsts[:4])}), so its "
            f"activations have channels on axis 1. Received: layer={layer!r}. Build the "
            f"model with channels_last (the Keras default) to use Grad-CAM."
        )
    if layer is not None:
        return _layers.key(model, _layers.resolve_one(model, layer, "layer"))
    rank = len(tree.flatten(x)[0].shape)
    shapes = _output_ranks(model, x)
    for candidate in reversed(list(model.layers)):
        r = shapes.get(id(candidate))
        if r is None or r < 3 or (rank >= 3 and r != rank):
            continue
        return _layers.key(model, candidate)
    raise ValueError(
        f"Grad-CAM needs a layer with a spatial output (B, *spatial, channels), and model "
        f"'{model.name}' has none among its layers "
        f"{[lay.name for lay in model.layers][:12]}. Received: layer=None. Pass "
        f"`layer=` the name of a convolutional (or sequence) layer."
    )


def _output_ranks(model, x) -> dict[int, int]:
    """The output rank of each layer of ``model.layers``, symbolic where known."""
    ranks = {}
    for candidate in model.layers:
        try:
            out = candidate.output
        except (AttributeError, ValueError, RuntimeError):
            break
        if hasattr(out, "shape"):
            ranks[id(candidate)] = len(out.shape)
    else:
        return ranks
    # A subclassed model has no symbolic outputs: one sample through a watch tells.
    watch = _layers.Watch({lay.name: lay for lay in model.layers})
    with watch.active():
        model(tree.map_structure(lambda leaf: leaf[:1], x), training=False)
    return {
        id(lay): len(watch.outputs[lay.name].shape)
        for lay in model.layers
        if hasattr(watch.outputs.get(lay.name), "shape")
    }
