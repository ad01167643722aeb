"""The weight Hessian's spectrum and trace, from Hessian-vector products alone.

:func:`hessian_eigenvalues` runs Lanczos with full reorthogonalisation and
:func:`hessian_trace` Hutchinson's estimator, both on :func:`kgrad.hvp`, which
is compiled once and cached: each step is one cached call, and the Hessian is
never formed. The iteration itself runs in float64 NumPy on the host (a few
vectors of the selected weights' size), so it is the same on every backend.
A dataset (any ``x`` that :func:`kgrad.grad` streams) works too: each
Hessian-vector product then streams it, and the objective is the loss over
the whole dataset, as Keras's ``evaluate`` reduces it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np

from kgrad import _batches, _hessian, api
from kgrad import backends as _backends

_WHICH = ("largest", "smallest", "both")


def iter_once(x) -> bool:
    """Whether ``x`` is a stream of batches that iterating uses up (a generator)."""
    return _batches.is_batches(x) and iter(x) is x


class _Operator:
    """``v -> H v`` on flat float64 vectors, for the selected weights or the inputs."""

    def __init__(self, model, x, y, loss, wrt, layers):
        if wrt not in ("weights", "inputs"):
            raise ValueError(
                f"The Hessian's spectrum and trace are taken with respect to the weights or "
                f"the inputs. Received: wrt={wrt!r}. Use wrt='weights' or wrt='inputs'."
            )
        if wrt == "inputs" and layers is not None:
            raise ValueError(
                f"`layers` selects weights; with wrt='inputs' it must be None. "
                f"Received: layers={layers!r}."
            )
        self.model, self.x, self.y, self.loss, self.wrt, self.layers = (
            model,
            x,
            y,
            loss,
            wrt,
            layers,
        )
        if iter_once(x):
            raise TypeError(
                "The Hessian's spectrum and trace stream `x` once per Hessian-vector "
                "product, so a one-shot iterator (a generator) would be used up after the "
                f"first. Received: x of type {type(x).__name__}. Pass a tf.data.Dataset, a "
                "keras.utils.PyDataset or a list-like object of batches that iterates anew."
            )
        # The selected values' structure, from one gradient (also a finiteness check).
        g = api.grad(model, x, wrt=wrt, layers=layers, y=y, loss=loss)
        self.like = keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), g)
        leaves = keras.tree.flatten(self.like)
        self.shapes = [leaf.shape for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.size = int(sum(leaf.size for leaf in leaves))
        if self.size == 0:
            raise ValueError(
                f"The selection has no values to differentiate. Received: wrt={wrt!r}, "
                f"layers={layers!r}. Select layers that have trainable weights."
            )
        self.calls = 0
        # One batch in memory: where the backend can, one linearisation serves every
        # product of this call (the weights cannot change during it).
        self.apply = None
        if _backends.hook("reusable_hvp") and not _batches.is_batches(x):
            self.apply = _hessian.hvp_operator(model, x, wrt=wrt, layers=layers, y=y, loss=loss)

    def unflatten(self, flat: np.ndarray) -> Any:
        leaves, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes):
            n = math.prod(shape)
            leaves.append(flat[start : start + n].reshape(shape).astype(dtype))
            start += n
        return keras.tree.pack_sequence_as(self.like, leaves)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.apply is not None:
            return self._flat(self.apply(self.unflatten(v)))
        hv = _hessian.hvp(
            self.model,
            self.x,
            self.unflatten(v),
            wrt=self.wrt,
            layers=self.layers,
            y=self.y,
            loss=self.loss,
        )
        return self._flat(hv)

    def _flat(self, hv) -> np.ndarray:
        leaves = [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(hv)]
        out = np.concatenate([leaf.astype("float64").ravel() for leaf in leaves])
        if not np.all(np.isfinite(out)):
            raise FloatingPointError(
                f"A Hessian-vector product has non-finite entries ({int(np.sum(~np.isfinite(out)))}"
                f" of {out.size}). Received: a model whose loss or its derivatives overflow at "
                f"these weights. Check `kgrad.grad_report` for NaN or Inf gradients first."
            )
        return out


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}.")
    return int(value)


def hessian_eigenvalues(
    model,
    x,
    y=None,
    *,
    loss=None,
    k=1,
    which="largest",
    wrt="weights",
    layers=None,
    iters=None,
    tol=None,
    seed=None,
    return_vectors=False,
):
    """Returns the ``k`` extreme eigenvalues of the Hessian of the objective.

    Lanczos with full reorthogonalisation on :func:`kgrad.hvp`: each step is one
    Hessian-vector product, the Hessian is never formed. Where the Krylov space
    is exhausted (a Hessian of low rank, or exact symmetries), Lanczos restarts
    from a fresh vector and runs all ``iters`` steps, so that a repeated
    eigenvalue is found as often as ``k`` asks; a repeated eigenvalue whose
    space is not exhausted within ``iters`` steps may be found once. The objective is the
    loss (with ``y``), else the sum of the outputs, as for :func:`kgrad.hvp`.

    Args:
        model: a built ``keras.Model``.
        x: the batch, or a dataset (as for :func:`kgrad.grad`).
        y: targets for ``loss``.
        loss: a Keras loss; ``None`` with ``y`` uses the compiled loss.
        k: how many eigenvalues at each requested end.
        which: ``"largest"`` (algebraically largest, the sharpness),
            ``"smallest"`` (the most negative curvature) or ``"both"``.
        wrt: ``"weights"`` (default) or ``"inputs"``.
        layers: narrows the weights (as for :func:`kgrad.grad`).
        iters: the most Lanczos steps (Hessian-vector products); default
            ``min(n, max(4 k + 20, 40))`` for ``n`` selected values.
        tol: the residual ``|H u - lambda u|``, relative to the largest
            ``|lambda|`` found (the Hessian's norm), at which an eigenpair
            counts as converged; default ``1e-4`` (the Hessian-vector products
            are float32). The eigenvalue's error is at most the residual.
        seed: seeds the starting vector; the same seed gives the same result.
        return_vectors: also return the eigenvectors, each structured like the
            weights (a dict keyed by ``variable.path``) or like ``x``.

    Returns:
        A float64 NumPy array of ``k`` eigenvalues: descending for
        ``"largest"``, ascending for ``"smallest"``; for ``"both"`` a tuple
        ``(smallest, largest)``. With ``return_vectors=True``, a tuple
        ``(eigenvalues, vectors)``, ``vectors`` a list per end.

    Raises:
        ValueError: bad ``k``, ``which``, ``iters``, ``tol`` or ``wrt``.
        FloatingPointError: a Hessian-vector product is NaN or Inf.

    Warns:
        RuntimeWarning: a requested eigenvalue did not converge within
            ``iters`` steps; the message gives its residual. Raise ``iters``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    >>> # mse of a linear model: H = (2 / B) [x 1]^T [x 1], eigenvalues 5.30, 1.70 and 0
    >>> top = kgrad.hessian_eigenvalues(model, x, np.zeros((2, 1)), loss="mse", k=2)
    >>> np.round(top, 2).tolist()
    [5.3, 1.7]
    """
    if which not in _WHICH:
        raise ValueError(f"`which` must be one of {_WHICH}. Received: which={which!r}.")
    k = _check_count("k", k)
    if tol is None:
        tol = 1e-4
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"`tol` must be a float in (0, 1). Received: tol={tol!r}.")
    op = _Operator(model, x, y, loss, wrt, layers)
    n = op.size
    wanted = k if which != "both" else 2 * k
    if wanted > n:
        raise ValueError(
            f"`k` asks for {wanted} eigenvalues of a {n} x {n} Hessian. Received: k={k}, "
            f"which={which!r}. Use k <= {n if which != 'both' else n // 2}."
        )
    iters = min(n, max(4 * k + 20, 40)) if iters is None else _check_count("iters", iters)
    iters = min(iters, n)
    values, vectors, residuals = _lanczos(op, n, iters, k, which, tol, seed)
    results = {}
    for end in ("smallest", "largest"):
        if end not in values:
            continue
        relative = residuals[end]
        bad = relative > tol
        if np.any(bad):
            warnings.warn(
                f"kgrad.hessian_eigenvalues: {int(np.sum(bad))} of the {k} {end} eigenvalues "
                f"did not converge in {op.calls} Hessian-vector products (residuals "
                f"|H u - lambda u| relative to the largest |eigenvalue|: "
                f"{np.round(relative, 6).tolist()}, tol={tol}). Received: iters={iters}. "
                f"Pass a larger `iters`.",
                RuntimeWarning,
                stacklevel=2,
            )
        results[end] = values[end]
    if which == "both":
        out = (results["smallest"], results["largest"])
        vecs = tuple([op.unflatten(v) for v in vectors[end]] for end in ("smallest", "largest"))
    else:
        out = results[which]
        vecs = [op.unflatten(v) for v in vectors[which]]
    return (out, vecs) if return_vectors else out


def _lanczos(op, n, iters, k, which, tol, seed):
    """Lanczos with full reorthogonalisation: Ritz values, vectors and relative residuals.

    When the Krylov space is exhausted (an invariant subspace: the next vector
    is float32 noise), the iteration restarts from a fresh random vector
    orthogonal to the basis, uncoupled in the tridiagonal matrix, so that an
    eigenvalue of multiplicity > 1 is found again; it then runs all ``iters``
    steps (or until the basis spans the whole space).
    """
    rng = np.random.default_rng(seed)

    def fresh(V):
        q = rng.standard_normal(n)
        for _ in range(2 if len(V) else 0):
            q = _project_out(V, q)
        return q / math.sqrt(_dot(q, q))

    basis = np.empty((iters + 1, n))  # row j: the j-th Lanczos vector
    basis[0] = fresh(basis[:0])
    alphas, betas = [], []
    wanted = k if which != "both" else 2 * k
    restarted = False
    for j in range(iters):
        w = op(basis[j])
        alpha = _dot(basis[j], w)
        alphas.append(alpha)
        V = basis[: j + 1]
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            w = _project_out(V, w)
        beta = math.sqrt(_dot(w, w))
        # Float32 products leave noise of about 1e-7 of the Hessian's norm.
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        exhausted = beta <= _EXHAUSTED * scale
        last = 0.0 if exhausted else beta
        if j + 1 == iters or (exhausted and j + 1 == n):
            betas.append(last)
            break
        # After a restart, the Ritz values of the exhausted space have no residual,
        # and a copy of one may still come: such a run goes on to `iters` steps.
        if not restarted and (j + 1) % _CHECK_EVERY == 0 and j + 1 >= wanted:
            if _converged(alphas, betas + [last], k, which, tol):
                betas.append(last)
                break
        betas.append(last)
        basis[j + 1] = fresh(basis[: j + 1]) if exhausted else w / beta
        restarted = restarted or exhausted
    theta, S, residual = _ritz(alphas, betas)
    m = len(alphas)
    V = basis[:m]
    values, vectors, residuals = {}, {}, {}
    picks = {"smallest": np.arange(min(k, m)), "largest": np.arange(m - 1, m - 1 - min(k, m), -1)}
    for end, idx in picks.items():
        if which in (end, "both"):
            values[end] = theta[idx]
            vectors[end] = [np.einsum("ij,i->j", V, S[:, i]) for i in idx]
            residuals[end] = _relative(residual, theta)[idx]
    return values, vectors, residuals


# The vector products below use einsum rather than BLAS: OpenBLAS's threads keep
# spinning after a product and slow the framework's own threads down (the next
# Hessian-vector product on PyTorch took 4 times as long). The products are small
# (``iters`` vectors), so einsum's single-threaded loops cost little.


def _dot(a, b) -> float:
    return float(np.einsum("i,i->", a, b))


def _project_out(V, w):
    """``w - V^T (V w)``."""
    return w - np.einsum("ij,i->j", V, np.einsum("ij,j->i", V, w))


# A next Lanczos vector this small, relative to the Hessian's norm, is rounding noise.
_EXHAUSTED = 1e-5
# Convergence is checked every few steps (each check is an eigh of a small matrix).
_CHECK_EVERY = 5


def _ritz(alphas, betas):
    """Ritz values, their vectors in the Krylov basis, and residuals ``|H u - theta u|``."""
    m = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    theta, S = np.linalg.eigh(T)
    return theta, S, np.abs(betas[m - 1] * S[-1, :])


def _relative(residual, theta):
    """Residuals relative to the largest Ritz value's magnitude (the Hessian's norm)."""
    return residual / max(float(np.max(np.abs(theta))), np.finfo(float).tiny)


def _converged(alphas, betas, k, which, tol) -> bool:
    theta, _, residual = _ritz(alphas, betas)
    relative = _relative(residual, theta)
    m = len(alphas)
    ends = []
    if which in ("smallest", "both"):
        ends.append(relative[:k])
    if which in ("largest", "both"):
        ends.append(relative[m - k :])
    return all(np.all(r <= tol) for r in ends)


def hessian_trace(
    model, x, y=None, *, loss=None, samples=100, seed=None, wrt="weights", layers=None
):
    """Returns Hutchinson's estimate of the Hessian's trace and its standard error.

    The mean of ``z^T H z`` over ``samples`` Rademacher vectors ``z`` (entries
    +1 or -1), each one :func:`kgrad.hvp`; the standard error is their
    standard deviation over ``sqrt(samples)``. The estimate is unbiased, and
    within two standard errors of the trace about 95% of the time.

    Args:
        model: a built ``keras.Model``.
        x: the batch, or a dataset (as for :func:`kgrad.grad`).
        y: targets for ``loss``.
        loss: a Keras loss; ``None`` with ``y`` uses the compiled loss.
        samples: how many Rademacher vectors (at least 2).
        seed: seeds the vectors; the same seed gives the same estimate.
        wrt: ``"weights"`` (default) or ``"inputs"``.
        layers: narrows the weights (as for :func:`kgrad.grad`).

    Returns:
        ``(estimate, standard_error)``, Python floats.

    Raises:
        ValueError: bad ``samples`` or ``wrt``.
        FloatingPointError: a Hessian-vector product is NaN or Inf.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    >>> # mse of a linear model: H = (2 / B) [x 1]^T [x 1], trace 1 + 4 + 2 = 7
    >>> est, err = kgrad.hessian_trace(model, x, np.zeros((2, 1)), loss="mse", seed=0)
    >>> bool(abs(est - 7.0) <= 4 * err)
    True
    """
    samples = _check_count("samples", samples, minimum=2)
    op = _Operator(model, x, y, loss, wrt, layers)
    rng = np.random.default_rng(seed)
    draws = np.empty(samples)
    for i in range(samples):
        z = rng.choice(np.array([-1.0, 1.0]), size=op.size)
        draws[i] = _dot(z, op(z))
    return float(draws.mean()), float(draws.std(ddof=1) / math.sqrt(samples))
