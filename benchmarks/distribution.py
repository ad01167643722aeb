"""Per-sample Jacobians and saliency under keras.distribution, on 1, 2, 4 and 8 devices.

Usage::

    python benchmarks/distribution.py [--inputs N] [--devices 1,2,4,8]

Each device count runs in a process of its own, on simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``), under
``keras.distribution.DataParallel`` over all of them: ``kgrad.jacobian(model,
x)`` and ``kgrad.attribution.saliency(model, x, target=0)`` of an MLP
(16-128-128-16, tanh) over N = 65,536 inputs (default). Wall time means
nothing with every simulated device on the same two cores, so the table gives
what the compiled program does, read from ``jax.jit(...).lower(...).compile()``
of kgrad's own compiled call: its memory per device (``memory_analysis``:
arguments, outputs, temporaries) and the collectives in its HLO
(``as_text``), with how each result is laid out and its largest difference
from the one-device result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def child(n_inputs: int) -> None:
    import jax
    import keras
    import numpy as np

    import kgrad
    from kgrad.backends import jax as kgrad_jax

    compiled = []

    def recording_compile_call(f):
        jitted = jax.jit(f)

        def call(state, arrays):
            compiled.append(jitted.lower(state, arrays).compile())
            return jitted(state, arrays)

        return call

    kgrad_jax.compile_call = recording_compile_call  # before kgrad's first call reads it
    keras.utils.set_random_seed(0)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(16),
        ]
    )
    x = np.random.default_rng(0).normal(size=(n_inputs, 16)).astype("float32")
    rows = {}
    for name, fn in (
        ("per-sample Jacobian", lambda: kgrad.jacobian(model, x)),
        ("saliency", lambda: kgrad.attribution.saliency(model, x, target=0)),
    ):
        compiled.clear()
        result = fn()
        program = compiled[-1]
        memory = program.memory_analysis()
        text = program.as_text()
        rows[name] = {
            "argument_mib": memory.argument_size_in_bytes / 2**20,
            "output_mib": memory.output_size_in_bytes / 2**20,
            "temp_mib": memory.temp_size_in_bytes / 2**20,
            "collectives": {c: len(re.findall(rf"\b{c}(?:-start)?\(", text)) for c in COLLECTIVES},
            "sharding": str(result.sharding.spec),
            "shape": list(result.shape),
            "checksum": float(np.sum(np.abs(np.asarray(result), dtype="float64"))),
            "sample": np.asarray(result[:: max(1, n_inputs // 64)]).ravel().tolist(),
        }
    print(json.dumps({"devices": len(jax.devices()), "rows": rows}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=65536)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.inputs)
        return
    runs = []
    for d in [int(v) for v in args.devices.split(",")]:
        env = dict(
            os.environ,
            KERAS_BACKEND="jax",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
            KGRAD_PROGRESS="0",
        )
        cmd = [sys.executable, __file__, "--child", "--inputs", str(args.inputs)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    import numpy as np

    first = runs[0]["rows"]
    print(f"N = {args.inputs} inputs, DataParallel over D simulated CPU devices")
    print()
    print(
        "| function | D | layout of the result | arguments MiB/device | outputs MiB/device "
        "| temporaries MiB/device | collectives | max diff vs D = 1 |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|")
    for name in first:
        for run in runs:
            row = run["rows"][name]
            used = {c: k for c, k in row["collectives"].items() if k}
            listed = ", ".join(f"{c} {k}" for c, k in used.items()) or "none"
            diff = float(np.max(np.abs(np.array(row["sample"]) - np.array(first[name]["sample"]))))
            print(
                f"| {name} | {run['devices']} | `{row['sharding']}` | {row['argument_mib']:.2f} "
                f"| {row['output_mib']:.2f} | {row['temp_mib']:.2f} | {listed} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
