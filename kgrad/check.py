"""``check_grad``: kgrad's gradients against central finite differences.

The gradient checked is what :func:`kgrad.grad` returns for the same arguments
(the same compiled, cached function a user's call runs). The objective is
exactly the one it differentiates (the loss, or the sum of the
``target``-selected outputs), evaluated with every entry of ``wrt`` moved by
``+h`` and ``-h`` in turn.

Steps and tolerances follow the precision the backend actually computes at,
which is not always the dtype: Keras runs some float64 operations (``ops.mean``,
layer normalisation) at float32 on some backends. For float64 values this is
measured once per model and request (``kgrad._precision``).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kgrad import _checks, _engine, _errors, _precision, api
from kgrad import backends as _backends

tree = keras.tree

# Step, relative tolerance per dtype. The step is about the cube root of the
# machine epsilon (it balances truncation error, O(h^2), against rounding
# error, O(eps / h)); it is scaled by max(1, |value|) for each entry.
_DEFAULTS = {
    "float64": (1e-6, 1e-5),
    "float32": (5e-3, 1e-2),
    "float16": (1e-1, 1e-1),
    "bfloat16": (2e-1, 2e-1),
}


@dataclasses.dataclass(frozen=True)
class GradCheck:
    """The result of :func:`check_grad`.

    Attributes:
        max_abs_err: largest ``|autodiff - central difference|`` over the
            checked entries (NaN when either side has a NaN or Inf).
        max_rel_err: largest ``|autodiff - fd| / max(|autodiff|, |fd|, atol)``.
        ok: whether every checked entry has
            ``|autodiff - fd| <= atol + rtol * |fd|`` and nothing is NaN or Inf.
        worst: the entry furthest outside the tolerance, as text.
        checked: how many entries were checked; ``total``: how many there are.
        eps, rtol, atol: the step and tolerances used.
        precision: the floating-point precision the steps and default
            tolerances were chosen for: the dtype of the checked values, or
            ``"float32"`` for float64 values when the objective is measured to
            be computed at float32 precision (Keras runs some float64
            operations at float32 on some backends), or the lowest
            ``compute_dtype`` of the model's layers under mixed precision.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> result = kgrad.check_grad(model, np.ones((1, 2), "float32"))
    >>> result.ok, result.checked, result.total
    (True, 2, 2)
    >>> result.precision
    'float32'
    """

    max_abs_err: float
    max_rel_err: float
    ok: bool
    worst: str
    checked: int
    total: int
    eps: float
    rtol: float
    atol: float
    precision: str = "float32"

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"GradCheck {status}: max_abs_err={self.max_abs_err:.3g}, "
            f"max_rel_err={self.max_rel_err:.3g} over {self.checked} of {self.total} entries "
            f"(eps={self.eps:g}, rtol={self.rtol:g}, atol={self.atol:.3g}, {self.precision} "
            f"precision); worst: {self.worst}"
        )


def _as_float(t) -> float:
    """A scalar tensor as a Python float (16-bit floats through float32, which NumPy reads)."""
    if _errors.dtype_name(t) in ("float16", "bfloat16"):
        t = keras.ops.cast(t, "float32")
    return float(keras.ops.convert_to_numpy(t))


def _no_grad():
    return _backends.hook("no_grad")()


def _leaf_names(kind: str, struct) -> list[str]:
    """A name per leaf of ``struct``, in ``tree.flatten`` order."""
    paths = [path for path, _ in tree.flatten_with_path(struct)]
    if paths == [()]:
        return [kind]
    return ["/".join([kind, *map(str, path)]) for path in paths]


def check_grad(
    model,
    x,
    *,
    wrt="inputs",
    layers=None,
    of=None,
    target=None,
    y=None,
    loss=None,
    training=False,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_entries: int = 1000,
    seed: int = 0,
    raise_on_fail: bool = False,
) -> GradCheck:
    """Checks kgrad's gradient against central finite differences.

    Every entry ``i`` of ``wrt`` gets ``(f(v + h e_i) - f(v - h e_i)) / 2h``,
    with ``h = eps * max(1, |v_i|)``, against what :func:`kgrad.grad` returns
    for the same arguments. Defaults by precision (``eps``, ``rtol``): float64
    ``1e-6, 1e-5``; float32 ``5e-3, 1e-2``; float16 ``1e-1, 1e-1``. The
    precision is the dtype of the values, except for float64 values whose
    objective is computed at float32 precision: Keras runs some float64
    operations (``ops.mean``, so the MSE loss; layer normalisation) at float32
    on PyTorch, and JAX without x64 holds float64 arrays as float32. For
    float64 values kgrad measures this once per model and request, without
    using the gradient: the objective's rounding noise, from fourth differences
    along three seeded random lines (relative step ``1e-5``), must stay below
    ``1e-11`` of its value for float64 precision to be assumed; otherwise
    float32 is. Under mixed precision (layers whose ``compute_dtype`` is
    float16 or bfloat16), the lowest precision any layer computes at is
    assumed. ``GradCheck.precision`` says which precision was assumed.
    The default ``atol`` is ``rtol / 10`` times the largest difference quotient plus
    the rounding noise of the objective, ``10 * machine_eps * |f| / h``.

    Args:
        model, x, wrt, layers, of, target, y, loss, training: as for
            :func:`kgrad.grad`.
        eps: relative step; ``None`` picks one from the dtype.
        rtol: relative tolerance; ``None`` picks one from the dtype.
        atol: absolute tolerance; ``None`` as described above.
        max_entries: check at most this many entries: the largest gradient
            entries of each tensor and a seeded random sample of the others.
            Each entry costs two forward passes.
        seed: seeds the random sample.
        raise_on_fail: raise ``AssertionError`` naming the worst entry.

    Returns:
        A :class:`GradCheck`.

    Raises:
        AssertionError: with ``raise_on_fail=True`` when the check fails.
        ValueError, TypeError: as :func:`kgrad.grad` for invalid arguments.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.Dense(4, activation="tanh"),
    ...                           keras.layers.Dense(1)])
    >>> x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    >>> kgrad.check_grad(model, x).ok
    True
    >>> kgrad.check_grad(model, x, wrt="weights").ok
    True
    """
    if not (isinstance(max_entries, int) and max_entries > 0):
        raise ValueError(
            f"`max_entries` must be a positive int. Received: max_entries={max_entries!r}."
        )
    target = _checks.normalize_target(target)
    options = dict(wrt=wrt, layers=layers, of=of, target=target, y=y, loss=loss, training=training)
    req = _engine.prepare("check_grad", model, x, **options)
    # The gradient a user gets: kgrad.grad itself, compiled and cached as usual.
    analytic = _per_kind(req, api.grad(model, x, **options))
    args = req.args()
    names, values, grads, counts = [], [], [], []
    for kind in req.wrt:
        names.extend(_leaf_names(kind, args[kind]))
        leaves = tree.flatten(args[kind])
        values.extend(leaves)
        counts.append(len(leaves))
        grads.extend(tree.flatten(analytic[kind]))

    def objective_of(flat) -> float:
        new_args, start = {}, 0
        for kind, n in zip(req.wrt, counts):
            new_args[kind] = tree.pack_sequence_as(args[kind], flat[start : start + n])
            start += n
        return _as_float(req.objective(new_args))

    dtype = _errors.dtype_name(values[0])
    grads_np = [np.asarray(keras.ops.convert_to_numpy(g), dtype=np.float64) for g in grads]
    values_np = [np.asarray(keras.ops.convert_to_numpy(v)) for v in values]
    precision = _precision.measured_precision(
        req, dtype, objective_of, values_np, (layers, of, target, loss, training)
    )
    precision = _precision.computed_at(req.model, precision)
    d_eps, d_rtol = _DEFAULTS.get(precision, _DEFAULTS["float32"])
    eps = d_eps if eps is None else float(eps)
    rtol = d_rtol if rtol is None else float(rtol)
    machine_eps = float(np.finfo(np.float16 if "16" in precision else precision).eps)

    with _no_grad():
        f0 = _as_float(req.objective(args))
    entries = _choose_entries(grads_np, max_entries, seed)
    total = sum(g.size for g in grads_np)

    def objective_with(leaf: int, new_value) -> float:
        flat = list(values)
        flat[leaf] = keras.ops.convert_to_tensor(new_value, dtype=_errors.dtype_name(values[leaf]))
        return objective_of(flat)

    auto, fd, steps, where = [], [], [], []
    with _no_grad():
        for leaf, idx in entries:
            v = values_np[leaf]
            h = eps * max(1.0, abs(float(v[idx])))
            plus, minus = v.copy(), v.copy()
            plus[idx] += h
            minus[idx] -= h
            # The step actually taken, after rounding to the dtype.
            h_eff = (float(plus[idx]) - float(minus[idx])) / 2 or h
            fd.append((objective_with(leaf, plus) - objective_with(leaf, minus)) / (2 * h_eff))
            auto.append(grads_np[leaf][idx])
            steps.append(h_eff)
            where.append((leaf, idx))
    auto_a, fd_a = np.asarray(auto), np.asarray(fd)
    if atol is None:
        finite = fd_a[np.isfinite(fd_a)]
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        noise = 10 * machine_eps * abs(f0) / min(steps) if steps else 0.0
        atol = 0.1 * rtol * scale + noise + 1e-12
    atol = float(atol)
    err = np.abs(auto_a - fd_a)
    nonfinite = ~(np.isfinite(auto_a) & np.isfinite(fd_a))
    rel = err / np.maximum(np.maximum(np.abs(auto_a), np.abs(fd_a)), atol)
    excess = np.where(nonfinite, np.inf, err - (atol + rtol * np.abs(fd_a)))
    ok = bool(np.all(excess <= 0)) and not math.isnan(f0)
    k = int(np.argmax(excess))
    leaf, idx = where[k]
    worst = (
        f"{names[leaf]}{list(idx)}: autodiff {auto_a[k]:.6g}, central difference "
        f"{fd_a[k]:.6g} (step {steps[k]:.3g})"
    )
    result = GradCheck(
        max_abs_err=float(np.max(err)) if not nonfinite.any() else float("nan"),
        max_rel_err=float(np.max(rel)) if not nonfinite.any() else float("nan"),
        ok=ok,
        worst=worst,
        checked=len(entries),
        total=total,
        eps=eps,
        rtol=rtol,
        atol=atol,
        precision=precision,
    )
    if raise_on_fail and not ok:
        reason = "a NaN or Inf" if nonfinite.any() or math.isnan(f0) else "a mismatch"
        raise AssertionError(
            f"kgrad.check_grad found {reason}: {result}. Check the layer that owns "
            f"{names[leaf]!r} (a custom gradient, a non-differentiable op), or pass a "
            f"larger `rtol`/`atol` if the function is known to be noisy."
        )
    return result


def _choose_entries(grads: list[np.ndarray], max_entries: int, seed: int) -> list[tuple]:
    """(leaf, index) pairs: everything, or per leaf its largest entries plus a random sample."""
    total = sum(g.size for g in grads)
    if total <= max_entries:
        return [(i, idx) for i, g in enumerate(grads) for idx in np.ndindex(g.shape)]
    rng = np.random.default_rng(seed)
    chosen = []
    for i, g in enumerate(grads):
        quota = max(2, round(max_entries * g.size / total))
        flat = np.abs(np.nan_to_num(g.ravel(), nan=np.inf))
        top = np.argsort(-flat, kind="stable")[: quota // 2]
        rest = np.setdiff1d(np.arange(g.size), top)
        extra = rng.choice(rest, size=min(len(rest), quota - len(top)), replace=False)
        for j in np.concatenate([top, extra]).astype(int):
            chosen.append((i, tuple(int(k) for k in np.unravel_index(j, g.shape))))
    return chosen


def _per_kind(req: _engine.Request, result) -> dict:
    """``kgrad.grad``'s result as ``{kind: structure}``, like ``req.args()``."""
    results = (result,) if req.single_wrt else tuple(result)
    out = dict(zip(req.wrt, results))
    if "activations" in out and req.single_layer:
        out["activations"] = {req.act_names[0]: out["activations"]}
    return out
