"""Differential operators for physics-informed learning: partials, Laplacian, divergence, Taylor.

Per-sample derivatives of the model's output with respect to one input, in
forward mode (see :mod:`kgrad._taylor` and the cost model in the docs). They
are model-level calls like :func:`kgrad.grad`: compiled and cached with the
weights as arguments, differentiable inside ``compute_loss``, and streamed over
datasets.
"""

from __future__ import annotations

import math

import keras

from kgrad import _batches, _compiled, _engine, _errors, _forward_laplacian, _jac, _taylor
from kgrad import _operator_args as _args
from kgrad._results import _as_dtype_of, _check_batch_first, _output_for_shape, _reorder

ops = keras.ops
tree = keras.tree

# Directions pushed forward at once by the exact Laplacian and divergence (memory
# grows like this many forward passes).
DIRECTIONS_PER_PASS = 128


def _call(fname, body, model, arrays, options, finish=None, draw=None):
    """``_compiled.call``, drawing random directions per call (per batch for a dataset)."""
    options = {**options, "wrt": "inputs"}
    if _batches.is_batches(arrays["x"]):
        return _batches.run(
            fname,
            lambda a: _call(fname, body, model, a, options, finish, draw),
            model,
            arrays,
            options,
        )
    if draw is not None:
        pos = _args.resolve_input(model, arrays["x"], options["input"], fname)
        leaf = tree.flatten(arrays["x"])[pos]
        arrays = {**arrays, "directions": draw(tuple(leaf.shape[1:]), _errors.dtype_name(leaf))}
    return _compiled.call(
        fname, _in_input_dtype(fname, body), model, arrays, options, finish=finish
    )


def _in_input_dtype(fname, body):
    """``body`` whose results come in the dtype of the input differentiated.

    Under mixed precision the model computes in float16 or bfloat16, and so do
    forward-mode derivatives (see ``_results._as_dtype_of``).
    """

    def wrapped(req, arrays, options):
        out = body(req, arrays, options)
        leaf = tree.flatten(req.x)[_args.resolve_input(req.model, req.x, options["input"], fname)]
        return tree.map_structure(lambda t: _as_dtype_of(t, leaf), out)

    return wrapped


def _call_trace(fname, body, model, x, options, method, samples, seed):
    """A trace operator (Laplacian, divergence): exact, or over random directions."""
    n = _args.check_method(method, samples, seed, fname)
    draw = None if n is None else lambda feat, dtype: _args.directions(seed, n, feat, dtype)
    return _call(fname, body, model, {"x": x}, {**options, "method": method}, draw=draw)


def _feature_chunks(x):
    """One-hot directions ``(c, *feat)`` over the features, at most DIRECTIONS_PER_PASS each."""
    feat = tuple(x.shape[1:])
    n = math.prod(feat)
    for start in range(0, n, DIRECTIONS_PER_PASS):
        yield _jac._basis(feat, x.dtype, range(start, min(start + DIRECTIONS_PER_PASS, n)))


def _function_of_input(req: _engine.Request, options: dict):
    """``(g, x)``: the selected output as a function of the chosen input, and that input."""
    pos = _args.resolve_input(req.model, req.x, options["input"], req.fname)
    flat = tree.flatten(req.x)
    x = flat[pos]
    _errors.check_float_leaves([x], req.fname, "input")
    req.check_per_sample(
        f"`kgrad.{req.fname}` results",
        "a model whose samples are independent (the operators act on each sample)",
    )

    def g(v):
        inputs = tree.pack_sequence_as(req.x, [v if j == pos else o for j, o in enumerate(flat)])
        out = req.selected_output({"inputs": inputs})
        for leaf in tree.flatten(out):
            _errors.check_float_output(leaf)
        return out

    args = {"inputs": req.x}
    out = _output_for_shape(req, args, True)
    for leaf in tree.flatten(out):
        _check_batch_first(req, tuple(leaf.shape), req.fname, True)
    return g, x


