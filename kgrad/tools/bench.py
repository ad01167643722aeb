"""``kgrad bench``: kgrad against hand-written native code, on the active backend.

Every case times one kgrad call against the code an expert would write
directly in the framework Keras runs on, in the same process, on the same
model, weights and inputs:

- a PINN-sized MLP (2-64-64-64-1, tanh): per-sample input gradient,
  Jacobian and Hessian of output 0, at N = 256, 4096 and 65536;
- the weight gradient of the MSE loss of a small CNN
  (28x28x1 -> Conv2D 16 -> MaxPool -> Conv2D 32 -> global average pool -> 10);
- the per-sample loop of old forum answers (one eager model call and one
  gradient per sample) against kgrad's one batched input-gradient call.

The native references are

- JAX: ``jax.jit(jax.vmap(jax.grad / jax.jacrev / jax.hessian))`` of a
  single-sample function built on ``model.stateless_call``, the weight values
  passed as arguments (not closed over); the CNN: ``jax.jit(jax.grad)`` of the
  loss with respect to the trainable values;
- PyTorch: ``torch.func.vmap`` of ``torch.func.grad / jacrev / hessian`` of
  the same single-sample function (weights as arguments); the CNN:
  ``torch.func.grad`` of the loss;
- TensorFlow: ``tf.function`` with ``tf.GradientTape`` (``tape.gradient`` of
  the sum, ``tape.batch_jacobian``, nested tapes for the Hessian), the
  weights read from the variables inside the function; the CNN: a tape and
  ``tape.gradient`` with respect to ``model.trainable_variables``.

Method: kgrad and the native code are checked to agree once per case (after
conversion to NumPy, ``rtol=1e-4, atol=1e-5`` on a CPU and ``rtol=1e-2, atol=1e-3``
on an accelerator, whose float32 matrix products may round to TF32's 10-bit
mantissa: JAX's default on NVIDIA GPUs; a disagreement is flagged in the
row's note). Both are called once (kgrad's first call, which compiles on JAX
and TensorFlow, is reported as ``first_call_s``) and once more to warm up.
Then, for each of R rounds, one kgrad call and one native call are timed with
``time.perf_counter``, in alternating order, each synchronised (JAX:
``block_until_ready`` on every leaf; TensorFlow and PyTorch: every leaf
converted to NumPy). The medians of the kgrad times, the native times and the
per-round ratios kgrad/native are reported, with the range (min-max) of the
ratios. The ratio is the median of the per-round ratios, not the ratio of the
two medians, so under noise it can differ from kgrad s / native s; the range
shows how much the rounds varied. Expensive cases run fewer rounds
(at least 3) so that a case takes about a minute at most.

Usage (only the active Keras backend is measured)::

    KERAS_BACKEND=jax python -m kgrad.tools.bench --quick
    KERAS_BACKEND=torch kgrad bench --json

``benchmarks/run.py`` runs all three backends, one process each, and prints
one table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kgrad.tools._bench_format import COLUMNS, environment, format_markdown, format_table
from kgrad.tools._bench_native import _NATIVE, _cnn, _forward, _mlp

__all__ = ["COLUMNS", "run", "format_table", "format_markdown", "environment", "main"]

#: Rounds per case (full run, quick run).
ROUNDS = 15
QUICK_ROUNDS = 5
#: Fewest rounds of an expensive case.
MIN_ROUNDS = 3
#: Seconds of timed rounds per case, beyond which fewer rounds run.
BUDGET_S = 60.0
QUICK_BUDGET_S = 10.0
#: Agreement tolerance between kgrad and the native code on a CPU.
RTOL, ATOL = 1e-4, 1e-5
#: The same on an accelerator, where float32 matrix products may round to TF32's
#: 10-bit mantissa (JAX's default on NVIDIA GPUs): kgrad and the native code group
#: their products differently (a batch against a loop of samples, say), and
#: their results then differ by about 1e-3 of the values.
ACCELERATOR_RTOL, ACCELERATOR_ATOL = 1e-2, 1e-3


def _tolerance() -> tuple[float, float]:
    """``(rtol, atol)`` of the agreement check on the device the backend computes on."""
    on_cpu = environment().get("device", "cpu") == "cpu"
    return (RTOL, ATOL) if on_cpu else (ACCELERATOR_RTOL, ACCELERATOR_ATOL)


MLP_SIZES = (256, 4096, 65536)
QUICK_MLP_SIZES = (256, 4096)
CNN_BATCH, QUICK_CNN_BATCH = 128, 32
LOOP_N, QUICK_LOOP_N = 256, 64


# --------------------------------------------------------------------- helpers


def _log(message: str) -> None:
    print(f"kgrad bench: {message}", file=sys.stderr, flush=True)


def _leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for k in value for leaf in _leaves(value[k])]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _sync(backend: str) -> Callable[[Any], None]:
    """A function that waits until every leaf of a result is computed."""
    if backend == "jax":
        wait = lambda leaf: leaf.block_until_ready()
    elif backend == "torch":
        wait = lambda leaf: leaf.detach().cpu().numpy()
    else:
        wait = lambda leaf: leaf.numpy()

    def sync(out) -> None:
        for leaf in _leaves(out):
            wait(leaf)

    return sync


def _numpy(value):
    import keras

    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numpy(v) for v in value]
    return np.asarray(keras.ops.convert_to_numpy(value))


def _disagreement(a, b) -> str | None:
    """``None`` when ``a`` and ``b`` agree, else what differs."""
    a, b = _numpy(a), _numpy(b)
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return "different keys"
        for k in a:
            problem = _disagreement(a[k], b[k])
            if problem:
                return f"{k}: {problem}"
        return None
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    rtol, atol = _tolerance()
    if not np.allclose(a, b, rtol=rtol, atol=atol):
        return f"max |diff| {float(np.max(np.abs(a.astype('float64') - b))):.2e}"
    return None


def _timed(fn: Callable[[], Any], sync: Callable[[Any], None]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - start, out


def _measure(
    backend: str,
    case: str,
    n: int,
    kgrad_fn: Callable[[], Any],
    native_fn: Callable[[], Any],
    rounds: int,
    budget_s: float,
    note: str = "",
    speedup: bool = False,
    compare: bool = True,
) -> dict[str, Any]:
    """Checks agreement (unless ``compare=False``), warms up, then times interleaved rounds."""
    sync = _sync(backend)
    gc.collect()
    first, k_out = _timed(kgrad_fn, sync)
    native_first, n_out = _timed(native_fn, sync)
    problem = _disagreement(k_out, n_out) if compare else None
    del k_out, n_out
    warm_k, _ = _timed(kgrad_fn, sync)
    warm_n, _ = _timed(native_fn, sync)
    # Expensive cases run fewer rounds, never fewer than MIN_ROUNDS (or `rounds`).
    affordable = int(budget_s / max(warm_k + warm_n, 1e-9))
    r = max(min(rounds, MIN_ROUNDS), min(rounds, affordable))
    k_times, n_times, ratios = [], [], []
    for i in range(r):
        if i % 2 == 0:
            tk, _ = _timed(kgrad_fn, sync)
            tn, _ = _timed(native_fn, sync)
        else:
            tn, _ = _timed(native_fn, sync)
            tk, _ = _timed(kgrad_fn, sync)
        k_times.append(tk)
        n_times.append(tn)
        ratios.append(tk / tn)
    kgrad_s, native_s = statistics.median(k_times), statistics.median(n_times)
    parts = []
    if problem:
        parts.append(f"WARNING kgrad != native ({problem})")
        _log(f"WARNING: {case} n={n}: kgrad and native results differ: {problem}")
    if speedup:
        parts.append(f"speed-up {native_s / kgrad_s:.1f}x")
    if note:
        parts.append(note)
    parts.append(f"native 1st {native_first:.3f}s")
    if r != rounds:
        parts.append(f"R={r}")
    row = {
        "backend": backend,
        "case": case,
        "n": n,
        "kgrad_s": kgrad_s,
        "native_s": native_s,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "first_call_s": first,
        "note": "; ".join(parts),
    }
    _log(
        f"{case:<28} n={n:<6} kgrad {kgrad_s:.6f}s native {native_s:.6f}s "
        f"ratio {row['ratio']:.3g} (median of {r} rounds, range {min(ratios):.3g}-"
        f"{max(ratios):.3g})"
    )
    return row


# ------------------------------------------------------------------------- run


def _warm_up_machinery() -> None:
    """One tiny kgrad call, so that ``first_call_s`` is not the import of kgrad's backend."""
    import keras

    import kgrad

    tiny = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    kgrad.grad(tiny, np.ones((2, 2), "float32"))


