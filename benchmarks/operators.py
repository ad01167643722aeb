"""Differential operators: kgrad's Laplacian and Taylor terms against native code.

Usage::

    KERAS_BACKEND=jax python benchmarks/operators.py [--quick] [--repeats R]

Workload: a tanh MLP d-64-64-64-1 (a functional ``keras.Model``), N = 1024
points, d in {2, 8, 32, 128} (``--quick``: N = 256, d in {2, 32}). On the
active backend, in one process, it prints five tables:

1. ``kgrad.laplacian`` (exact) against the trace of ``kgrad.hessian(model, x,
   target=0)``, per d.
2. ``kgrad.laplacian`` against hand-written native Laplacians on a pure
   backend MLP with the model's kernels copied (same weights):
   JAX: ``folx.forward_laplacian`` (if folx is installed) and
   ``jit(vmap(trace(jax.hessian(f))))``; PyTorch: a forward-Laplacian
   propagation through the Linear/tanh layers and ``vmap`` over the d
   one-hot directions of nested ``torch.func.jvp``; TensorFlow: nested
   ``tf.autodiff.ForwardAccumulator`` on the batch repeated d times (one
   one-hot direction per copy). All backends: "nested backpropagation" as in
   DeepXDE (one reverse pass of the first derivative per input feature).
3. ``kgrad.taylor(model, x, v, k)`` and ``kgrad.partial(model, x, (0,) * k)``
   for k = 1..6 on a 1-d input, against k nested reverse-mode gradients.
4. The stochastic (Hutchinson) Laplacian at the largest d, 16 samples, seed 0:
   relative error and speed-up against the exact one.
5. Peak memory (RSS increase of a fresh child process) of the exact
   Laplacian and of the per-sample Hessian at the largest d.

Timing: every callable is called twice to warm up (compiling on JAX and
TensorFlow), then R rounds (default 5) call each once, interleaved, each
synchronised (``block_until_ready`` on JAX, a copy to NumPy elsewhere). The
tables show medians (seconds per call); ratios are of medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kgrad  # noqa: E402

BACKEND = keras.backend.backend()
WIDTH = 64
DEPTH = 3


# --------------------------------------------------------------------------- model


def build_model(d: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((d,))
    h = inp
    for _ in range(DEPTH):
        h = keras.layers.Dense(WIDTH, activation="tanh")(h)
    return keras.Model(inp, keras.layers.Dense(1)(h))


def kernels(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Dense layers' (kernel, bias) as NumPy, in order."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return [
        (keras.ops.convert_to_numpy(layer.kernel), keras.ops.convert_to_numpy(layer.bias))
        for layer in dense
    ]


def points(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, d)).astype("float32")


# --------------------------------------------------------------------------- timing


def to_numpy(out):
    if isinstance(out, (list, tuple)):
        return [to_numpy(o) for o in out]
    if isinstance(out, dict):
        return {k: to_numpy(v) for k, v in out.items()}
    if isinstance(out, np.ndarray):
        return out
    if BACKEND == "torch":
        return out.detach().cpu().numpy()
    return np.asarray(keras.ops.convert_to_numpy(out))


def sync(out):
    if out is None:
        return None
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(out)
    else:
        to_numpy(out)
    return out


def bench(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each callable, rounds interleaved."""
    for fn in fns.values():
        sync(fn())
        sync(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            sync(fn())
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def rel_err(a, b) -> float:
    a, b = np.ravel(to_numpy(a)), np.ravel(to_numpy(b))
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def table(title: str, header: list[str], rows: list[list], note: str = "") -> None:
    print(f"\n### {title}")
    if note:
        print(note)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(c) for c in row) + " |")
    sys.stdout.flush()


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "nan"
        if c == 0 or 1e-3 <= abs(c) < 1e4:
            return f"{c:.4g}" if abs(c) >= 0.01 else f"{c:.6f}"
        return f"{c:.2e}"
    return str(c)


# --------------------------------------------------------------------------- native code


