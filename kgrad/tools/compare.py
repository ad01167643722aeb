"""``kgrad compare``: the same derivatives under every backend, compared.

Each backend runs in its own process on the same saved model, weights and
inputs; the results are compared norm-wise per derivative:
``||a - b|| / max(||a||, ||b||)`` over all arrays of that derivative.

The default tolerance is 1e-3 relative. Keras computes in float32 on every
backend (JAX and PyTorch even when asked for float64), and the backends use
different kernels and reduction orders, so their results differ by a few
float32 roundings accumulated over the depth of the model (seen here: 1e-7 to
1e-5). A wrong derivative differs by order 1, so 1e-3 separates the two with
a wide margin on both sides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

import numpy as np

TOLERANCE = 1e-3
BACKENDS = ("jax", "tensorflow", "torch")


def installed_backends() -> list[str]:
    """The backends whose framework is importable here."""
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def _group(key: str) -> str:
    """The derivative a result key belongs to (one table row)."""
    parts = key.split("/")
    if parts[0] == "layer_grad":
        return "layer_grad/output_grad" if "output_grad" in parts else "layer_grad/weights"
    if parts[:2] == ["grad", "activations"]:
        return "/".join(parts[:3])
    return "/".join(parts[:2])


def relative_differences(ref: dict, other: dict) -> dict[str, float]:
    """Norm-wise relative difference per derivative group (inf for NaN, missing keys)."""
    groups = defaultdict(list)
    for key in sorted(set(ref) | set(other)):
        groups[_group(key)].append(key)
    diffs = {}
    for group, keys in groups.items():
        if any(k not in ref or k not in other or ref[k].shape != other[k].shape for k in keys):
            diffs[group] = float("inf")
            continue
        a = np.concatenate([ref[k].ravel().astype("float64") for k in keys])
        b = np.concatenate([other[k].ravel().astype("float64") for k in keys])
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            diffs[group] = float("inf")
            continue
        scale = max(np.linalg.norm(a), np.linalg.norm(b))
        diffs[group] = float(np.linalg.norm(a - b) / scale) if scale > 0 else 0.0
    return diffs


def _save_job(name, build, folder, **fields) -> dict:
    """Builds one model with fixed seeds, saves it and its batch; returns the job."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model, x, y, extra = build(np.random.default_rng(0))
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    np.save(os.path.join(folder, f"{name}_y.npy"), y)
    job = {
        "name": name,
        "model": path,
        "x": _save_x(x, os.path.join(folder, f"{name}_x")),
        "y": os.path.join(folder, f"{name}_y.npy"),
    }
    return {**job, **{key: get(extra) for key, get in fields.items()}}


def _save_demos(names, folder):
    from kgrad.tools import demos

    return [
        _save_job(
            name,
            demos.DEMOS[name],
            folder,
            activations=lambda e: e["activations"],
            hessian=lambda e: e["hessian"],
        )
        for name in names
    ]


def _save_x(x, path_stem: str) -> str:
    """Saves a batch (an array, or a list of arrays for a multi-input model)."""
    if isinstance(x, (list, tuple)):
        np.savez(path_stem + ".npz", **{f"x{k}": v for k, v in enumerate(x)})
        return path_stem + ".npz"
    np.save(path_stem + ".npy", x)
    return path_stem + ".npy"


def zoo_names(selection: str) -> tuple[str, ...]:
    """Architectures for ``--zoo``: ``ci``, ``full``, or comma-separated names."""
    from kgrad.tools import zoo

    if selection == "ci":
        return zoo.CI
    if selection == "full":
        return tuple(zoo.ARCHITECTURES)
    names = tuple(n.strip() for n in selection.split(",") if n.strip())
    unknown = [n for n in names if n not in zoo.ARCHITECTURES]
    if unknown or not names:
        raise ValueError(
            f"Unknown zoo architecture(s) {unknown}. Received: --zoo {selection}. Use 'ci', "
            f"'full' or names from: {', '.join(zoo.ARCHITECTURES)}."
        )
    return names


def _save_zoo(names, folder):
    from kgrad.tools import zoo

    return [_save_job(n, zoo.ARCHITECTURES[n], folder, zoo=lambda e: e) for n in names]


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


def _progress(n: int, show: bool):
    if not show or os.environ.get("KGRAD_PROGRESS", "1") == "0":
        return None
    import keras

    return keras.utils.Progbar(n, unit_name="model")