def partial(model, x, index, *, input=None, of=None, target=None, training=False):
    """Returns a mixed partial derivative of any order per sample, in forward mode.

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch (or a dataset of batches).
        index: one entry per derivative: ``(0,)`` is d/dx0, ``(1, 1)`` is
            d2/dx1^2, ``(0, 1, 1)`` is d3/dx0 dx1^2. Each entry is an int into
            the C-order flattening of one sample's features, or a tuple with one
            index per feature axis. A dict ``name -> index`` computes several
            partials with shared work and returns a dict.
        input: which input of a multi-input model (name or position).
        of, target, training: as for :func:`kgrad.grad`.

    Returns:
        ``(B, *out_feat)`` per partial (``(B,)`` for a scalar ``target``); a dict
        of them for a dict ``index``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(
    ...     lambda z: keras.ops.exp(z[:, :1]) * keras.ops.sin(z[:, 1:]))])
    >>> x = np.zeros((3, 2), "float32")
    >>> d = kgrad.partial(model, x, {"u_t": (0,), "u_ty": (0, 1)})
    >>> keras.ops.convert_to_numpy(d["u_ty"]).ravel().tolist()
    [1.0, 1.0, 1.0]
    """
    options = dict(
        index=_args.normalize_index(index), input=input, of=of, target=target, training=training
    )
    given = index

    def finish(_, result):
        return _reorder(given, result) if isinstance(given, dict) else result

    return _call("partial", _partial, model, {"x": x}, options, finish=finish)


@_errors.model_level
def _partial(req, arrays, options):
    g, x = _function_of_input(req, options)
    feat = tuple(x.shape[1:])
    index = options["index"]
    if (
        isinstance(index, tuple)
        and index
        and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str) for i in index)
    ):
        wanted = {name: _args.flat_index(i, feat, name) for name, i in index}
        return _taylor.partials(g, x, wanted)
    return _taylor.partials(g, x, {"": _args.flat_index(index, feat)})[""]


def laplacian(
    model,
    x,
    *,
    input=None,
    of=None,
    target=None,
    method="exact",
    samples=None,
    seed=None,
    training=False,
):
    """Returns the Laplacian ``sum_i d2 out / dx_i^2`` per sample.

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch (or a dataset of batches).
        input: which input of a multi-input model (name or position).
        of, target, training: as for :func:`kgrad.grad`.
        method: ``"exact"`` (the forward Laplacian for chains of Dense and
            elementwise activation layers, else one second-order forward
            pass per input feature, vectorised; never the d x d Hessian) or
            ``"stochastic"`` (the
            Hutchinson estimate ``mean_s v_s^T H v_s`` over ``samples``
            Rademacher directions ``v_s``, unbiased).
        samples: the number of random directions (default 16).
        seed: an int (the same directions on every call), None (fresh ones on
            every call) or a ``keras.random.SeedGenerator``.

    Returns:
        ``(B, *out_feat)`` (``(B,)`` for a scalar output or ``target``).

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(
    ...     lambda z: keras.ops.sum(z ** 2, axis=1))])
    >>> keras.ops.convert_to_numpy(kgrad.laplacian(model, np.ones((2, 3), "float32"))).tolist()
    [6.0, 6.0]
    """
    options = dict(input=input, of=of, target=target, training=training)
    return _call_trace("laplacian", _laplacian, model, x, options, method, samples, seed)


@_errors.model_level
def _laplacian(req, arrays, options):
    g, x = _function_of_input(req, options)
    layers = _forward_laplacian.applies(req)
    if layers is not None:  # a Dense/activation chain: one summed second-order term

        def along(dirs):
            return _forward_laplacian.laplacian(req, layers, x, dirs)
    else:

        def along(dirs):
            return _taylor.map_sum(_taylor.second_along(g, x), _taylor.broadcast(dirs, x))

    if options["method"] == "stochastic":
        dirs = ops.cast(arrays["directions"], x.dtype)
        return tree.map_structure(lambda t: t / dirs.shape[0], along(dirs))
    total = None
    for dirs in _feature_chunks(x):
        part = along(dirs)
        total = part if total is None else tree.map_structure(ops.add, total, part)
    return total


def divergence(
    model, x, *, input=None, of=None, method="exact", samples=None, seed=None, training=False
):
    """Returns the divergence ``sum_i d out_i / dx_i`` per sample.

    Args:
        model: a built ``keras.Model`` whose output (or ``of``'s) has the
            features of its input (a vector field).
        x: the batch (or a dataset of batches).
        input: which input of a multi-input model (name or position).
        of, training: as for :func:`kgrad.grad`.
        method: ``"exact"`` (one ``jvp`` per input feature, vectorised) or
            ``"stochastic"`` (Hutchinson: ``mean_s v_s^T J v_s``, unbiased).
        samples: the number of random directions (default 16).
        seed: an int, None or a ``keras.random.SeedGenerator``, as for
            :func:`laplacian`.

    Returns:
        ``(B,)``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> field = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda z: z ** 2)])
    >>> keras.ops.convert_to_numpy(kgrad.divergence(field, np.ones((2, 2), "float32"))).tolist()
    [4.0, 4.0]
    """
    options = dict(input=input, of=of, target=None, training=training)
    return _call_trace("divergence", _divergence, model, x, options, method, samples, seed)


