"""Batch-size buckets: a stream of batch sizes compiles once per bucket, not per size.

Per-sample calls (``grad``, ``jacobian``, ``hessian`` with respect to inputs
or activations, without ``y``/``loss``, ``training=False``) pad the batch to
its bucket (:func:`bucket`: a power of two up to 64, then eight steps per
power of two) by repeating the last sample, and cut the results back to the
real samples. An epoch's last, smaller batch or a dataset of varied sizes then
compiles (``jax.jit``, ``tf.function``) at most ``7 + 8 * log2(N / 64)``
times for sizes up to ``N``, not once per size. Results that sum over samples
(weight gradients, losses) are never padded. ``KGRAD_BATCH_BUCKETS=0`` turns padding off.
"""

from __future__ import annotations

import os

import keras

from kgrad import _checks, _engine, _tree
from kgrad import backends as _backends

tree = keras.tree

# Functions whose results are per sample (batch axis first) when the options
# below hold, so that padded samples change nothing but their own rows.
_PER_SAMPLE_FNAMES = ("grad", "jacobian", "hessian", "partial", "laplacian", "divergence")


# Up to this size, batches round up to a power of two (the work is small, the
# compile is not); above it, to eight steps per power of two (at most 1/8 more work).
_POWERS_UP_TO = 64


def bucket(n: int) -> int:
    """The batch size a call of ``n`` samples is compiled for.

    The next power of two up to 64; above, ``n`` rounded up to a multiple of
    ``2**(n.bit_length() - 4)``, so padding adds less than an eighth of the work
    and a stream of sizes up to ``N`` compiles at most ``7 + 8 * log2(N / 64)``
    times.

    >>> [bucket(n) for n in (1, 3, 33, 65, 100, 1000, 4096)]
    [1, 4, 64, 72, 104, 1024, 4096]
    """
    if n <= _POWERS_UP_TO:
        return 1 << max(n - 1, 0).bit_length()
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def pad(fname: str, model, options: dict, arrays: dict):
    """``(arrays with x padded to its bucket, n)``, or None where padding is not sound.

    Padding repeats the last sample, so every value stays finite where the real
    ones are, and the results are cut back to ``n`` rows. It is used only where
    every result is per sample: ``grad``, ``jacobian`` and ``hessian`` with
    respect to inputs or activations, per sample, without ``y``/``loss``, with
    an index (not a callable) ``target``, and ``training=False``. Samples that
    interact are refused before any result is made (``check_per_sample``), so
    no real sample sees a padded one.
    """
    if fname not in _PER_SAMPLE_FNAMES or not _enabled:
        return None
    if arrays.get("y") is not None or options.get("loss") is not None:
        return None
    if options.get("training") or options.get("per_sample", True) is not True:
        return None
    if callable(options.get("target")):
        return None
    wrt = options.get("wrt", "inputs")
    kinds = (wrt,) if isinstance(wrt, str) else tuple(wrt) if isinstance(wrt, (list, tuple)) else ()
    if not kinds or any(k not in _engine.BATCHED for k in kinds):
        return None
    leaves = _tree.flatten(arrays["x"])
    if not leaves or not all(len(leaf.shape) for leaf in leaves):
        return None
    n = leaves[0].shape[0]
    if not isinstance(n, int) or n < 1 or any(leaf.shape[0] != n for leaf in leaves):
        return None
    size = bucket(n)
    if size == n or _backends.hook("concrete")(leaves[0]) is None:
        return None  # nothing to pad, or traced: the caller's own compile decides
    if isinstance(model, keras.layers.Layer):
        # Errors about the input's shape and dtype must name the shape the user gave
        # (unpadded calls get the same checks when they are traced).
        _checks.check_model_call(
            model, arrays["x"], None, fname, "inputs" in kinds, options.get("input")
        )

    def pad_leaf(leaf):
        last = leaf[n - 1 : n]
        return keras.ops.concatenate([leaf, keras.ops.repeat(last, size - n, axis=0)], axis=0)

    return {**arrays, "x": tree.map_structure(pad_leaf, arrays["x"])}, n


def cut(out, n: int):
    """The first ``n`` rows of every result.

    With backend ops, so that an outer tape (a gradient penalty on TensorFlow)
    still differentiates through them; on JAX each new size compiles these
    small slices once, much less than compiling the call itself.
    """
    return tree.map_structure(lambda leaf: leaf[:n], out)


_enabled = os.environ.get("KGRAD_BATCH_BUCKETS", "1").strip().lower() not in ("0", "false", "no")