def run(jobs, backends, folder, log=print, progress=True):
    """Runs the jobs under each backend in its own process; returns results per backend.

    With ``progress``, a ``keras.utils.Progbar`` on stdout counts the (backend,
    model) pairs done, as each worker reports them.
    """
    results = {}
    bar = _progress(len(jobs) * len(backends), progress)
    done = 0
    for backend in backends:
        own = [dict(job, out=os.path.join(folder, f"{job['name']}_{backend}.npz")) for job in jobs]
        spec = os.path.join(folder, f"jobs_{backend}.json")
        with open(spec, "w") as fh:
            json.dump(own, fh)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        # stderr goes to a file: frameworks log a lot there, and a full pipe would block.
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kgrad.tools._worker", spec],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            for line in proc.stdout:
                if line.rstrip().endswith(" done"):
                    done += 1
                    if bar is not None:
                        bar.update(done)
            code = proc.wait()
            err.seek(0)
            stderr = err.read()
        if code != 0:
            raise RuntimeError(
                f"kgrad compare: the {backend} worker failed (exit {code}).\n{stderr[-4000:]}"
            )
        if bar is None:
            log(f"  {backend}: done")
        results[backend] = {job["name"]: dict(np.load(job["out"])) for job in own}
    return results


def compare(results, tolerance=TOLERANCE):
    """Returns ``{model: {derivative: {backend: diff}}}`` against the first backend."""
    backends = list(results)
    ref = backends[0]
    table = {}
    for model in results[ref]:
        rows = defaultdict(dict)
        for other in backends[1:]:
            for group, diff in relative_differences(
                results[ref][model], results[other][model]
            ).items():
                rows[group][other] = diff
        table[model] = dict(rows)
    return table


def format_table(table, reference, tolerance=TOLERANCE) -> str:
    others = sorted({b for rows in table.values() for r in rows.values() for b in r})
    header = ["model", "derivative"] + [f"{b} vs {reference}" for b in others] + ["ok"]
    lines = [header]
    for model, rows in table.items():
        for group, diffs in rows.items():
            worst = max(diffs.values()) if diffs else 0.0
            lines.append(
                [model, group]
                + [f"{diffs.get(b, float('nan')):.2e}" for b in others]
                + ["yes" if worst <= tolerance else "NO"]
            )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(
    model=None,
    inputs=None,
    targets=None,
    backends=None,
    as_json=False,
    quick=False,
    tolerance=TOLERANCE,
    zoo=None,
) -> int:
    """Runs the comparison and prints it; returns the exit code (1 past tolerance).

    ``zoo`` (``"ci"``, ``"full"`` or comma-separated names) compares the
    architecture zoo (``kgrad.tools.zoo``) instead of the demo models.
    """
    from kgrad.tools import demos

    backends = backends or installed_backends()
    missing = [b for b in backends if b not in BACKENDS]
    if missing:
        raise ValueError(
            f"Unknown backend(s) {missing}. Received: --backends {','.join(backends)}. Choose "
            f"from {', '.join(BACKENDS)}."
        )
    if len(backends) < 2:
        raise ValueError(
            f"kgrad compare needs at least two installed backends. Received: {backends}. "
            f"Install more, e.g. `pip install 'kgrad[cpu]'`."
        )
    log = (lambda *a: print(*a, file=sys.stderr)) if as_json else print
    with tempfile.TemporaryDirectory(prefix="kgrad-compare-") as folder:
        if zoo is not None:
            names = zoo_names(zoo)
            log(f"kgrad compare: zoo of {len(names)} architectures on {', '.join(backends)}")
            jobs = _save_zoo(names, folder)
        elif model is None:
            names = demos.QUICK if quick else tuple(demos.DEMOS)
            log(f"kgrad compare: demo models {', '.join(names)} on {', '.join(backends)}")
            jobs = _save_demos(names, folder)
        else:
            if inputs is None:
                raise ValueError(
                    f"kgrad compare needs inputs for a saved model. Received: model={model!r} "
                    f"without --inputs. Pass --inputs X.npy (a batch for the model)."
                )
            jobs = [
                {
                    "name": os.path.basename(model),
                    "model": os.path.abspath(model),
                    "x": os.path.abspath(inputs),
                    "y": os.path.abspath(targets) if targets else None,
                    "activations": [],
                    "hessian": False,
                }
            ]
        results = run(jobs, backends, folder, log=log, progress=not as_json)
    table = compare(results, tolerance)
    worst = max(
        (d for rows in table.values() for r in rows.values() for d in r.values()), default=0.0
    )
    ok = worst <= tolerance
    if as_json:
        print(
            json.dumps(
                {
                    "reference": backends[0],
                    "tolerance": tolerance,
                    "ok": ok,
                    "max_difference": worst,
                    "models": table,
                },
                indent=2,
            )
        )
    else:
        print(format_table(table, backends[0], tolerance))
        if zoo is not None:
            print(f"\nlargest difference per architecture and derivative, vs {backends[0]}:")
            print(format_matrix(table, tolerance))
        print(
            f"\nlargest difference {worst:.2e} (tolerance {tolerance:.0e}): "
            f"{'all backends agree' if ok else 'DISAGREEMENT'}"
        )
    return 0 if ok else 1
