"""Keras callbacks built on kgrad."""

from __future__ import annotations

import csv
import json
from typing import Any

import keras

from kgrad import report as _report

__all__ = ["GradientMonitor"]


class GradientMonitor(keras.callbacks.Callback):
    """Records a :func:`kgrad.grad_report` on a fixed batch during ``fit``.

    At the end of every ``every``-th epoch it computes the report on ``x`` (and
    ``y``) with the model's current weights: one forward and one backward pass
    on that batch, nothing more. It runs on every backend.

    Args:
        x: the batch to monitor (keep it small: it is one extra backward pass).
        y: targets; the objective is then the loss (``loss=None``: the loss the
            model was compiled with). Without ``y``, the sum of the outputs.
        every: record every this many epochs.
        log_dir: if given, also write the norms as TensorBoard scalars
            (``grad_norm/<layer>/...``) there. It needs the ``tensorboard``
            package, never TensorFlow itself.
        loss: a Keras loss to use instead of the compiled one.
        **report_kwargs: passed on to :func:`kgrad.grad_report` (``layers``,
            ``exploding``, ``vanishing``, ...).

    Attributes:
        history: ``[(epoch, GradReport), ...]`` in the order recorded.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"),
    ...                           keras.layers.Dense(1, name="b")])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
    >>> monitor = kgrad.callbacks.GradientMonitor(x[:4], y[:4], every=2)
    >>> _ = model.fit(x, y, epochs=4, verbose=0, callbacks=[monitor])
    >>> tuple(epoch for epoch, _ in monitor.history)
    (1, 3)
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        every: int = 1,
        log_dir: str | None = None,
        loss: Any = None,
        **report_kwargs: Any,
    ):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive int. Received: every={every!r}.")
        self.x, self.y, self.every, self.loss = x, y, every, loss
        self.report_kwargs = report_kwargs
        self.history: list[tuple[int, _report.GradReport]] = []
        self.log_dir = log_dir
        self._writer = None
        if log_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "GradientMonitor(log_dir=...) writes TensorBoard event files, which "
                    f"needs the tensorboard package. Received: log_dir={log_dir!r} ({err}). "
                    "Install it with `pip install kgrad[viz]` (or `pip install tensorboard`), "
                    "or leave log_dir=None "
                    "and use to_csv / to_json."
                ) from err
            from kgrad._tensorboard import ScalarWriter

            self._writer = ScalarWriter(str(log_dir))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        rep = _report.grad_report(self.model, self.x, self.y, loss=self.loss, **self.report_kwargs)
        self.history.append((epoch, rep))
        if self._writer is not None:
            self._write_tensorboard(epoch, rep)

    def _write_tensorboard(self, epoch: int, rep: _report.GradReport) -> None:
        for row in self.rows(rep):
            for key in ("activation_norm", "output_grad_norm", "weight_grad_norm"):
                if row[key] is not None:
                    self._writer.scalar(f"grad_norm/{row['layer']}/{key}", row[key], step=epoch)
        self._writer.flush()

    @staticmethod
    def rows(rep: _report.GradReport, epoch: int | None = None) -> list[dict[str, Any]]:
        """One flat dict per layer of ``rep``."""
        out = []
        for s in rep.layers.values():
            row = {"epoch": epoch} if epoch is not None else {}
            row.update(
                layer=s.name,
                activation_norm=s.activation_norm,
                output_grad_norm=s.output_grad_norm,
                weight_grad_norm=s.weight_grad_norm,
                nan_count=s.nan_count,
                inf_count=s.inf_count,
                flags=";".join(s.flags),
            )
            out.append(row)
        return out

    def to_csv(self, path: str) -> str:
        """Writes one row per (epoch, layer); returns ``path``."""
        rows = [r for epoch, rep in self.history for r in self.rows(rep, epoch)]
        fields = [
            "epoch",
            "layer",
            "activation_norm",
            "output_grad_norm",
            "weight_grad_norm",
            "nan_count",
            "inf_count",
            "flags",
        ]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def to_json(self, path: str) -> str:
        """Writes ``[{"epoch": e, **report.to_dict()}, ...]``; returns ``path``.

        ``to_dict`` already writes NaN and Inf norms as strings, so the file is strict JSON.
        """
        data = [{"epoch": epoch, **rep.to_dict()} for epoch, rep in self.history]
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)
        return path
