"""Formatting ``kgrad compare``'s results: the table and the zoo's matrix."""

from __future__ import annotations

TOLERANCE = 1e-3


#: Columns of the zoo's summary matrix: derivative kind -> result-group prefix.
ZOO_KINDS = {
    "saliency": "saliency/",
    "grad-cam": "gradcam/",
    "loss wrt weights": "grad/weights",
    "layer_grad": "layer_grad/",
}


def format_matrix(table, tolerance=TOLERANCE) -> str:
    """Architecture x derivative kind -> the largest difference over backends and layers."""
    header = ["architecture", *ZOO_KINDS, "ok"]
    lines = [header]
    for model, rows in table.items():
        cells, worst = [], 0.0
        for prefix in ZOO_KINDS.values():
            diffs = [d for g, r in rows.items() if g.startswith(prefix) for d in r.values()]
            if diffs:
                worst = max(worst, max(diffs))
                cells.append(f"{max(diffs):.2e}")
            else:
                cells.append("-")
        lines.append([model, *cells, "yes" if worst <= tolerance else "NO"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _worst_key(names: dict, diffs: dict) -> str:
    """The array behind the largest difference of one row, without the group prefix."""
    if not names or not diffs:
        return "-"
    backend = max(diffs, key=lambda b: diffs[b])
    return names.get(backend, "-")


def format_table(table, reference, tolerance=TOLERANCE, worst=None) -> str:
    """The comparison as a table; ``worst`` (from :func:`compare`) adds the worst array."""
    others = sorted({b for rows in table.values() for r in rows.values() for b in r})
    header = ["model", "derivative"] + [f"{b} vs {reference}" for b in others] + ["ok"]
    if worst is not None:
        header.append("largest in")
    lines = [header]
    for model, rows in table.items():
        for group, diffs in rows.items():
            largest = max(diffs.values()) if diffs else 0.0
            line = (
                [model, group]
                + [f"{diffs.get(b, float('nan')):.2e}" for b in others]
                + ["yes" if largest <= tolerance else "NO"]
            )
            if worst is not None:
                line.append(_worst_key(worst.get(model, {}).get(group, {}), diffs))
            lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
