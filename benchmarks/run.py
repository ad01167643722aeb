"""Runs kgrad's benchmark on every backend, one process each, and prints one table.

Usage::

    python benchmarks/run.py [--quick] [--backends jax,tensorflow,torch] [--markdown]

Each backend runs ``python -m kgrad.tools.bench --json`` in its own subprocess (the
same interpreter as this script, ``KERAS_BACKEND`` set, ``TF_CPP_MIN_LOG_LEVEL=3``),
one after the other, never in parallel. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "tensorflow", "torch")


def _load_formatting():
    """``kgrad/tools/_bench_format.py`` loaded from its file, for its formatters.

    Importing the ``kgrad`` package would import Keras (and a backend) in this
    process; ``kgrad/tools/_bench_format.py`` alone imports only the standard library.
    """
    spec = importlib.util.spec_from_file_location(
        "_kgrad_bench", ROOT / "kgrad" / "tools" / "_bench_format.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_backend(backend: str, quick: bool, repeats: int | None) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "kgrad.tools.bench", "--json"]
    if quick:
        cmd.append("--quick")
    if repeats is not None:
        cmd += ["--repeats", str(repeats)]
    # Progress goes to stderr (passed through); the JSON result comes on stdout.
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    # Exit code 1 with JSON on stdout means a disagreement, flagged in the rows.
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 5 rounds")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated (default: all three)"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per case")
    parser.add_argument("--json", help="also write the rows and environments to this file")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")

    bench = _load_formatting()
    rows, environments, failed = [], [], []
    for backend in backends:
        if importlib.util.find_spec(backend) is None:
            print(f"benchmarks/run.py: {backend} is not installed; skipped", file=sys.stderr)
            failed.append(backend)
            continue
        print(f"benchmarks/run.py: running {backend} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = _run_backend(backend, args.quick, args.repeats)
        except RuntimeError as err:
            print(f"benchmarks/run.py: {backend}: {err}", file=sys.stderr)
            failed.append(backend)
            continue
        print(
            f"benchmarks/run.py: {backend} done in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
        environments.append(result["environment"])
        rows += result["rows"]

    if rows:
        print(bench.format_table(rows, environments))
        if args.markdown:
            print()
            print(bench.format_markdown(rows, environments))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environments": environments, "rows": rows}, f, indent=2)
    if failed:
        print(f"benchmarks/run.py: failed or skipped: {', '.join(failed)}", file=sys.stderr)
        return 2
    return 1 if any(r["note"].startswith("WARNING") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