def native_jax(kern, d):
    import jax
    import jax.numpy as jnp

    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in kern]

    def mlp(p, x):  # x (..., d) -> (...)
        h = x
        for w, b in p[:-1]:
            h = jnp.tanh(h @ w + b)
        w, b = p[-1]
        return (h @ w + b)[..., 0]

    hess = jax.jit(
        jax.vmap(lambda p, x: jnp.trace(jax.hessian(lambda y: mlp(p, y))(x)), in_axes=(None, 0))
    )

    def nested(p, x):
        g = jax.grad(lambda y: mlp(p, y).sum())
        total = 0.0
        for i in range(d):
            total = total + jax.grad(lambda y, i=i: g(y)[:, i].sum())(x)[:, i]
        return total

    nested = jax.jit(nested)
    out = {
        "jit(vmap(trace(jax.hessian)))": lambda x: hess(params, x),
        "nested backprop (d reverse passes)": lambda x: nested(params, x),
    }
    try:
        from folx import forward_laplacian
    except ImportError:
        print("note: folx is not installed; the folx baseline is skipped")
    else:
        fl = jax.jit(
            jax.vmap(
                lambda p, x: forward_laplacian(lambda y: mlp(p, y))(x).laplacian, in_axes=(None, 0)
            )
        )
        out = {"folx forward_laplacian": lambda x: fl(params, x), **out}
    return out


def native_torch(kern, d):
    import torch

    params = [(torch.as_tensor(w), torch.as_tensor(b)) for w, b in kern]

    def mlp(x):
        h = x
        for w, b in params[:-1]:
            h = torch.tanh(h @ w + b)
        w, b = params[-1]
        return (h @ w + b)[..., 0]

    def forward_laplacian(x):
        # value h (B, m), first-order tangents j (B, d, m), Laplacian term s (B, m)
        with torch.no_grad():
            h = x
            j = torch.eye(d, dtype=x.dtype).expand(x.shape[0], d, d)
            s = torch.zeros_like(x)
            for w, b in params[:-1]:
                z, j, s = h @ w + b, j @ w, s @ w
                h = torch.tanh(z)
                d1 = 1 - h * h
                d2 = -2 * h * d1
                s = d1 * s + d2 * (j * j).sum(1)
                j = d1.unsqueeze(1) * j
            w, _ = params[-1]
            return (s @ w)[:, 0]

    def jvp_jvp(x):
        with torch.no_grad():
            eye = torch.eye(d, dtype=x.dtype).unsqueeze(1).expand(d, x.shape[0], d)

            def second(v):
                first = lambda y: torch.func.jvp(mlp, (y,), (v,))[1]  # noqa: E731
                return torch.func.jvp(first, (x,), (v,))[1]

            return torch.func.vmap(second)(eye).sum(0)

    def nested(x):
        x = x.detach().requires_grad_(True)
        g = torch.autograd.grad(mlp(x).sum(), x, create_graph=True)[0]
        total = 0
        for i in range(d):
            total = total + torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i]
        return total

    return {
        "forward-Laplacian propagation": forward_laplacian,
        "vmap(jvp(jvp)) over one-hots": jvp_jvp,
        "nested backprop (d reverse passes)": nested,
    }


def native_tf(kern, d):
    import tensorflow as tf

    params = [(tf.constant(w), tf.constant(b)) for w, b in kern]

    def mlp(x):
        h = x
        for w, b in params[:-1]:
            h = tf.tanh(h @ w + b)
        w, b = params[-1]
        return (h @ w + b)[..., 0]

    @tf.function(reduce_retracing=True)
    def fwd(x):
        n = tf.shape(x)[0]
        xs = tf.reshape(tf.tile(x[None], [d, 1, 1]), [-1, d])
        v = tf.reshape(tf.tile(tf.eye(d)[:, None, :], [1, n, 1]), [-1, d])
        with tf.autodiff.ForwardAccumulator(xs, v) as outer:
            with tf.autodiff.ForwardAccumulator(xs, v) as inner:
                y = mlp(xs)
            jv = inner.jvp(y)
        return tf.reduce_sum(tf.reshape(outer.jvp(jv), [d, n]), axis=0)

    @tf.function(reduce_retracing=True)
    def nested(x):
        with tf.GradientTape(persistent=True) as t1:
            t1.watch(x)
            with tf.GradientTape() as t2:
                t2.watch(x)
                y = tf.reduce_sum(mlp(x))
            g = t2.gradient(y, x)
            cols = [g[:, i] for i in range(d)]
        return tf.add_n([t1.gradient(cols[i], x)[:, i] for i in range(d)])

    return {"nested ForwardAccumulator": fwd, "nested backprop (d reverse passes)": nested}


def native_laplacians(kern, d):
    return {"jax": native_jax, "torch": native_torch, "tensorflow": native_tf}[BACKEND](kern, d)