def run(quick: bool = False, repeats: int | None = None) -> list[dict[str, Any]]:
    """Runs every case on the active Keras backend.

    Args:
        quick: smaller sizes and fewer rounds (N = 256 and 4096, a CNN batch
            of 32, a loop over 64 samples, 5 rounds).
        repeats: rounds per case (default 15, quick 5); expensive cases run
            fewer, but at least 3.

    Returns:
        One dict per case with the keys ``backend``, ``case``, ``n``,
        ``kgrad_s`` and ``native_s`` (median seconds per call), ``ratio``
        (median per-round kgrad/native), ``first_call_s`` (kgrad's first call,
        compilation included) and ``note`` (the per-sample loop's speed-up,
        disagreements, the native first call, reduced rounds).

    Raises:
        NotImplementedError: when Keras runs on a backend kgrad does not support.
    """
    import keras

    import kgrad

    backend = keras.backend.backend()
    if backend not in _NATIVE:
        raise NotImplementedError(
            f"kgrad bench needs the jax, tensorflow or torch backend. Received: "
            f"keras.backend.backend()={backend!r}."
        )
    native = _NATIVE[backend]
    rounds = repeats if repeats is not None else (QUICK_ROUNDS if quick else ROUNDS)
    if rounds < 1:
        raise ValueError(f"`repeats` must be at least 1. Received: repeats={repeats!r}.")
    budget = QUICK_BUDGET_S if quick else BUDGET_S
    rng = np.random.default_rng(0)
    convert = keras.ops.convert_to_tensor
    _warm_up_machinery()
    rows = []

    keras.utils.set_random_seed(0)
    mlp = _mlp()
    for n in QUICK_MLP_SIZES if quick else MLP_SIZES:
        x = convert(rng.uniform(-1.0, 1.0, size=(n, 2)).astype("float32"))
        cases = [
            ("mlp input grad", "grad", lambda x=x: kgrad.grad(mlp, x)),
            ("mlp jacobian", "jacobian", lambda x=x: kgrad.jacobian(mlp, x)),
            ("mlp hessian (output 0)", "hessian", lambda x=x: kgrad.hessian(mlp, x, target=0)),
        ]
        for case, kind, kgrad_fn in cases:
            rows.append(_measure(backend, case, n, kgrad_fn, native(kind, mlp, x), rounds, budget))
        # The per-sample Hessian against one plain forward pass of the batch.
        rows.append(
            _measure(
                backend,
                "mlp hessian vs forward",
                n,
                cases[2][2],
                _forward(backend, mlp, x),
                rounds,
                budget,
                note="native = model(x) forward pass",
                compare=False,
            )
        )

    keras.utils.set_random_seed(0)
    cnn = _cnn()
    batch = QUICK_CNN_BATCH if quick else CNN_BATCH
    xc = convert(rng.normal(size=(batch, 28, 28, 1)).astype("float32"))
    yc = convert(rng.normal(size=(batch, 10)).astype("float32"))
    rows.append(
        _measure(
            backend,
            "cnn weight grad (mse)",
            batch,
            lambda: kgrad.grad(cnn, xc, y=yc, loss="mse", wrt="weights"),
            native("cnn", cnn, xc, yc),
            rounds,
            budget,
        )
    )

    n = QUICK_LOOP_N if quick else LOOP_N
    x = convert(rng.uniform(-1.0, 1.0, size=(n, 2)).astype("float32"))
    rows.append(
        _measure(
            backend,
            "mlp input grad vs loop",
            n,
            lambda: kgrad.grad(mlp, x),
            native("loop", mlp, x),
            rounds,
            budget,
            note="native = eager per-sample loop",
            speedup=True,
        )
    )
    return rows


# -------------------------------------------------------------------- printing


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark on the active backend and prints a table (or JSON).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``):
            ``[--quick] [--json] [--repeats R]``.

    Returns:
        The exit code: 0; 1 when kgrad and the native code disagreed somewhere;
        2 for an unsupported backend or a bad ``--repeats``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m kgrad.tools.bench",
        description="Times kgrad against hand-written native code on the active Keras backend.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 5 rounds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per case")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    env = environment()
    _log(
        f"{env['framework']}, keras {env['keras']}, {env['cpu']}, {env['cores']} cores"
        + (" (quick)" if args.quick else "")
    )
    try:
        rows = run(quick=args.quick, repeats=args.repeats)
    except (ValueError, NotImplementedError) as err:
        _log(str(err))
        return 2
    if args.json:
        print(json.dumps({"environment": env, "rows": rows}, indent=2))
    else:
        print(format_table(rows, [env]))
    return 1 if any(r["note"].startswith("WARNING") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