@_errors.model_level
def _divergence(req, arrays, options):
    g, x = _function_of_input(req, options)
    feat = tuple(x.shape[1:])
    probe = _output_for_shape(req, {"inputs": req.x}, True)
    out_feat = tuple(getattr(probe, "shape", (None,))[1:]) if hasattr(probe, "shape") else None
    if out_feat != feat:
        raise ValueError(
            f"The divergence needs an output with the features of the input (a vector "
            f"field), but one sample's input has shape {feat} and its output has shape "
            f"{out_feat if out_feat is not None else type(probe).__name__}. Received: "
            f"of={req.of_key!r}, input={options['input']!r}. Pick a layer with the input's "
            f"shape with `of=`, or use `kgrad.jacobian` for a general Jacobian."
        )
    axes = tuple(range(2, 2 + len(feat)))
    if options["method"] == "stochastic":
        tangents = _taylor.broadcast(ops.cast(arrays["directions"], x.dtype), x)
        jv = _jac.batched_map(_taylor.first_along(g, x), tangents)  # (S, B, *feat)
        return ops.mean(ops.sum(jv * ops.cast(tangents, jv.dtype), axis=axes), axis=0)
    total = None
    for dirs in _feature_chunks(x):
        tangents = _taylor.broadcast(dirs, x)  # (c, B, *feat)
        cols = _jac.batched_map(_taylor.first_along(g, x), tangents)  # (c, B, *feat)
        # Under mixed precision `cols` has the compute dtype (float16), `tangents` x's.
        part = ops.sum(cols * ops.cast(tangents, cols.dtype), axis=(0, *axes))
        total = part if total is None else total + part
    return total


def taylor(model, x, direction, order, *, input=None, of=None, target=None, training=False):
    """Returns the directional derivatives ``[out, D_v out, ..., D_v^order out]``.

    Taylor mode: ``jax.experimental.jet`` on JAX where it has rules for the
    model's operations, nested forward mode elsewhere (see the cost model in
    the docs).

    Args:
        model: a built ``keras.Model`` (or a callable built from ``keras.ops``).
        x: the batch.
        direction: ``v``, one sample's shape (the same direction for every
            sample) or ``x``'s shape (one per sample).
        order: the highest order, an int >= 0.
        input: which input of a multi-input model (name or position).
        of, target, training: as for :func:`kgrad.grad`.

    Returns:
        A list of ``order + 1`` tensors, each ``(B, *out_feat)``.

    Example:

    >>> import keras, numpy as np, kgrad
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(keras.ops.exp)])
    >>> terms = kgrad.taylor(model, np.zeros((1, 1), "float32"), np.full((1,), 2.0, "float32"), 3)
    >>> print(*[round(float(keras.ops.convert_to_numpy(t).item()), 4) for t in terms])
    1.0 2.0 4.0 8.0
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(
            f"`order` must be an int >= 0 (the highest derivative). Received: order={order!r}."
        )
    options = dict(input=input, of=of, target=target, training=training, order=order)
    return _call("taylor", _taylor_terms, model, {"x": x, "direction": direction}, options)


@_errors.model_level
def _taylor_terms(req, arrays, options):
    g, x = _function_of_input(req, options)
    v = ops.cast(arrays["direction"], x.dtype)
    feat, shape = tuple(x.shape[1:]), tuple(v.shape)
    if shape == feat:
        v = ops.broadcast_to(ops.expand_dims(v, 0), ops.shape(x))
    elif not (len(shape) == len(x.shape) and shape[1:] == feat and shape[0] in (x.shape[0], None)):
        raise ValueError(
            f"`direction` must have one sample's shape {feat} or the batch's shape "
            f"{tuple(x.shape)}. Received: direction of shape {shape}."
        )
    return _taylor.series(g, x, v, options["order"])
