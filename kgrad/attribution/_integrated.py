"""Integrated gradients with Captum's integration rules, in bounded memory."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kgrad.attribution import _common

ops = keras.ops
tree = keras.tree

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def nodes(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Captum's nodes ``a`` in [0, 1] and weights ``w`` for ``steps`` points.

    Example:

    >>> a, w = nodes("riemann_trapezoid", 3)
    >>> a.tolist(), w.tolist()  # Captum's weights: they sum to (n - 1) / n
    ([0.0, 0.5, 1.0], [0.16666666666666666, 0.3333333333333333, 0.16666666666666666])
    """
    if method not in METHODS:
        from kgrad import _errors

        raise ValueError(
            f"`method` must be one of {list(METHODS)}. Received: method={method!r}."
            f"{_errors.closest(method, METHODS) if isinstance(method, str) else ''}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int. Received: steps={steps!r}.")
    n = steps
    if method == "gausslegendre":
        t, v = np.polynomial.legendre.leggauss(n)
        return (1 + t) / 2, v / 2
    if n < 2:
        raise ValueError(
            f"The Riemann rules need at least 2 steps, as in Captum. Received: steps={n} "
            f"with method={method!r}. Use steps >= 2, or method='gausslegendre'."
        )
    w = np.full(n, 1.0 / n)
    if method == "riemann_left":
        return np.linspace(0, 1 - 1 / n, n), w
    if method == "riemann_right":
        return np.linspace(1 / n, 1, n), w
    if method == "riemann_middle":
        return np.linspace(1 / (2 * n), 1 - 1 / (2 * n), n), w
    w[0] = w[-1] = 0.5 / n
    return np.linspace(0, 1, n), w


