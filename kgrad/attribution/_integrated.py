"""Integrated gradients with Captum's integration rules, in bounded memory."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from kgrad import _errors, func
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
        total = _integrate(model, batch, base, diff, t, a, w, batch_size, training)
        attributions = tree.map_structure(lambda d, g: d * g, diff, total)
        if not return_delta:
            return attributions
        fx = _common.value(model, batch, t, "integrated_gradients", training)
        fb = _common.value(model, base, t, "integrated_gradients", training)
        return attributions, _common.per_sample_sum(attributions, None) - (fx - fb)

    return _common.stream("integrated_gradients", compute, x, target)


def _integrate(model, x, base, diff, target, a, w, batch_size, training):
    """``Σₖ wₖ ∇F(b + aₖ d)`` per sample, at most ``batch_size`` rows per evaluation.

    Each evaluation is one compiled call of :func:`_nodes_sum` on some nodes
    and some samples: whole batches of nodes when ``batch_size`` holds at least
    one node's worth of samples, else one node for a slice of samples.
    """
    n = _common.batch_size(diff)
    steps = len(a)
    rows = steps * n if batch_size is None else batch_size
    dtype = keras.backend.standardize_dtype(tree.flatten(diff)[0].dtype)

    def nodes_sum(ks, sl):
        extra = {
            "baseline": tree.map_structure(lambda leaf: leaf[sl], base),
            "alphas": ops.cast(a[ks], dtype),
            "weights": ops.cast(w[ks], dtype),
        }
        part_x = tree.map_structure(lambda leaf: leaf[sl], x)
        t = target.rows(sl.start, sl.stop)
        return _common.call("integrated_gradients", _nodes_sum, model, part_x, t, training, extra)

    parts = []
    if rows >= n:  # whole batches of nodes per call
        per = min(steps, rows // n)
        for k0 in range(0, steps, per):
            parts.append(nodes_sum(np.arange(k0, min(k0 + per, steps)), slice(0, n)))
    else:  # one node at a time, in slices of samples
        for k in range(steps):
            pieces = [
                nodes_sum(np.arange(k, k + 1), slice(s, min(s + rows, n)))
                for s in range(0, n, rows)
            ]
            parts.append(tree.map_structure(lambda *ps: ops.concatenate(ps, axis=0), *pieces))
    total = parts[0]
    for part in parts[1:]:
        total = tree.map_structure(ops.add, total, part)
    return total


@_errors.model_level
def _nodes_sum(req, arrays, options):
    """``Σₖ wₖ ∇F(b + aₖ(x − b))`` over the nodes given, for the whole batch, in one call.

    The interpolated inputs are stacked node-major (Captum's order); a
    per-sample target is repeated per node.
    """
    req.check_per_sample("Attributions", "a model without batch statistics")
    alphas, weights = arrays["alphas"], arrays["weights"]
    k, n = alphas.shape[0], req.batch_size
    index = arrays.get("target_index")
    index = None if index is None else ops.tile(index, (k,))
    points = tree.map_structure(
        lambda xi, bi: _interpolate(bi, xi - bi, alphas), req.x, arrays["baseline"]
    )

    def objective(p):
        out, _, _ = req.run({"inputs": p})
        return _common.selected_sum(req, out, index)

    g = func.grad(objective)(points)
    return tree.map_structure(lambda gi: _weighted_sum(gi, weights, n), g)


def _interpolate(base, diff, alphas):
    """``base + αₖ · diff`` for every α, stacked node-major: ``(len(α) · B, ...)``."""
    feat = tuple(diff.shape[1:])
    alpha = ops.reshape(alphas, (-1, 1) + (1,) * len(feat))
    points = ops.expand_dims(base, 0) + alpha * ops.expand_dims(diff, 0)
    return ops.reshape(points, (-1,) + feat)


def _weighted_sum(g, weights, n: int):
    """``Σₖ wₖ gₖ`` of node-major rows ``(k · n, ...)``."""
    feat = tuple(g.shape[1:])
    g = ops.reshape(g, (weights.shape[0], n) + feat)
    wk = ops.reshape(weights, (-1, 1) + (1,) * len(feat))
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
