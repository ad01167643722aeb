"""``kgrad compare``: the same derivatives under every backend, compared.

Each backend runs in its own process on the same saved model, weights and
inputs; the results are compared tensor by tensor: per result array (one
weight's gradient, one input's gradient, ...) the norm-wise relative difference
``||a - b|| / max(||a||, ||b||, floor)``, and per derivative the largest of
them, with the array that gives it. Comparing each array on its own keeps an
error in a small tensor (a bias gradient) from vanishing in the norm of a
large one. ``floor`` is ``TENSOR_FLOOR`` (1e-2) times the norm of the whole
derivative: an array far smaller than its derivative is compared at that scale,
so float32 rounding in a nearly-zero array is not reported as a disagreement.

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
import math
import os
import subprocess
import sys
import tempfile
from collections import defaultdict

import numpy as np

from kgrad.tools._compare_format import (  # noqa: F401 (part of this module's interface)
    TOLERANCE,
    ZOO_KINDS,
    format_matrix,
    format_table,
)

TENSOR_FLOOR = 1e-2
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


def tensor_differences(ref: dict, other: dict) -> dict[str, tuple[float, str]]:
    """Per derivative group, the largest per-array relative difference and its array.

    Returns ``{group: (difference, key)}``; NaN, Inf, a missing key or a
    different shape count as ``inf``.
    """
    groups = defaultdict(list)
    for key in sorted(set(ref) | set(other)):
        groups[_group(key)].append(key)
    out = {}
    for group, keys in groups.items():
        bad = [k for k in keys if k not in ref or k not in other or ref[k].shape != other[k].shape]
        if bad:
            out[group] = (float("inf"), bad[0])
            continue
        a = {k: ref[k].astype("float64").ravel() for k in keys}
        b = {k: other[k].astype("float64").ravel() for k in keys}
        bad = [k for k in keys if not (np.isfinite(a[k]).all() and np.isfinite(b[k]).all())]
        if bad:
            out[group] = (float("inf"), bad[0])
            continue
        total = max(
            math.sqrt(sum(float(v @ v) for v in a.values())),
            math.sqrt(sum(float(v @ v) for v in b.values())),
        )
        worst = (0.0, keys[0])
        for k in keys:
            scale = max(np.linalg.norm(a[k]), np.linalg.norm(b[k]), TENSOR_FLOOR * total)
            diff = float(np.linalg.norm(a[k] - b[k]) / scale) if scale > 0 else 0.0
            worst = max(worst, (diff, k), key=lambda t: t[0])
        out[group] = worst
    return out


def relative_differences(ref: dict, other: dict) -> dict[str, float]:
    """Per derivative group, the largest per-array relative difference (see the module)."""
    return {group: diff for group, (diff, _) in tensor_differences(ref, other).items()}


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


class WorkerError(RuntimeError):
    """A backend's worker failed; the message names the backend, the model and the error."""


def _worker_error(backend: str, code: int, stdout_lines: list[str], stderr: str, verbose: bool):
    """The error for a failed worker: its kgrad error as one line, the traceback if verbose."""
    from kgrad.tools._worker import ERROR_MARK

    records = [
        json.loads(line[len(ERROR_MARK) :]) for line in stdout_lines if line.startswith(ERROR_MARK)
    ]
    lines = stderr.rstrip().splitlines()
    if records:
        r = records[-1]
        message = f"the {backend} worker failed on {r['job']}: {r['type']}: {r['message']}"
    else:  # a crash before kgrad could report: the end of the log, whole lines
        message = f"the {backend} worker failed (exit {code})"
        if not verbose:
            message += ":\n" + "\n".join(lines[-15:])
    if verbose:
        message += f"\n--- the {backend} worker's log ---\n" + "\n".join(lines)
    elif records:
        message += " (--verbose shows the worker's traceback)"
    return WorkerError(message)


