"""Formatting ``kgrad bench`` rows: a text table and a Markdown table.

Imports only the standard library, so that ``benchmarks/run.py`` can load this
file alone, without Keras or a backend.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

COLUMNS = (
    "backend",
    "case",
    "n",
    "kgrad_s",
    "native_s",
    "ratio",
    "ratio_min",
    "ratio_max",
    "first_call_s",
    "note",
)

#: Says how the numbers are made, above every table. The ratio is the median of the
#: per-round ratios (its range, min-max, in brackets), not the ratio of the two medians,
#: so under noise it can differ from kgrad s / native s.
EXPLANATION = "kgrad s, native s: medians of their own; kgrad/native: median of per-round ratios"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment() -> dict[str, Any]:
    """Describes where the benchmark runs: versions, CPU, cores, device.

    Returns:
        A dict with keys ``backend``, ``framework`` (name and version of the
        active backend's framework), ``keras``, ``kgrad``, ``python``, ``cpu``,
        ``cores``, ``device`` (what the backend computes on) and ``threads``
        (the framework's intra-op threads where it says, else ``None``).
    """
    import keras

    import kgrad

    backend = keras.backend.backend()
    version, device, threads = "?", "cpu", None
    if backend == "jax":
        import jax

        version = jax.__version__
        dev = jax.devices()[0]
        device = dev.platform if dev.platform == "cpu" else f"{dev.platform} {dev.device_kind}"
    elif backend == "tensorflow":
        import tensorflow as tf

        version = tf.__version__
        threads = tf.config.threading.get_intra_op_parallelism_threads() or None
        gpus = tf.config.list_physical_devices("GPU")
        device = f"gpu x{len(gpus)}" if gpus else "cpu"
    elif backend == "torch":
        import torch

        version = torch.__version__
        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            device = f"cuda {torch.cuda.get_device_name(0)}"
    return {
        "backend": backend,
        "framework": f"{backend} {version}",
        "keras": keras.__version__,
        "kgrad": kgrad.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "device": device,
        "threads": threads,
    }


def _environment_lines(environments: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"kgrad {e.get('kgrad', '?')} | backend {e.get('backend', '?')} "
        f"({e.get('framework', '?')}, keras {e.get('keras', '?')}, python "
        f"{e.get('python', '?')}) | CPU {e.get('cpu', '?')}, {e.get('cores', '?')} cores"
        + (f", intra-op threads {e['threads']}" if e.get("threads") else "")
        + (f" | device {e['device']}" if e.get("device", "cpu") != "cpu" else "")
        for e in environments
    ]


def _number(value: float) -> str:
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def _ratio(row: dict[str, Any]) -> str:
    """The median ratio and, where known, the range of the per-round ratios."""
    text = _number(row["ratio"])
    if "ratio_min" in row and "ratio_max" in row:
        text += f" ({_number(row['ratio_min'])}-{_number(row['ratio_max'])})"
    return text


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["backend"]),
        str(row["case"]),
        str(row["n"]),
        f"{row['kgrad_s']:.6f}",
        f"{row['native_s']:.6f}",
        _ratio(row),
        f"{row['first_call_s']:.3f}",
        str(row.get("note", "")),
    ]


_HEADER = [
    "backend",
    "case",
    "n",
    "kgrad s",
    "native s",
    "kgrad/native (range)",
    "first call s",
    "note",
]


def format_table(
    rows: Sequence[dict[str, Any]], environments: Sequence[dict[str, Any]] | None = None
) -> str:
    """Formats rows as a fixed-width text table.

    Args:
        rows: rows as returned by :func:`run` (of one or several backends).
        environments: :func:`environment` dicts for the header lines (default:
            this process's environment).

    Returns:
        The header lines (backend, framework and keras versions, CPU, cores;
        how the numbers are made) followed by the table.

    Example:

    >>> row = dict(backend="jax", case="mlp input grad", n=256, kgrad_s=0.0012,
    ...            native_s=0.001, ratio=1.2, ratio_min=1.1, ratio_max=1.4,
    ...            first_call_s=0.5, note="")
    >>> env = dict(kgrad="0.1.0", backend="jax", framework="jax 0.10.2",
    ...            keras="3.15.1", python="3.11.7", cpu="Some CPU", cores=2)
    >>> print(format_table([row], [env]))  # doctest: +NORMALIZE_WHITESPACE
    kgrad 0.1.0 | backend jax (jax 0.10.2, keras 3.15.1, python 3.11.7) | CPU Some CPU, 2 cores
    kgrad s, native s: medians of their own; kgrad/native: median of per-round ratios
    backend  case              n   kgrad s  native s  kgrad/native (range)  first call s  note
    jax      mlp input grad  256  0.001200  0.001000      1.20 (1.10-1.40)         0.500
    """
    if environments is None:
        environments = [environment()]
    body = [_cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(_HEADER, *body)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        out = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(out).rstrip()

    header = [*_environment_lines(environments), EXPLANATION]
    return "\n".join([*header, line(_HEADER), *map(line, body)])


def format_markdown(
    rows: Sequence[dict[str, Any]], environments: Sequence[dict[str, Any]] | None = None
) -> str:
    """Formats rows as a Markdown table, with the environment as a list above it.

    Args:
        rows: rows as returned by :func:`run`.
        environments: :func:`environment` dicts (default: this process's).

    Returns:
        Markdown text.
    """
    if environments is None:
        environments = [environment()]
    lines = [f"- {line}" for line in [*_environment_lines(environments), EXPLANATION]]
    lines += [
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(["---", "---", "---:", "---:", "---:", "---:", "---:", "---"]) + "|",
    ]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
