"""Progress output that suits where it goes: a bar on a terminal, plain lines in a log.

``keras.utils.Progbar`` redraws itself with carriage returns and colours itself
with ANSI escapes, which land as noise in log files and CI output. On a
terminal (``sys.stdout.isatty()``) kgrad uses it; anywhere else it writes a
plain line ``"<label>3/10 <unit>s"`` at every tenth of the way (at 1, 2, 4,
8, ... steps when the total is unknown), as Keras does with ``verbose=2``.
``KGRAD_PROGRESS=0`` turns both off.
"""

from __future__ import annotations

import os
import sys


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts ``total`` steps (``None``: unknown) of ``unit`` on ``stream`` (default: stdout).

    Example:

    >>> import io
    >>> out = io.StringIO()
    >>> bar = Progress(2, "model", stream=out, label="compare: ")
    >>> bar.update(1); bar.update(2)
    >>> print(out.getvalue(), end="")
    compare: 1/2 models
    compare: 2/2 models
    """

    def __init__(self, total: int | None, unit: str, stream=None, label: str = ""):
        self.total, self.unit, self.label = total, unit, label
        self.stream = stream
        self._shown = -1
        self._bar = None
        if _is_tty(self.stream if self.stream is not None else sys.stdout):
            import keras

            self._bar = keras.utils.Progbar(self.total, unit_name=unit)

    def update(self, current: int) -> None:
        """Shows that ``current`` of ``total`` steps are done."""
        if self._bar is not None:
            self._bar.update(current)
            return
        if self.total is None:
            step, text = current.bit_length() if current & (current - 1) == 0 else -1, ""
        else:
            step, text = current * 10 // max(self.total, 1), f"/{self.total}"
        if step > self._shown:
            self._shown = step
            stream = self.stream if self.stream is not None else sys.stdout
            plural = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
            plural = self.unit if self.total is None and current == 1 else plural
            print(f"{self.label}{current}{text} {plural}", file=stream, flush=True)


def progress(total: int | None, unit: str, stream=None, label: str = "") -> Progress | None:
    """A :class:`Progress`, or ``None`` when ``KGRAD_PROGRESS=0``."""
    if os.environ.get("KGRAD_PROGRESS", "1") == "0":
        return None
    return Progress(total, unit, stream=stream, label=label)