def run(jobs, backends, folder, log=print, progress=True, verbose=False):
    """Runs the jobs under each backend in its own process; returns results per backend.

    With ``progress``, a progress display on stdout counts the (backend, model)
    pairs done, as each worker reports them: a ``keras.utils.Progbar`` on a
    terminal, plain lines otherwise (``kgrad._progress``).

    Raises:
        WorkerError: a worker failed; the message names the backend and gives
            the worker's error in one line (with ``verbose``, its whole log).
    """
    from kgrad import _progress

    results = {}
    bar = _progress.progress(len(jobs) * len(backends), "model") if progress else None
    done = 0
    for backend in backends:
        own = [dict(job, out=os.path.join(folder, f"{job['name']}_{backend}.npz")) for job in jobs]
        spec = os.path.join(folder, f"jobs_{backend}.json")
        with open(spec, "w") as fh:
            json.dump(own, fh)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        # stderr goes to a file: frameworks log a lot there, and a full pipe would block.
        lines = []
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kgrad.tools._worker", spec],
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.rstrip().endswith(" done"):
                    done += 1
                    if bar is not None:
                        bar.update(done)
            code = proc.wait()
            err.seek(0)
            stderr = err.read()
        if code != 0:
            raise _worker_error(backend, code, lines, stderr, verbose)
        if bar is None:
            log(f"  {backend}: done")
        results[backend] = {job["name"]: dict(np.load(job["out"])) for job in own}
    return results


def compare(results, tolerance=TOLERANCE, worst=None):
    """Returns ``{model: {derivative: {backend: diff}}}`` against the first backend.

    ``worst``, a dict, receives ``{model: {derivative: {backend: array key}}}``:
    the array that gave each difference.
    """
    backends = list(results)
    ref = backends[0]
    table = {}
    for model in results[ref]:
        rows = defaultdict(dict)
        names = defaultdict(dict)
        for other in backends[1:]:
            for group, (diff, key) in tensor_differences(
                results[ref][model], results[other][model]
            ).items():
                rows[group][other] = diff
                names[group][other] = key
        table[model] = dict(rows)
        if worst is not None:
            worst[model] = dict(names)
    return table


def main(
    model=None,
    inputs=None,
    targets=None,
    backends=None,
    as_json=False,
    quick=False,
    tolerance=TOLERANCE,
    zoo=None,
    imports=(),
    custom_objects=(),
    verbose=False,
) -> int:
    """Runs the comparison and prints it; returns the exit code (1 past tolerance).

    ``zoo`` (``"ci"``, ``"full"`` or comma-separated names) compares the
    architecture zoo (``kgrad.tools.zoo``) instead of the demo models.
    ``imports`` (modules or ``.py`` files) and ``custom_objects``
    (``MODULE:NAME``) are loaded by every worker before a saved model.
    ``verbose`` shows a failed worker's whole log.
    """
    from kgrad.tools import _loading, demos

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
                    f"without --inputs. Pass --inputs X.npy (a batch for the model; .npz and .csv "
                    f"work too)."
                )
            jobs = [
                {
                    "name": os.path.basename(model),
                    "model": os.path.abspath(model),
                    "x": os.path.abspath(inputs),
                    "y": os.path.abspath(targets) if targets else None,
                    "activations": [],
                    "hessian": False,
                    "imports": [_loading.absolute(m) for m in imports or ()],
                    "custom_objects": [_loading.absolute(o) for o in custom_objects or ()],
                }
            ]
        results = run(jobs, backends, folder, log=log, progress=not as_json, verbose=verbose)
    largest_in: dict = {}
    table = compare(results, tolerance, worst=largest_in)
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
                    "largest_in": largest_in,
                },
                indent=2,
            )
        )
    else:
        print(
            "per derivative: the largest relative difference ||a - b|| / max(||a||, ||b||) "
            "over its arrays, and the array it is in"
        )
        print(format_table(table, backends[0], tolerance, worst=largest_in))
        if zoo is not None:
            print(f"\nlargest difference per architecture and derivative, vs {backends[0]}:")
            print(format_matrix(table, tolerance))
        print(
            f"\nlargest difference {worst:.2e} (tolerance {tolerance:.0e}): "
            f"{'all backends agree' if ok else 'DISAGREEMENT'}"
        )
    return 0 if ok else 1
