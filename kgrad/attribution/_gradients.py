"""Gradient maps: saliency, input × gradient and SmoothGrad."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kgrad.attribution import _common

ops = keras.ops
tree = keras.tree


def saliency(model, x, *, target=None, abs: bool = True, training: bool = False):
    """The gradient of the target output with respect to the input, per sample.

    As Captum's ``Saliency``: the absolute value by default (``abs=False`` keeps
    the sign).

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch (nested for multi-input models), or a dataset of batches
            (streamed, with the results concatenated).
        target: an int (one class for every sample), an int array ``(B,)`` (one
            class per sample), a tuple index into each sample's output, or a
            callable ``y -> tensor`` keeping the batch axis; ``None`` sums the
            whole output (a model with one output unit).
        abs: return ``|∂ out[target] / ∂x|`` (Captum's default) or the signed gradient.
        training: passed to the layers.

    Returns:
        Tensors structured like ``x``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    >>> model.set_weights([np.array([[1., -2.], [3., 0.], [-1., 1.]], "float32")])
    >>> s = kgrad.attribution.saliency(model, np.ones((2, 3), "float32"), target=1)
    >>> keras.ops.convert_to_numpy(s)[0].tolist()
    [2.0, 0.0, 1.0]
    """

    def compute(batch):
        t = _common.resolve_target(model, batch, target, "saliency")
        g = _common.gradient(model, batch, t, "saliency", training)
        return tree.map_structure(ops.abs, g) if abs else g

    return _common.stream("saliency", compute, x, target)


def input_x_gradient(model, x, *, target=None, training: bool = False):
    """The input times the gradient of the target output, per sample (Captum's ``InputXGradient``).

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch (nested for multi-input models), or a dataset of batches.
        target: as for :func:`saliency`.
        training: passed to the layers.

    Returns:
        ``x ⊙ ∂ out[target] / ∂x``, structured like ``x``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    >>> model.set_weights([np.array([[1., -2.], [3., 0.], [-1., 1.]], "float32")])
    >>> a = kgrad.attribution.input_x_gradient(model, np.full((1, 3), 2., "float32"), target=0)
    >>> keras.ops.convert_to_numpy(a)[0].tolist()
    [2.0, 6.0, -2.0]
    """

    def compute(batch):
        t = _common.resolve_target(model, batch, target, "input_x_gradient")
        g = _common.gradient(model, batch, t, "input_x_gradient", training)
        return tree.map_structure(lambda xi, gi: ops.cast(xi, gi.dtype) * gi, batch, g)

    return _common.stream("input_x_gradient", compute, x, target)


def smoothgrad(
    model,
    x,
    *,
    target=None,
    samples: int = 50,
    noise: float = 0.15,
    seed: int | None = None,
    squared: bool = False,
    training: bool = False,
):
    """SmoothGrad: the gradient averaged over noisy copies of each sample.

    Each sample gets ``samples`` copies ``x + ε`` with ``ε ~ N(0, σ²)`` and
    ``σ = noise · (max(x_b) − min(x_b))``, the range taken per sample over all
    its features (per input of a multi-input model), as tf-keras-vis's
    ``smooth_noise``. The result is the mean of the signed gradients (or of
    their squares with ``squared=True``, Captum's ``smoothgrad_sq``); take
    ``abs`` of it for a saliency-style map. The noise is
    ``σ · np.random.RandomState(seed).standard_normal((samples, B, ...))``, so
    a seed gives the same noise, and so the same map, on every backend; it is
    the noise tf-keras-vis draws after ``np.random.seed(seed)``. The copies
    are evaluated as one batch of ``samples × B`` rows, sample-major. A
    dataset's batches draw theirs in turn from the one seeded generator, so a
    seeded map of a stream depends on its batching (and is not the in-memory
    map of the same samples concatenated).

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch (nested for multi-input models), or a dataset of batches.
        target: as for :func:`saliency`.
        samples: noisy copies per sample (at least 1).
        noise: the noise level relative to each sample's range (``0``: the plain gradient).
        seed: an int for reproducible noise; ``None`` draws fresh noise.
        squared: average the squared gradients instead.
        training: passed to the layers.

    Returns:
        Tensors structured like ``x``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    >>> model.set_weights([np.array([[1., -2.], [3., 0.], [-1., 1.]], "float32")])
    >>> g = kgrad.attribution.smoothgrad(model, np.ones((2, 3), "float32"), target=0, seed=0)
    >>> np.round(keras.ops.convert_to_numpy(g)[0], 4).tolist()  # linear: the gradient itself
    [1.0, 3.0, -1.0]
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(
            f"`samples` is the number of noisy copies per sample and must be a positive int. "
            f"Received: samples={samples!r}."
        )
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise >= 0:
        raise ValueError(
            f"`noise` is the noise level relative to each sample's range and must be a "
            f"number >= 0. Received: noise={noise!r}."
        )
    rng = np.random.RandomState(seed)

    def compute(batch):
        t = _common.resolve_target(model, batch, target, "smoothgrad")
        n = _common.batch_size(batch)
        noisy = tree.map_structure(lambda leaf: _noisy(leaf, samples, noise, rng), batch)
        g = _common.gradient(model, noisy, t.repeat_each(samples), "smoothgrad", training)

        def mean(leaf):
            leaf = ops.reshape(leaf, (n, samples) + tuple(leaf.shape[1:]))
            return ops.mean(ops.square(leaf) if squared else leaf, axis=1)

        return tree.map_structure(mean, g)

    return _common.stream("smoothgrad", compute, x, target)


def _noisy(leaf: Any, samples: int, noise: float, rng: np.random.RandomState):
    """``samples`` noisy copies of each sample, sample by sample: ``(B * samples, ...)``.

    The noise is drawn ``(samples, B, ...)``, as tf-keras-vis draws it; each
    sample's copies come together so that, with the batch split over devices
    (``keras.distribution``), a sample's mean needs no other device.
    """
    leaf = _common.float_input(leaf, "SmoothGrad adds Gaussian noise to the inputs")
    dtype = keras.backend.standardize_dtype(leaf.dtype)
    n = leaf.shape[0]
    feat = tuple(leaf.shape[1:])
    flat = ops.reshape(leaf, (n, -1))
    sigma = noise * (ops.max(flat, axis=1) - ops.min(flat, axis=1))
    sigma = ops.reshape(sigma, (1, n) + (1,) * len(feat))
    eps = ops.cast(rng.standard_normal((samples, n) + feat).astype("float32"), dtype)
    copies = ops.expand_dims(leaf, 0) + eps * sigma
    copies = ops.moveaxis(copies, 0, 1)  # (B, samples, ...)
    return ops.reshape(copies, (n * samples,) + feat)
