"""Heatmaps of attributions, alone or over their images (matplotlib, an optional extra)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def plot(x, attribution, path: str | None = None, *, overlay: bool = True, max_samples: int = 8):
    """Draws attributions as heatmaps, over the images when ``overlay``; writes a PNG to ``path``.

    ``attribution`` is one map (``(B, ...)`` with ``x``'s shape, or Grad-CAM's
    ``(B, H, W)``) or a dict ``{title: map}`` of several methods, drawn side
    by side: one row per sample (at most ``max_samples``), the input first,
    then one column per method. Channels are summed; a map with negative
    values uses a diverging colour map centred on 0, a non-negative one a
    sequential map from 0; both are scaled per panel to the 99.5th percentile
    of the absolute values, so that one hot pixel does not wash the rest out.
    Image inputs (``(B, H, W)`` or ``(B, H, W, C)`` with 1, 3 or 4 channels)
    are drawn in grey with the heatmap over them at 60% opacity; other inputs
    (vectors, sequences) get a heatmap of their own.

    Args:
        x: the inputs the attributions are for (the first input of a
            multi-input model is drawn).
        attribution: a map, or a dict of titled maps.
        path: where to write the PNG (``None``: only return the figure).
        overlay: draw image maps over the input image.
        max_samples: the most samples (rows) drawn.

    Returns:
        The ``matplotlib.figure.Figure``.

    Example:

    >>> import numpy as np, kgrad
    >>> x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype("float32")
    >>> fig = kgrad.attribution.plot(x, {"saliency": x, "signed": x - 0.5})
    >>> len(fig.axes)  # 2 rows of input + 2 maps, and a colour bar per map
    10
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - the plot extra is missing
        raise ImportError(
            "kgrad.attribution.plot draws with matplotlib, which is not installed. "
            "Received: a plot request. Install it with `pip install kgrad[plot]`."
        ) from err
    maps = attribution if isinstance(attribution, dict) else {"attribution": attribution}
    if not maps:
        raise ValueError("`attribution` is an empty dict. Received: {}. Pass at least one map.")
    image = _numpy(keras.tree.flatten(x)[0])
    arrays = {title: _numpy(keras.tree.flatten(m)[0]) for title, m in maps.items()}
    n = min(image.shape[0], max_samples)
    for title, a in arrays.items():
        if a.shape[0] < n:
            raise ValueError(
                f"The attribution {title!r} has {a.shape[0]} samples but x has {image.shape[0]}. "
                f"Received: attribution of shape {a.shape}. Pass the maps of these inputs."
            )
    is_image = overlay and _is_image(image)
    cols = 1 + len(arrays)
    fig = Figure(figsize=(2.2 * cols, 2.2 * n), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for row in range(n):
        _draw_input(axes[row][0], image[row], is_image)
        for col, (title, a) in enumerate(arrays.items(), start=1):
            _draw_map(fig, axes[row][col], a[row], image[row] if is_image else None)
            if row == 0:
                axes[row][col].set_title(title, fontsize=9)
    axes[0][0].set_title("input", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _numpy(value: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value), dtype="float64")


def _is_image(image: np.ndarray) -> bool:
    return image.ndim == 3 or (image.ndim == 4 and image.shape[-1] in (1, 3, 4))


def _to_2d(a: np.ndarray, like_image: bool) -> np.ndarray:
    """A sample's map as 2-D: channels summed for images, rows for sequences, a row for vectors."""
    if like_image and a.ndim == 3:
        return a.sum(axis=-1)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim > 2:
        return a.reshape(a.shape[0], -1)
    return a


def _draw_input(ax, sample: np.ndarray, is_image: bool) -> None:
    ax.set_axis_off()
    if is_image:
        ax.imshow(_grey(sample), cmap="gray")
    else:
        ax.imshow(_to_2d(sample, False), cmap="gray", aspect="auto")


def _grey(sample: np.ndarray) -> np.ndarray:
    g = sample if sample.ndim == 2 else sample[..., :3].mean(axis=-1)
    lo, hi = float(g.min()), float(g.max())
    return (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)


def _draw_map(fig, ax, a: np.ndarray, image: np.ndarray | None) -> None:
    ax.set_axis_off()
    m = _to_2d(a, image is not None)
    scale = float(np.percentile(np.abs(m[np.isfinite(m)]), 99.5)) if np.isfinite(m).any() else 1.0
    scale = scale if scale > 0 else 1.0
    signed = bool((m < 0).any())
    cmap, lo = ("coolwarm", -scale) if signed else ("inferno", 0.0)
    if image is not None:
        if m.shape != image.shape[:2]:
            m = _upsample(m, image.shape[:2])
        ax.imshow(_grey(image), cmap="gray")
        shown = ax.imshow(m, cmap=cmap, vmin=lo, vmax=scale, alpha=0.6)
    else:
        shown = ax.imshow(m, cmap=cmap, vmin=lo, vmax=scale, aspect="auto")
    fig.colorbar(shown, ax=ax, shrink=0.7)


def _upsample(m: np.ndarray, size: tuple) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse map to the image, for display only."""
    rows = (np.arange(size[0]) * m.shape[0] // size[0]).clip(0, m.shape[0] - 1)
    cols = (np.arange(size[1]) * m.shape[1] // size[1]).clip(0, m.shape[1] - 1)
    return m[np.ix_(rows, cols)]