def integrated_gradients(
    model,
    x,
    *,
    target=None,
    baseline=None,
    steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    return_delta: bool = False,
    training: bool = False,
):
    """Integrated gradients, ``(x − b) ⊙ Σₖ wₖ ∇F(b + aₖ(x − b))``, as Captum computes them.

    The nodes ``aₖ`` and weights ``wₖ`` are Captum's for each ``method`` (see
    the attribution guide; Captum's ``riemann_trapezoid`` weights sum to
    ``(n − 1)/n``). The interpolated inputs are stacked step-major (all samples
    at node 0, then at node 1, ...), as in Captum. With ``batch_size``, at most
    that many interpolated samples are evaluated at once (at least one, at most
    ``steps × B`` by default).

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch (nested for multi-input models), or a dataset of batches.
        target: as for :func:`kgrad.attribution.saliency`.
        baseline: ``None`` (zeros), a number, one sample's shape (or ``(1, ...)``),
            or ``x``'s shape; for a multi-input model, one of these per input in
            ``x``'s structure, or a single ``None`` or number for every input.
        steps: the number of integration nodes.
        method: ``"gausslegendre"``, ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"`` or ``"riemann_trapezoid"``.
        batch_size: the most interpolated samples held at once (``None``: all).
        return_delta: also return Captum's convergence delta.
        training: passed to the layers.

    Returns:
        The attributions, structured like ``x``; with ``return_delta``, the
        tuple ``(attributions, delta)`` where ``delta`` is, per sample, the sum
        of the attributions minus ``F(x)[t] − F(baseline)[t]`` (signed, ``(B,)``).

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    >>> model.set_weights([np.array([[1., -2.], [3., 0.], [-1., 1.]], "float32")])
    >>> ig, delta = kgrad.attribution.integrated_gradients(
    ...     model, np.full((1, 3), 2., "float32"), target=0, return_delta=True)
    >>> np.round(keras.ops.convert_to_numpy(ig)[0], 5).tolist(), abs(float(delta[0])) < 1e-5
    ([2.0, 6.0, -2.0], True)
    """
    a, w = nodes(method, steps)
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` bounds the interpolated samples held at once and must be a "
            f"positive int or None. Received: batch_size={batch_size!r}."
        )

    def compute(batch):
        t = _common.resolve_target(model, batch, target, "integrated_gradients")
        batch = tree.map_structure(_float, batch)
        base = _baselines(batch, baseline)
        diff = tree.map_structure(lambda xi, bi: xi - bi, batch, base)
        total = _integrate(model, base, diff, t, a, w, batch_size, training)
        attributions = tree.map_structure(lambda d, g: d * g, diff, total)
        if not return_delta:
            return attributions
        fx = _common.value(model, batch, t, "integrated_gradients", training)
        fb = _common.value(model, base, t, "integrated_gradients", training)
        return attributions, _common.per_sample_sum(attributions, None) - (fx - fb)

    return _common.stream("integrated_gradients", compute, x, target)


def _integrate(model, base, diff, target, a, w, batch_size, training):
    """``Σₖ wₖ ∇F(b + aₖ d)`` per sample, at most ``batch_size`` rows per evaluation."""
    n = _common.batch_size(diff)
    steps = len(a)
    rows = steps * n if batch_size is None else batch_size
    dtype = keras.backend.standardize_dtype(tree.flatten(diff)[0].dtype)
    parts = []
    if rows >= n:  # whole steps per evaluation: chunks of k steps × n samples
        per = min(steps, rows // n)
        for k0 in range(0, steps, per):
            ks = np.arange(k0, min(k0 + per, steps))
            g = _gradient_at(model, base, diff, a[ks], target.repeat(len(ks)), dtype, training)
            parts.append(
                tree.map_structure(lambda gi, wk=w[ks]: _weighted_sum(gi, wk, n, dtype), g)
            )
    else:  # fewer rows than samples: one step at a time, in slices of samples
        for k in range(steps):
            pieces = []
            for s in range(0, n, rows):
                sl = slice(s, min(s + rows, n))
                part_base = tree.map_structure(lambda leaf, sl=sl: leaf[sl], base)
                part_diff = tree.map_structure(lambda leaf, sl=sl: leaf[sl], diff)
                t = target.rows(sl.start, sl.stop)
                pieces.append(
                    _gradient_at(model, part_base, part_diff, a[k : k + 1], t, dtype, training)
                )
            g = tree.map_structure(lambda *ps: ops.concatenate(ps, axis=0), *pieces)
            parts.append(tree.map_structure(lambda gi, wk=w[k]: gi * ops.cast(wk, dtype), g))
    total = parts[0]
    for part in parts[1:]:
        total = tree.map_structure(ops.add, total, part)
    return total


def _gradient_at(model, base, diff, alphas, target, dtype, training):
    """The gradients at ``base + α · diff`` for each α, stacked step-major."""
    points = tree.map_structure(lambda b, d: _interpolate(b, d, alphas, dtype), base, diff)
    return _common.gradient(model, points, target, "integrated_gradients", training)


def _interpolate(base, diff, alphas: np.ndarray, dtype: str):
    """``base + αₖ · diff`` for every α, stacked step-major: ``(len(α) · B, ...)``."""
    feat = tuple(diff.shape[1:])
    alpha = ops.cast(np.asarray(alphas, "float64").reshape((-1, 1) + (1,) * len(feat)), dtype)
    points = ops.expand_dims(base, 0) + alpha * ops.expand_dims(diff, 0)
    return ops.reshape(points, (-1,) + feat)


def _weighted_sum(g, weights: np.ndarray, n: int, dtype: str):
    feat = tuple(g.shape[1:])
    g = ops.reshape(g, (len(weights), n) + feat)
    wk = ops.cast(np.asarray(weights, "float64").reshape((-1, 1) + (1,) * len(feat)), dtype)
    return ops.sum(g * wk, axis=0)


def _baselines(x: Any, baseline: Any):
    """``baseline`` broadcast to ``x``'s structure and shapes."""
    leaves = tree.flatten(x)
    if baseline is None or isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        value = 0.0 if baseline is None else float(baseline)
        return tree.map_structure(lambda leaf: ops.full_like(_float(leaf), value), x)
    if len(leaves) > 1:
        try:
            tree.assert_same_structure(x, baseline)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"A multi-input model's `baseline` must have the structure of `x` (one "
                f"baseline per input), or be None or a number. Received: baseline of type "
                f"{type(baseline).__name__}."
            ) from err
        return tree.map_structure(_baseline_leaf, x, baseline)
    return tree.map_structure(lambda leaf: _baseline_leaf(leaf, baseline), x)


def _float(leaf):
    return _common.float_input(leaf, "Integrated gradients interpolate the inputs")


def _baseline_leaf(leaf, baseline):
    leaf = _float(leaf)
    if baseline is None or isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return ops.full_like(leaf, 0.0 if baseline is None else float(baseline))
    b = ops.cast(baseline, leaf.dtype)
    shape, feat = tuple(b.shape), tuple(leaf.shape[1:])
    if shape == feat:
        b = ops.expand_dims(b, 0)
    elif shape not in ((1,) + feat, tuple(leaf.shape)):
        raise ValueError(
            f"`baseline` must be a number, one sample's shape {feat}, (1, *{feat}) or x's "
            f"shape {tuple(leaf.shape)}. Received: baseline of shape {shape}. Reshape it, or "
            f"pass a number."
        )
    return ops.broadcast_to(b, tuple(leaf.shape))
