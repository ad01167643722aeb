"""``grad_report``: per-layer activation and gradient norms, NaN/Inf counts and flags.

Built on :func:`kgrad.layer_grad`, so it runs on every backend and reads the
model's current weights. Norms are L2 norms over the whole batch, computed in
float64 on the host; NaN and Inf are counted and propagate into the norms,
never replaced by zeros.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import keras
import numpy as np

from kgrad import api

tree = keras.tree

# Default thresholds on L2 gradient norms (over the batch). A layer is flagged
# "exploding" when any of its gradient norms exceeds EXPLODING, "vanishing"
# when all its weight-gradient norms (a weightless layer: its output-gradient
# norm) are below VANISHING (a dead ReLU layer's are exactly zero).
EXPLODING = 1e3
VANISHING = 1e-7


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """One layer's line of a :class:`GradReport`.

    Attributes:
        name: the layer's name (as in ``layer_grad``).
        index: its position in ``model.layers``.
        activation_norm: L2 norm of the layer's output over the batch.
        output_grad_norm: L2 norm of d objective / d output (``None`` when the
            output is not a float tensor).
        weight_grad_norms: L2 norm of each weight's gradient, by short name.
        nan_count, inf_count: NaN and Inf entries in the output, its gradient
            and the weight gradients together.
        flags: any of ``"exploding"``, ``"vanishing"``, ``"nan"``, ``"inf"``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> stats = kgrad.grad_report(model, np.ones((1, 2), "float32")).layers["d"]
    >>> sorted(stats.weight_grad_norms), stats.flags
    (['bias', 'kernel'], ())
    """

    name: str
    index: int
    activation_norm: float | None
    output_grad_norm: float | None
    weight_grad_norms: dict[str, float]
    nan_count: int
    inf_count: int
    flags: tuple[str, ...]

    @property
    def weight_grad_norm(self) -> float | None:
        """L2 norm of all the layer's weight gradients together (``None`` without weights)."""
        if not self.weight_grad_norms:
            return None
        return math.sqrt(sum(v * v for v in self.weight_grad_norms.values()))


def _leaves(x) -> list[np.ndarray]:
    if x is None:
        return []
    return [
        np.asarray(keras.ops.convert_to_numpy(t))
        for t in tree.flatten(x)
        if t is not None and hasattr(t, "shape")
    ]


def _float_leaves(x) -> list[np.ndarray]:
    return [a.astype(np.float64) for a in _leaves(x) if a.dtype.kind == "f"]


def _norm(arrays: list[np.ndarray]) -> float | None:
    if not arrays:
        return None
    return float(math.sqrt(sum(float(np.sum(a * a)) for a in arrays)))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3e}"


