"""Batches laid out as ``keras.distribution`` lays out ``fit``'s batches (JAX).

Under a ``keras.distribution`` (``DataParallel``, ``ModelParallel``), Keras's
JAX trainer places each batch with the distribution's data layout: split along
the batch axis over the mesh's batch dimension. kgrad does the same with every
call's batches (``x``, ``y``, ``sample_weight``), so that per-sample work and
results stay on the devices that hold the samples; ``jax.jit`` then places the
rest. A batch that the batch dimension does not divide is refused (padding it
would change every result that reduces over the batch: the loss's mean).
"""

from __future__ import annotations

import jax
import keras
import numpy as np
from keras.src.backend.jax import distribution_lib

#: The arrays of a call that hold a batch (the batch axis first).
BATCHES = ("x", "y", "sample_weight")


def lay_out(arrays: dict) -> dict:
    """``arrays`` with their batches laid out by the active distribution, if any."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return arrays
    out = dict(arrays)
    for key in BATCHES:
        if out.get(key) is not None:
            out[key] = keras.tree.map_structure(lambda t: _lay_out_one(t, distribution), out[key])
    return out


def _lay_out_one(t, distribution):
    if not isinstance(t, jax.Array) or t.ndim == 0 or isinstance(t, jax.core.Tracer):
        return t
    layout = distribution.get_data_layout(t.shape)
    sharding = layout.backend_layout
    if t.sharding.is_equivalent_to(sharding, t.ndim):
        return t
    # With several processes (jax.distributed), each passes its own part of the
    # global batch, split over its own devices along the batch dimension.
    batch, parts = t.shape[0], _batch_parts(layout)
    local = max(1, parts // jax.process_count())
    if batch % local:
        where = f"{parts} devices" + (f", {local} in this process" if local != parts else "")
        raise ValueError(
            f"Under {type(distribution).__name__}, a batch is split along its first axis over "
            f"the mesh's '{distribution.batch_dim_name}' dimension ({where}), which "
            f"must divide the batch size. Received: a batch of {batch} samples (shape "
            f"{tuple(t.shape)}). Pass a batch whose size is a multiple of {local} (drop or pad "
            f"the remainder, as `drop_remainder=True` does for a tf.data dataset)."
        )
    return distribution_lib.distribute_data_input(
        np.asarray(t), sharding, distribution.batch_dim_name
    )


def _batch_parts(layout) -> int:
    axis = layout.axes[0]
    if axis is None:
        return 1
    mesh = layout.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(axis)])


def place_results(out, variables: list, arrays: dict):
    """``out`` with weight-shaped results on their weights' layouts, per-sample ones split.

    Inside the compiled function, as sharding constraints: XLA then computes
    each result where it is to stay, and never gathers a per-sample result.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return out
    leaves = keras.tree.flatten(arrays.get("x"))
    batch = leaves[0].shape[0] if leaves and getattr(leaves[0], "ndim", 0) else None

    def weight_of(keys: tuple, shape: tuple):
        """The variable a result keyed ``keys`` stands for: its path (``layer_grad``:
        the layer's name, then the weight's short name), with the same shape."""
        names = [k for k in keys if isinstance(k, str)]
        if not names:
            return None
        tails = {names[-1], "/".join(names[-2:])}
        found = [
            v
            for v in variables
            if tuple(v.shape) == shape
            and any(v.path == t or v.path.endswith("/" + t) for t in tails)
        ]
        return found[0] if len(found) == 1 else None

    def place(value, keys):
        if isinstance(value, dict):
            return type(value)((k, place(v, (*keys, k))) for k, v in value.items())
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(place(v, keys) for v in value)
        shape = tuple(getattr(value, "shape", ()) or ())
        variable = weight_of(keys, shape)
        if variable is not None:
            return jax.lax.with_sharding_constraint(value, variable.value.sharding)
        if batch is not None and shape and shape[0] == batch:
            layout = distribution.get_data_layout(shape)
            if batch % _batch_parts(layout) == 0:
                return jax.lax.with_sharding_constraint(value, layout.backend_layout)
        return value

    return place(out, ())
