"""Model-level calls on a stream of batches (``tf.data.Dataset``, ``PyDataset``, iterables).

Each batch is computed as an ordinary call, and the results are combined as if
all batches were one batch:

- per-sample results (derivatives with respect to inputs or activations,
  activations themselves) are concatenated along the batch axis;
- results for the whole objective (weight gradients, weight Hessians, hvp with
  respect to weights, the objective's value) are summed without a loss (the
  objective is a sum over samples) and averaged with weights ``n_b / N`` with a
  loss, which is exact for Keras's default ``"sum_over_batch_size"`` reduction;
  per-sample derivatives of a loss get the same ``n_b / N`` factor.

A batch is ``x``, or ``(x,)``, ``(x, y)`` as in Keras's ``fit``; a multi-input
``x`` must then be nested (``((x1, x2), y)``) or a dict.
"""

from __future__ import annotations

import collections.abc
from typing import Any

import keras

from kgrad import _engine
from kgrad import _progress as _progress_lines

ops = keras.ops
tree = keras.tree

_PER_SAMPLE_ONLY = ("jacobian", "per_sample_grad", "per_sample_grad_norm")
_OPERATORS = ("partial", "laplacian", "divergence", "taylor")


def is_batches(x: Any) -> bool:
    """Whether ``x`` is a stream of batches rather than one batch."""
    if x is None or isinstance(x, (list, tuple, dict, str, bytes)) or hasattr(x, "shape"):
        return False
    if isinstance(x, keras.utils.PyDataset):
        return True
    if hasattr(x, "element_spec") and hasattr(x, "as_numpy_iterator"):
        return True  # tf.data.Dataset (any subclass), on any backend
    return isinstance(x, collections.abc.Iterable)


def _iterate(x):
    """Yields the batches of ``x`` and returns their count if known (else None)."""
    if isinstance(x, keras.utils.PyDataset):
        n = x.num_batches
        if n is None:
            raise ValueError(
                "kgrad needs a PyDataset with a known number of batches. Received: a "
                f"{type(x).__name__} whose num_batches is None. Define __len__."
            )
        return (x[i] for i in range(n)), n
    if hasattr(x, "element_spec") and hasattr(x, "as_numpy_iterator"):
        card = int(x.cardinality())
        return x.as_numpy_iterator(), card if card >= 0 else None
    n = len(x) if isinstance(x, collections.abc.Sized) else None
    return iter(x), n


def _unpack(batch):
    if isinstance(batch, tuple) and 1 <= len(batch) <= 3:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        if sample_weight is not None:
            raise ValueError(
                "kgrad does not use sample weights. Received: batches of (x, y, "
                "sample_weight). Yield (x, y), or pass a loss that weighs the samples."
            )
        return x, y
    return batch, None


def _batch_size(x) -> int:
    return int(tree.flatten(x)[0].shape[0])


def _progress(n):
    # A Progbar on a terminal, plain lines in logs (no carriage returns or ANSI escapes).
    return _progress_lines.progress(n, "batch")


def each(x, name: str):
    """Yields ``(x, y)`` of every batch of ``x``, counting them on a progress line.

    ``name`` (the public function, e.g. ``"kgrad.grad"``) is named in the
    ValueError raised when there is no batch at all.
    """
    batches, n = _iterate(x)
    bar = _progress(n)
    count = 0
    for batch in batches:
        yield _unpack(batch)
        count += 1
        if bar is not None:
            bar.update(count)
    if not count:
        raise ValueError(
            f"`{name}` got no batches. Received: an empty {type(x).__name__}. Pass at least "
            f"one batch."
        )


def run(fname: str, call, model, arrays: dict, options: dict):
    """Runs ``call(arrays)`` on every batch of ``arrays["x"]`` and combines the results."""
    if arrays.get("y") is not None:
        raise ValueError(
            f"`kgrad.{fname}` got `x` as batches and a separate `y`, which cannot be "
            f"matched to them. Received: y of type {type(arrays['y']).__name__}. Yield "
            f"(x, y) batches instead, as for `model.fit`."
        )
    if options.get("per_sample") is False:
        raise ValueError(
            f"`kgrad.{fname}` with per_sample=False needs the whole batch at once: the "
            f"cross-sample blocks couple batches. Received: per_sample=False with x as "
            f"batches. Concatenate the batches, or use per_sample=True."
        )
    if fname == "hvp" and _engine._normalize_wrt(options["wrt"], fname)[0] != ("weights",):
        raise ValueError(
            "`kgrad.hvp` with x as batches works with respect to the weights only: a "
            f"vector over inputs or activations would have to be split per batch. "
            f"Received: wrt={options['wrt']!r}. Concatenate the batches instead."
        )
    results, sizes, has_loss = [], [], options.get("loss") is not None
    for bx, by in each(arrays["x"], f"kgrad.{fname}"):
        has_loss = has_loss or by is not None
        results.append(call({**arrays, "x": bx, "y": by}))
        sizes.append(_batch_size(bx))
    total = sum(sizes)
    scales = [s / total if has_loss else 1.0 for s in sizes]
    return _combine(fname, options, results, scales)


def _sum(parts, scales):
    return tree.map_structure(lambda *ls: sum(leaf * s for leaf, s in zip(ls, scales)), *parts)


def _concat(parts, scales):
    def cat(*leaves):
        return ops.concatenate([leaf * s for leaf, s in zip(leaves, scales)], axis=0)

    return tree.map_structure(cat, *parts)


def _combine(fname, options, results, scales):
    ones = [1.0] * len(results)
    if fname == "layer_grad":
        from kgrad.api import LayerGrad

        out = {}
        for name, first in results[0].items():
            grads = [r[name] for r in results]
            og = [g.output_grad for g in grads]
            out[name] = LayerGrad(
                name=first.name,
                index=first.index,
                output=_concat([g.output for g in grads], ones),
                output_grad=None if og[0] is None else _concat(og, scales),
                weight_grads=_sum([g.weight_grads for g in grads], scales),
                weight_paths=first.weight_paths,
            )
        return out
    if fname in _OPERATORS:  # every result is per sample
        return tree.map_structure(lambda *ls: ops.concatenate(ls, axis=0), *results)
    kinds, single = _engine._normalize_wrt(options["wrt"], fname)
    if fname == "value_and_grad":
        values = _sum([r[0] for r in results], scales)
        return values, _combine_kinds(kinds, single, [r[1] for r in results], scales)
    if fname in _PER_SAMPLE_ONLY:
        return _combine_kinds(kinds, single, results, ones, all_per_sample=True)
    return _combine_kinds(kinds, single, results, scales)


def _combine_kinds(kinds, single, results, scales, all_per_sample=False):
    per_kind = [(r,) if single else tuple(r) for r in results]
    out = []
    for i, kind in enumerate(kinds):
        parts = [r[i] for r in per_kind]
        if kind == "weights" and not all_per_sample:
            out.append(_sum(parts, scales))
        else:
            out.append(_concat(parts, scales))
    return out[0] if single else tuple(out)