@dataclasses.dataclass(frozen=True)
class GradReport:
    """Per-layer gradient statistics; see :func:`grad_report`.

    Attributes:
        layers: ``dict[name, LayerStats]`` in model order.
        exploding, vanishing: the thresholds the flags used.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    >>> report = kgrad.grad_report(model, np.ones((1, 2), "float32"))
    >>> print(" ".join(report.to_text().splitlines()[0].split()[:3]))
    layer activation output
    """

    layers: dict[str, LayerStats]
    exploding: float = EXPLODING
    vanishing: float = VANISHING

    @property
    def flagged(self) -> dict[str, tuple[str, ...]]:
        """``{name: flags}`` for the layers with any flag."""
        return {name: s.flags for name, s in self.layers.items() if s.flags}

    @property
    def nan_count(self) -> int:
        return sum(s.nan_count for s in self.layers.values())

    @property
    def inf_count(self) -> int:
        return sum(s.inf_count for s in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: thresholds and one entry per layer (NaN/Inf as strings)."""

        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, dict):
                return {k: clean(w) for k, w in v.items()}
            if isinstance(v, tuple):
                return list(v)
            return v

        return {
            "exploding": self.exploding,
            "vanishing": self.vanishing,
            "layers": [
                {k: clean(v) for k, v in dataclasses.asdict(s).items()}
                for s in self.layers.values()
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """An aligned table, one row per layer."""
        header = ("layer", "activation", "output grad", "weight grad", "NaN", "Inf", "flags")
        rows = [
            (
                s.name,
                _fmt(s.activation_norm),
                _fmt(s.output_grad_norm),
                _fmt(s.weight_grad_norm),
                str(s.nan_count),
                str(s.inf_count),
                ",".join(s.flags) or "-",
            )
            for s in self.layers.values()
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"(L2 norms over the batch; exploding > {self.exploding:g}, "
            f"vanishing < {self.vanishing:g})"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str) -> str:
        """Writes a gradient-flow chart (PNG) of the per-layer gradient norms.

        Args:
            path: where to write the PNG.

        Returns:
            ``path``.

        Raises:
            ImportError: matplotlib is not installed (``pip install "kgrad[plot]"``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError(
                "GradReport.plot needs matplotlib, which is not installed. "
                f'Received: path={path!r}. Install it with `pip install "kgrad[plot]"` '
                "(or `pip install matplotlib`)."
            ) from err
        stats = list(self.layers.values())
        names = [s.name for s in stats]
        pos = np.arange(len(stats))

        def series(values):
            return [np.nan if v is None or v <= 0 else v for v in values]

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(stats) + 2), 4))
        ax.plot(pos, series([s.output_grad_norm for s in stats]), "o-", label="output grad")
        ax.plot(pos, series([s.weight_grad_norm for s in stats]), "s--", label="weight grad")
        ax.axhline(self.exploding, color="red", lw=0.8, ls=":", label="exploding")
        ax.axhline(self.vanishing, color="gray", lw=0.8, ls=":", label="vanishing")
        for i, s in enumerate(stats):
            if s.nan_count or s.inf_count:
                ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.15)
        ax.set_yscale("log")
        ax.set_xticks(pos)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("L2 norm over the batch")
        ax.set_title("Gradient flow")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _stats(lg: api.LayerGrad, exploding: float, vanishing: float) -> LayerStats:
    out = _leaves(lg.output)
    out_grad = _float_leaves(lg.output_grad)
    weight = {k: _float_leaves(g) for k, g in lg.weight_grads.items()}
    everything = [a for a in out if a.dtype.kind == "f"] + out_grad
    everything += [a for arrays in weight.values() for a in arrays]
    nan = int(sum(np.isnan(a).sum() for a in everything))
    inf = int(sum(np.isinf(a).sum() for a in everything))
    act = _norm([a.astype(np.float64) for a in out if a.dtype.kind == "f"])
    og = _norm(out_grad)
    wn = {k: _norm(v) for k, v in weight.items() if v}
    norms = [v for v in [og, *wn.values()] if v is not None]
    flags = []
    if any(v > exploding for v in norms if not math.isnan(v)):
        flags.append("exploding")
    # What reaches the layer's weights (a dead ReLU layer's are exactly zero, while
    # its output gradient, from the layers after it, is not); a weightless layer's output.
    reaching = list(wn.values()) if wn else [v for v in [og] if v is not None]
    if reaching and all(v < vanishing for v in reaching):
        flags.append("vanishing")
    if nan:
        flags.append("nan")
    if inf:
        flags.append("inf")
    return LayerStats(lg.name, lg.index, act, og, wn, nan, inf, tuple(flags))


def grad_report(
    model,
    x,
    y=None,
    *,
    loss=None,
    layers=None,
    target=None,
    training: bool = False,
    exploding: float = EXPLODING,
    vanishing: float = VANISHING,
) -> GradReport:
    """Returns per-layer activation norms, gradient norms, NaN/Inf counts and flags.

    The objective is as for :func:`kgrad.layer_grad`: the loss when ``y`` is
    given (``loss=None`` uses the compiled loss), otherwise the sum of the
    (``target``-selected) outputs.

    Args:
        model: a built ``keras.Model``.
        x: the batch.
        y: targets (optional).
        loss: a Keras loss (object, name or callable).
        layers: the layers to report (default: all of ``model.layers``).
        target: index or callable selecting outputs when there is no loss.
        training: passed to the layers.
        exploding: flag a layer when any of its gradient norms exceeds this.
        vanishing: flag a layer when all of its weight-gradient norms (a
            weightless layer: its output-gradient norm) are below this.

    Returns:
        A :class:`GradReport`.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"),
    ...                           keras.layers.Dense(1, name="b")])
    >>> report = kgrad.grad_report(model, np.ones((2, 3), "float32"), np.zeros((2, 1)),
    ...                            loss="mse")
    >>> list(report.layers), report.nan_count
    (['a', 'b'], 0)
    """
    for name, value in (("exploding", exploding), ("vanishing", vanishing)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}.")
    raw = api.layer_grad(model, x, y, loss=loss, layers=layers, target=target, training=training)
    stats = {name: _stats(lg, exploding, vanishing) for name, lg in raw.items()}
    return GradReport(stats, float(exploding), float(vanishing))
