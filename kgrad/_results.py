"""Shared pieces of the model-level functions: result packaging, output shapes, checks."""

from __future__ import annotations

import keras

from kgrad import _engine, _errors
from kgrad import backends as _backends

ops = keras.ops
tree = keras.tree


def _itemsize(x) -> int:
    return 8 if "64" in _errors.dtype_name(x) else 2 if "16" in _errors.dtype_name(x) else 4


def _reorder(template, value):
    """Puts dict keys back in the template's order (JAX pytrees sort dict keys)."""
    if isinstance(value, dict) and isinstance(template, dict):
        return {
            k: _reorder(template[k], value[k]) if k in template else value[k]
            for k in [
                *[k for k in template if k in value],
                *[k for k in value if k not in template],
            ]
        }
    return value


def _package(req: _engine.Request, kind: str, value):
    """Shapes one result as the API promises."""
    value = _reorder(req.template(kind), value)
    if kind == "activations" and req.single_layer:
        return value[req.act_names[0]]
    return value


def _result(req: _engine.Request, per_kind: dict):
    results = tuple(_package(req, k, per_kind[k]) for k in req.wrt)
    return results[0] if req.single_wrt else results


def _substitute(args, kind, struct, flat, i, v):
    """``args`` with leaf ``i`` of ``args[kind]`` replaced by ``v``."""
    new = dict(args)
    new[kind] = tree.pack_sequence_as(struct, [v if j == i else o for j, o in enumerate(flat)])
    return new


class _Shape:
    """Stands for an output tensor whose shape is all that is needed."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _output_for_shape(req: _engine.Request, args, per_sample: bool):
    """The selected output (or a stand-in with its shape), for shape and structure.

    Runs without a graph and, for per-sample requests, on the first sample only
    (every output is batch-first then); compiled code prunes it where nothing
    uses its value.
    """
    with _backends.hook("no_grad")():
        if not (per_sample and req.batch_size and req.batch_size > 1):
            return req.selected_output(args)
        small = dict(args)
        small["inputs"] = tree.map_structure(lambda a: a[:1], args.get("inputs", req.x))
        if "activations" in small:
            small["activations"] = tree.map_structure(lambda a: a[:1], small["activations"])
        out = req.selected_output(small)
        if not hasattr(out, "shape") or not len(out.shape) or out.shape[0] != 1:
            return req.selected_output(args)  # not batch-first: look at the whole batch
    return _Shape((req.batch_size, *out.shape[1:]))


def _check_batch_first(req: _engine.Request, out_shape, fname, per_sample):
    """Per-sample results need the selected output to keep the batch axis first."""
    if not per_sample or not any(k in _engine.BATCHED for k in req.wrt):
        return
    known = out_shape and None not in (out_shape[0], req.batch_size)
    if len(out_shape) == 0 or (known and out_shape[0] != req.batch_size):
        raise ValueError(
            f"`kgrad.{fname}` with per_sample=True needs the selected output to keep the "
            f"batch axis first (size {req.batch_size}), but it has shape {out_shape}. "
            f"Received: target={req.target!r}, of={req.of_key!r}. Return one value per "
            f"sample from a callable `target` (e.g. `lambda y: y[:, 0]`, not "
            f"`keras.ops.sum(y)`), or pass `per_sample=False`."
        )


def _objective_check(req: _engine.Request):
    if not req.has_loss and any(k in _engine.BATCHED for k in req.wrt):
        req.check_per_sample(
            "Input and activation gradients without a loss",
            "give a `loss` (the gradient of the batch loss is well defined)",
        )


def _as_dtype_of(t, like):
    """``t`` cast to ``like``'s float dtype, where they differ.

    Forward-mode derivatives come in the output's dtype (float16 under mixed
    precision); kgrad returns every derivative in the dtype of what it is taken
    with respect to, as reverse mode gives it.
    """
    dtype = keras.backend.standardize_dtype(like.dtype)
    if "float" not in dtype or keras.backend.standardize_dtype(t.dtype) == dtype:
        return t
    return keras.ops.cast(t, dtype)