def native_nested_reverse(kern, k):
    """u -> d^k u / dx^k for a 1-d input, by k nested reverse-mode gradients."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in kern]

        def mlp(x):
            h = x
            for w, b in params[:-1]:
                h = jnp.tanh(h @ w + b)
            w, b = params[-1]
            return (h @ w + b)[..., 0]

        f = mlp
        for _ in range(k):
            f = (lambda g: lambda x: jax.grad(lambda y: g(y).sum())(x)[:, 0])(f)
        return jax.jit(f)
    if BACKEND == "torch":
        import torch

        params = [(torch.as_tensor(w), torch.as_tensor(b)) for w, b in kern]

        def fn(x):
            x = x.detach().requires_grad_(True)
            h = x
            for w, b in params[:-1]:
                h = torch.tanh(h @ w + b)
            w, b = params[-1]
            u = (h @ w + b)[:, 0]
            for i in range(k):
                u = torch.autograd.grad(u.sum(), x, create_graph=i < k - 1)[0][:, 0]
            return u

        return fn
    import tensorflow as tf

    params = [(tf.constant(w), tf.constant(b)) for w, b in kern]

    def deriv(x, order):
        if order == 0:
            h = x
            for w, b in params[:-1]:
                h = tf.tanh(h @ w + b)
            w, b = params[-1]
            return (h @ w + b)[:, 0]
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = deriv(x, order - 1)
        return tape.gradient(u, x)[:, 0]

    return tf.function(lambda x: deriv(x, k))


def as_tensor(x):
    if BACKEND == "torch":
        import torch

        return torch.as_tensor(x)
    return keras.ops.convert_to_tensor(x)


def trace_of(h):
    return keras.ops.trace(h, axis1=1, axis2=2)


# --------------------------------------------------------------------------- sections


def section_laplacian(n, dims, repeats):
    rows_h, rows_n = [], []
    for d in dims:
        model = build_model(d)
        x = as_tensor(points(n, d))
        lap = lambda model=model, x=x: kgrad.laplacian(model, x)  # noqa: E731
        tr = lambda model=model, x=x: trace_of(kgrad.hessian(model, x, target=0))  # noqa: E731
        ref = to_numpy(lap())
        t = bench({"lap": lap, "tr": tr}, repeats)
        rows_h.append([d, t["lap"], t["tr"], t["tr"] / t["lap"], rel_err(tr(), ref)])
        natives = native_laplacians(kernels(model), d)
        natives = {k: functools.partial(f, x) for k, f in natives.items()}
        t_nat = bench({"lap": lap, **natives}, repeats)
        for name, fn in natives.items():
            rows_n.append(
                [d, name, t_nat["lap"], t_nat[name], t_nat["lap"] / t_nat[name], rel_err(fn(), ref)]
            )
        print(f"  d={d} done", file=sys.stderr)
    table(
        f"1. Exact Laplacian vs trace of the per-sample Hessian ({BACKEND}, N={n})",
        ["d", "laplacian s", "trace(hessian) s", "speed-up", "max rel diff"],
        rows_h,
    )
    table(
        f"2. Exact Laplacian vs native code ({BACKEND}, N={n})",
        ["d", "native", "kgrad s", "native s", "kgrad/native", "max rel diff"],
        rows_n,
        "kgrad/native below 1: kgrad is faster (speed-up = 1 / ratio).",
    )


def _try(fn, what):
    """``fn()``, or None (with the error's last lines on stderr) if it raises."""
    try:
        return fn()
    except Exception:  # reported, and the row marked, instead of ending the run
        import traceback

        lines = traceback.format_exc().strip().splitlines()
        print(f"  {what} failed:\n    " + "\n    ".join(lines[-3:]), file=sys.stderr)
        return None


def section_taylor(n, orders, repeats):
    model = build_model(1)
    x = as_tensor(points(n, 1))
    v = np.ones((1,), "float32")
    kern = kernels(model)
    rows = []
    for k in orders:
        fns = {
            "taylor": lambda k=k: kgrad.taylor(model, x, v, k),
            "partial": lambda k=k: kgrad.partial(model, x, (0,) * k),
            "nested": (lambda f: lambda: f(x))(native_nested_reverse(kern, k)),
        }
        ref = to_numpy(fns["nested"]())
        errs, failed = [], []
        for name, pick in (("taylor", lambda r, k=k: r[k][:, 0]), ("partial", lambda r: r[:, 0])):
            out = _try(fns[name], f"k={k} {name}")
            if out is None:
                failed.append(name)
                fns[name] = lambda: None
            else:
                errs.append(rel_err(pick(out), ref))
        t = bench(fns, repeats)
        row = [k, *(float("nan") if key in failed else t[key] for key in fns)]
        rows.append(row + [max(errs) if errs else float("nan")])
        print(f"  k={k} done", file=sys.stderr)
    base = rows[0]
    out = [[k, t, t / base[1], p, p / base[2], r, r / base[3], e] for k, t, p, r, e in rows]
    table(
        f"3. Order curve, d=1 ({BACKEND}, N={n})",
        [
            "k",
            "taylor s",
            "taylor c(k)/c(1)",
            "partial s",
            "partial c(k)/c(1)",
            "nested reverse s",
            "nested c(k)/c(1)",
            "max rel diff",
        ],
        out,
        "taylor returns all terms 0..k; partial and nested reverse return d^k u/dx^k\n"
        "(nan: the kgrad call failed; its error is on stderr).",
    )


def section_stochastic(n, d, repeats):
    model = build_model(d)
    x = as_tensor(points(n, d))
    exact = lambda: kgrad.laplacian(model, x)  # noqa: E731
    est = lambda: kgrad.laplacian(model, x, method="stochastic", samples=16, seed=0)  # noqa: E731
    e, s = to_numpy(exact()), to_numpy(est())
    err = float(np.mean(np.abs(s - e)) / np.mean(np.abs(e)))
    t = bench({"exact": exact, "stochastic": est}, repeats)
    table(
        f"4. Stochastic Laplacian, 16 Rademacher samples, seed 0 ({BACKEND}, N={n}, d={d})",
        ["d", "exact s", "stochastic s", "speed-up", "mean abs err / mean abs exact"],
        [[d, t["exact"], t["stochastic"], t["exact"] / t["stochastic"], err]],
    )


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child_memory(kind, n, d):
    """Runs in a fresh process: peak RSS increase of one computation (two calls).

    Linux: the peak (VmHWM) is reset to the current RSS through
    ``/proc/self/clear_refs`` after the model is built, so the imports' own peak
    does not hide the computation's. Elsewhere ``ru_maxrss`` is used as is.
    """
    model = build_model(d)
    x = as_tensor(points(n, d))
    sync(model(x))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, peak = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    fn = {
        "laplacian": lambda: kgrad.laplacian(model, x),
        "hessian": lambda: kgrad.hessian(model, x, target=0),
    }[kind]
    sync(fn())
    sync(fn())
    print(json.dumps({"before_kib": before, "after_kib": peak()}))


def section_memory(n, d):
    rows = []
    for kind in ("laplacian", "hessian"):
        cmd = [sys.executable, __file__, "--memory-child", kind, "--n", str(n), "--d", str(d)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append([kind, "failed", "", ""])
            continue
        rows.append(
            [
                kind,
                res["before_kib"] / 1024,
                res["after_kib"] / 1024,
                (res["after_kib"] - res["before_kib"]) / 1024,
            ]
        )
    hess_mib = n * d * d * 4 / 2**20
    tang_mib = min(d, 128) * n * WIDTH * 4 / 2**20
    table(
        f"5. Peak RSS of a fresh process ({BACKEND}, N={n}, d={d})",
        ["computation", "RSS after model build MiB", "peak RSS MiB", "increase MiB"],
        rows,
        "Peak RSS (VmHWM) of a child that builds the model, runs one forward pass,\n"
        "resets the peak, then runs the computation twice\n"
        "(the first call includes tracing/compiling on JAX and TF).\n"
        f"Analytic sizes: Hessian result N*d*d*4 B = {hess_mib:.0f} MiB; one layer's"
        f" tangents (d, N, {WIDTH}) float32 = {tang_mib:.0f} MiB per stored term.",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=256, d in {2, 32}, 3 rounds")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per case (default 5)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (1-5)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _child_memory(args.memory_child, args.n, args.d)
        return 0
    n, dims = (256, [2, 32]) if args.quick else (1024, [2, 8, 32, 128])
    repeats = args.repeats or (3 if args.quick else 5)
    orders = [1, 2, 3, 4] if args.quick else [1, 2, 3, 4, 5, 6]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    import platform

    versions = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}
    fw = __import__(versions[BACKEND])
    print(
        f"backend {BACKEND} {fw.__version__}, keras {keras.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"N={n}, d={dims}, {repeats} rounds"
    )
    start = time.perf_counter()
    if "1" not in skip or "2" not in skip:
        section_laplacian(n, dims, repeats)
    if "3" not in skip:
        section_taylor(n, orders, repeats)
    if "4" not in skip:
        section_stochastic(n, dims[-1], repeats)
    if "5" not in skip:
        section_memory(n, dims[-1])
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
