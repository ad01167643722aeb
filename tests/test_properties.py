"""Property-based tests: random Keras models against independent references.

Hypothesis draws a *model spec* (a plain dict: inputs, blocks of Dense, Conv1D,
LSTM and LayerNormalization layers, how two inputs merge, the head, a seed and a
batch size), so a failing example prints as data and shrinks. The model is built
from the spec and its weights are drawn from a NumPy generator seeded by the
spec, so the same spec gives the same model on every backend and every run.

Properties, on the backend Keras runs on:

- ``kgrad.grad`` (inputs and weights) and ``kgrad.jacobian`` agree with central
  differences of the model's forward pass (compiled default path);
- per-sample results (input Jacobians, weight Jacobians, input gradients and
  input Hessians of one target) agree with a loop over batches of one sample;
- ``kgrad.hessian`` agrees with the backend's own nested derivatives
  (``jax.hessian``, nested gradient tapes, torch's double backward; see
  ``tests/native.py``) of ``f`` built on the model (of its inputs, or of one
  layer's weights through ``model.stateless_call``);
- ``kgrad.hvp`` agrees with the backend's own reverse-over-reverse product.

The number of examples is fixed and derandomized, so CI runs the same examples
every time: 200 per backend in total, in CI's backends env too (tox.ini).
The 200 took 151 s for JAX, 72 s for TensorFlow and 18 s for torch on the 2-core
CI machine (2026-11-29, a day when the whole CI run took 26 minutes; on slower
days the same run takes up to 40); CI's XLA flags (tox.ini) take JAX's to about
130 s. Most of it is first calls: JAX compiles every model-level call of each
new model, TensorFlow converts graphs with pfor. The
reference forward passes run through ``predict_on_batch`` on JAX (one compile
per input shape); eagerly they compiled every operation for every new shape,
which had made them more than half of each central-difference example.
Set ``KGRAD_HYPOTHESIS_EXAMPLES`` to another total
(``KGRAD_HYPOTHESIS_EXAMPLES=2000``) for a longer search; it is split between
the properties in the same proportions (tox passes ``KGRAD_*`` variables
through).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os

import keras
import native
import numpy as np
import pytest
from helpers import np_
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kgrad

L = keras.layers
ops = keras.ops

TOTAL_EXAMPLES = int(os.environ.get("KGRAD_HYPOTHESIS_EXAMPLES", "200"))
# Share of the examples each property gets (sums to 1).
SHARES = {"fd": 0.25, "per_sample": 0.30, "hessian": 0.225, "hvp": 0.225}
# The path model-level calls take here: the cheaper one for these small models.
# Compiled on JAX, whose eager transforms dispatch every operation on its own (2 to
# 6 times the cost of compiling with jax.jit); eager on TensorFlow, where tracing a
# tf.function costs more than one eager call; torch always runs eagerly. A quarter
# of the Hessian and hvp examples draw the other path.
JIT = keras.backend.backend() == "jax"

settings.register_profile(
    "kgrad",
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    deadline=None,  # building and compiling a model takes a variable time
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _settings(prop: str) -> settings:
    return settings(
        settings.get_profile("kgrad"),
        max_examples=max(1, round(TOTAL_EXAMPLES * SHARES[prop])),
    )


ACTIVATIONS = ("tanh", "sigmoid", "softplus", "silu", "gelu", "linear")

# ------------------------------------------------------------------ strategies


@st.composite
def _vector_blocks(draw, width, max_size=2):
    """Blocks on ``(B, width)`` features: Dense and LayerNormalization."""
    blocks = []
    for _ in range(draw(st.integers(0, max_size))):
        # LayerNormalization needs 3+ features: with 2 it returns +-1 (a step function).
        if width >= 3 and draw(st.integers(0, 3)) == 0:
            blocks.append(("layernorm",))
        else:
            width = draw(st.integers(2, 5))
            blocks.append(("dense", width, draw(st.sampled_from(ACTIVATIONS))))
    return blocks, width


@st.composite
def _sequence_branch(draw, lstm=False):
    """A ``(T, F)`` input, blocks on sequences, and how it becomes a vector.

    With ``lstm``, an LSTM (returning sequences or not) is one of the blocks.
    """
    steps, width = draw(st.integers(3, 4)), draw(st.integers(2, 3))
    shape = (steps, width)
    blocks = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("conv1d", "conv1d", "dense", "layernorm", "lstm")))
        if kind == "conv1d":
            kernel = draw(st.integers(1, 3))
            padding = "valid" if steps - kernel + 1 >= 2 and draw(st.booleans()) else "same"
            steps = steps - kernel + 1 if padding == "valid" else steps
            width = draw(st.integers(2, 4))
            blocks.append(("conv1d", width, kernel, padding, draw(st.sampled_from(ACTIVATIONS))))
        elif kind == "dense":
            width = draw(st.integers(2, 4))
            blocks.append(("dense", width, draw(st.sampled_from(ACTIVATIONS))))
        elif kind == "layernorm" and width >= 3:
            blocks.append(("layernorm",))
        elif kind == "lstm" and lstm:
            width = draw(st.integers(2, 3))
            blocks.append(("lstm_seq", width))
    has_lstm = any(block[0] == "lstm_seq" for block in blocks)
    reduce = "lstm" if lstm and not has_lstm else draw(st.sampled_from(("flatten", "pool")))
    if reduce == "lstm":
        width = draw(st.integers(2, 3))
        blocks.append(("lstm", width))
    else:
        blocks.append((reduce,))
        width = width * steps if reduce == "flatten" else width
    return {"shape": shape, "blocks": blocks}, width


@st.composite
def _vector_branch(draw):
    width = draw(st.integers(2, 4))
    blocks, out_width = draw(_vector_blocks(width))
    return {"shape": (width,), "blocks": blocks}, out_width


@st.composite
def model_specs(draw, max_inputs=2, lstm=True):
    """A random model as plain data (see the module docstring); ``lstm=False``: none."""
    n_inputs = draw(st.integers(1, max_inputs))
    # About one model in ten has an LSTM: they cost the most to compile and run
    # (see `forward`), and everything else they exercise is drawn more often.
    lstm = lstm and draw(st.integers(0, 7)) == 0
    branches, widths = [], []
    for _ in range(n_inputs):
        branch, width = draw(st.one_of(_vector_branch(), _sequence_branch(lstm)))
        branches.append(branch)
        widths.append(width)
    merge = None
    if n_inputs == 2:
        merge = draw(st.sampled_from(("concatenate", "add")))
        if merge == "add":  # project both branches to a common width
            width = draw(st.integers(2, 4))
            for branch in branches:
                branch["blocks"].append(("dense", width, draw(st.sampled_from(ACTIVATIONS))))
            widths = [width]
    head, _ = draw(_vector_blocks(sum(widths)))
    outputs = draw(st.integers(1, 3))
    return {
        "branches": branches,
        "merge": merge,
        "head": [*head, ("dense", outputs, draw(st.sampled_from(("linear", "tanh"))))],
        "sequential": n_inputs == 1 and draw(st.booleans()),
        "batch": draw(st.integers(2, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


# ------------------------------------------------------------- model building


# `_seed_weights` overwrites every weight, so layers start from zeros: Keras's random
# initializers compile a program per weight shape on JAX (most of a model's build time).
ZEROS = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}


def _layer(block):
    kind = block[0]
    if kind == "dense":
        return L.Dense(block[1], activation=block[2], **ZEROS)
    if kind == "conv1d":
        return L.Conv1D(block[1], block[2], padding=block[3], activation=block[4], **ZEROS)
    if kind == "layernorm":
        return L.LayerNormalization()
    if kind in ("lstm", "lstm_seq"):
        return L.LSTM(
            block[1], return_sequences=kind == "lstm_seq", recurrent_initializer="zeros", **ZEROS
        )
    if kind == "flatten":
        return L.Flatten()
    if kind == "pool":
        return L.GlobalAveragePooling1D()
    raise ValueError(f"unknown block {block!r}")


def _seed_weights(model, seed):
    """Draws every weight from a NumPy generator: the same model on every backend.

    Kernels get a variance of ``1 / fan_in``; biases, LayerNormalization offsets
    and scales are moved off their defaults (0 and 1) so that no term vanishes.
    """
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape = tuple(v.shape)
        if len(shape) >= 2:
            value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        elif v.path.endswith("gamma"):
            value = 1.0 + 0.3 * rng.normal(size=shape)
        else:
            value = 0.3 * rng.normal(size=shape)
        v.assign(value.astype("float32"))


# `build` runs a full garbage collection every GC_EVERY models (bounded memory).
GC_EVERY = 16
_builds = itertools.count(1)


def build(spec):
    """The Keras model of a spec, weights seeded by ``spec["seed"]``."""
    # Per example: fresh names. Its garbage collection takes about 0.2 s with three
    # frameworks loaded, so that runs every GC_EVERY models only.
    keras.backend.clear_session(free_memory=False)
    if next(_builds) % GC_EVERY == 0:
        gc.collect()
    if spec["sequential"]:
        (branch,) = spec["branches"]
        model = keras.Sequential(
            [
                keras.Input(branch["shape"]),
                *map(_layer, branch["blocks"]),
                *map(_layer, spec["head"]),
            ]
        )
    else:
        inputs, ends = [], []
        for branch in spec["branches"]:
            inputs.append(keras.Input(branch["shape"]))
            h = inputs[-1]
            for block in branch["blocks"]:
                h = _layer(block)(h)
            ends.append(h)
        if spec["merge"] == "concatenate":
            h = L.Concatenate()(ends)
        elif spec["merge"] == "add":
            h = L.Add()(ends)
        else:
            (h,) = ends
        for block in spec["head"]:
            h = _layer(block)(h)
        model = keras.Model(inputs if len(inputs) > 1 else inputs[0], h)
    _seed_weights(model, spec["seed"])
    return model


def inputs_of(spec, rng):
    """A random batch for the spec: a list of arrays (one per input)."""
    return [
        rng.normal(size=(spec["batch"], *b["shape"])).astype("float32") for b in spec["branches"]
    ]


def _x(xs):
    """The model's ``x``: the bare array for one input, else the list."""
    return xs[0] if len(xs) == 1 else list(xs)


def forward(model, xs):
    """The model's output on a list of input arrays, in float64 (computed in float32).

    Eager calls, except on JAX: eagerly, JAX compiles every operation for every
    new shape (and the ``lax.scan`` of an LSTM on every call), while
    ``predict_on_batch`` compiles the whole model once per input shape (and
    reads the current weights at every call). That made the forward passes
    more than half of each central-difference example's time.
    """
    x = _x([np.asarray(a, "float32") for a in xs])
    if keras.backend.backend() == "jax":
        return np.asarray(model.predict_on_batch(x), "float64")
    return np.asarray(np_(model(x)), "float64")


def _flat(tensors):
    return [np.asarray(t, "float64") for t in keras.tree.flatten(np_(tensors))]


# --------------------------------------------------------- central differences
#
# Keras computes in float32 on every backend, so the forward pass that the
# differences are taken of carries a relative rounding error of a few float32
# ulps (2**-24 = 6e-8) per layer: about 1e-6 of the output's size. A step h turns
# that into an absolute error of about 1e-6 * |f| / h in the difference
# quotient, so h cannot be small: h = 1e-2 keeps it near 1e-4 * |f|. The
# fourth-order stencil (f(-2h) - 8 f(-h) + 8 f(h) - f(2h)) / 12h keeps the
# truncation error at h**4 |f'''''| / 30 (about 3e-10 |f'''''|), which the
# ordinary two-point quotient (h**2 |f'''| / 6, about 2e-5 |f'''|) would not.
# The comparison then allows FD_RTOL relative error plus FD_ATOL times the size
# of the compared values (and of f): ten times the rounding estimate above.

STEP = 1e-2
STENCIL = ((-2.0, 1.0), (-1.0, -8.0), (1.0, 8.0), (2.0, -1.0))  # (offset, weight / 12)
FD_RTOL = 2e-3
FD_ATOL = 1e-3


def _combine(values):
    """The stencil's difference quotient from ``values[k] = f(x + offset_k * STEP * v)``."""
    return sum(w * val for (_, w), val in zip(STENCIL, values)) / (12 * STEP)


def assert_fd_close(analytic, fd, scale, what):
    """``analytic`` against central differences, with the float32 budget above."""
    analytic, fd = np.asarray(analytic, "float64"), np.asarray(fd, "float64")
    atol = FD_ATOL * (1.0 + scale)
    np.testing.assert_allclose(analytic, fd, rtol=FD_RTOL, atol=atol, err_msg=what)


def fd_input_columns(model, xs, columns):
    """Per-sample Jacobian columns ``d y[b] / d xs[k][b][idx]``, one batched forward pass.

    Samples are independent, so every perturbed copy of a sample goes into one
    batch: ``len(columns) * 4`` rows.
    """
    rows = [[] for _ in xs]
    for k, b, idx in columns:
        for offset, _ in STENCIL:
            for j, a in enumerate(xs):
                row = np.asarray(a[b], "float64").copy()
                if j == k:
                    row[idx] += offset * STEP
                rows[j].append(row)
    out = forward(model, [np.stack(r) for r in rows])
    out = out.reshape(len(columns), len(STENCIL), *out.shape[1:])
    return [_combine(list(o)) for o in out], float(np.max(np.abs(out)))


def fd_input_direction(model, xs, vs):
    """``d/dt sum(model(xs + t vs))`` at 0, one batched forward pass."""
    batch = len(xs[0])
    stacked = [
        np.concatenate([np.asarray(a, "float64") + o * STEP * v for o, _ in STENCIL])
        for a, v in zip(xs, vs)
    ]
    out = forward(model, stacked).reshape(len(STENCIL), batch, -1)
    values = out.sum(axis=(1, 2))
    return _combine(list(values)), float(np.max(np.abs(values)))


def fd_weight_direction(model, xs, direction):
    """``d/dt sum(model(xs; w + t d))`` at 0 for ``direction``: ``{path: d}``."""
    variables = {v.path: v for v in model.trainable_variables}
    start = {p: np_(variables[p].value).astype("float64") for p in direction}
    values = []
    try:
        for offset, _ in STENCIL:
            for p, d in direction.items():
                variables[p].assign((start[p] + offset * STEP * d).astype("float32"))
            values.append(float(np.sum(forward(model, xs))))
    finally:
        for p, w in start.items():
            variables[p].assign(w.astype("float32"))
    return _combine(values), max(abs(v) for v in values)


# ------------------------------------------------------------------ fixtures


@contextlib.contextmanager
def _set_jit(enabled):
    """Compiled (``True``) or eager (``False``) model-level calls, for one example."""
    previous = kgrad.get_jit_compile()
    kgrad.set_jit_compile(enabled)
    try:
        yield
    finally:
        kgrad.set_jit_compile(previous)


def _weighted_layers(model):
    return [layer for layer in model.layers if layer.trainable_variables]


# ---------------------------------------------------------------- properties


@_settings("fd")
@given(spec=model_specs(), data=st.data())
def test_grad_and_jacobian_match_central_differences(spec, data):
    """grad (inputs, weights) and per-sample jacobian against central differences.

    Runs on the default, compiled path (``jax.jit`` / ``tf.function``).
    """
    model = build(spec)
    rng = np.random.default_rng(spec["seed"] + 1)
    xs = inputs_of(spec, rng)
    g_inputs, g_weights = kgrad.grad(model, _x(xs), wrt=("inputs", "weights"))
    g_inputs = [np.asarray(g, "float64") for g in keras.tree.flatten(np_(g_inputs))]
    assert [g.shape for g in g_inputs] == [a.shape for a in xs]
    assert list(g_weights) == [v.path for v in model.trainable_variables]

    # Input gradient: the directional derivative along a random direction.
    vs = [rng.normal(size=a.shape) for a in xs]
    fd, scale = fd_input_direction(model, xs, vs)
    analytic = sum(float(np.sum(g * v)) for g, v in zip(g_inputs, vs))
    assert_fd_close(analytic, fd, scale, "grad wrt inputs along a random direction")

    # Weight gradient: along one direction in all weights, then in single weights.
    paths = list(g_weights)
    g_weights = {p: np.asarray(g, "float64") for p, g in np_(g_weights).items()}
    direction = {p: rng.normal(size=g_weights[p].shape) for p in paths}
    fd, scale = fd_weight_direction(model, xs, direction)
    analytic = sum(float(np.sum(g_weights[p] * d)) for p, d in direction.items())
    assert_fd_close(analytic, fd, scale, "grad wrt all weights along a random direction")
    for p in data.draw(st.lists(st.sampled_from(paths), max_size=2, unique=True), "weights"):
        fd, scale = fd_weight_direction(model, xs, {p: direction[p]})
        analytic = float(np.sum(g_weights[p] * direction[p]))
        assert_fd_close(analytic, fd, scale, f"grad wrt {p} along a random direction")

    # Per-sample input Jacobian: a few random columns, entry by entry.
    jac = [np.asarray(j, "float64") for j in keras.tree.flatten(np_(kgrad.jacobian(model, _x(xs))))]
    out_feat = forward(model, [a[:1] for a in xs]).shape[1:]
    for k, a in enumerate(xs):
        assert jac[k].shape == (spec["batch"], *out_feat, *a.shape[1:])
    columns = []
    for _ in range(4):
        k = int(rng.integers(len(xs)))
        b = int(rng.integers(spec["batch"]))
        columns.append((k, b, tuple(int(rng.integers(n)) for n in xs[k].shape[1:])))
    fds, scale = fd_input_columns(model, xs, columns)
    for (k, b, idx), fd in zip(columns, fds):
        analytic = jac[k][(b, Ellipsis, *idx)]
        assert_fd_close(analytic, fd, scale, f"jacobian[input {k}][{b}, ..., {idx}]")


PER_SAMPLE_CALLS = {
    "jacobian": lambda model, x, t: kgrad.jacobian(model, x),
    "jacobian_weights": lambda model, x, t: kgrad.jacobian(model, x, wrt="weights"),
    "grad": lambda model, x, t: kgrad.grad(model, x, target=t),
    "hessian": lambda model, x, t: kgrad.hessian(model, x, target=t),
}


@_settings("per_sample")
@given(spec=model_specs(), call=st.sampled_from(sorted(PER_SAMPLE_CALLS)), data=st.data())
def test_per_sample_results_match_a_loop_over_samples(spec, call, data):
    """Per-sample results on a batch equal the same call on each sample alone.

    Model-level calls compiled on JAX, eager elsewhere (``JIT``).
    """
    model = build(spec)
    xs = inputs_of(spec, np.random.default_rng(spec["seed"] + 2))
    outputs = spec["head"][-1][1]
    target = data.draw(st.integers(0, outputs - 1), "target")
    call_fn = PER_SAMPLE_CALLS[call]

    def fn(model, x, target):
        with _set_jit(JIT):
            return call_fn(model, x, target)

    batched = _flat(fn(model, _x(xs), target))
    for b in range(spec["batch"]):
        single = _flat(fn(model, _x([a[b : b + 1] for a in xs]), target))
        assert len(single) == len(batched)
        for whole, one in zip(batched, single):
            assert one.shape[0] == 1 and whole.shape[1:] == one.shape[1:]
            scale = float(np.max(np.abs(whole))) + 1e-3
            np.testing.assert_allclose(
                whole[b], one[0], rtol=1e-4, atol=1e-5 * scale, err_msg=f"{call}, sample {b}"
            )


def _mse(y, pred):
    return ops.mean(ops.square(ops.convert_to_tensor(y) - pred))


@_settings("hessian")
@given(spec=model_specs(), wrt=st.sampled_from(("inputs", "weights")), data=st.data())
def test_hessian_matches_the_backends_own_nested_derivatives(spec, wrt, data):
    """kgrad.hessian against the backend's own second derivatives (``tests/native.py``).

    Inputs: ``f(x) = sum_b model(x)[b, target]``; its full Hessian over the batch
    is block diagonal and the blocks are the per-sample Hessians. Weights:
    ``f(w) = mse(y, model.stateless_call(w, x))`` for the weights of one layer.
    The reference is ``jax.hessian``, nested gradient tapes, or torch's
    double backward, none of which goes through kgrad. kgrad's call is compiled
    or eager, as drawn (mostly ``JIT``).
    """
    model = build(spec)
    rng = np.random.default_rng(spec["seed"] + 3)
    xs = inputs_of(spec, rng)
    jit = data.draw(st.sampled_from((JIT, JIT, JIT, not JIT)), "jit_compile")
    if wrt == "inputs":
        outputs = spec["head"][-1][1]
        target = data.draw(st.integers(0, outputs - 1), "target")
        with _set_jit(jit):
            H = _flat(kgrad.hessian(model, _x(xs), target=target))

        def f(x):
            return ops.sum(model(_x(x))[:, target])

        ref = native.hessian(f, xs)
        for k, a in enumerate(xs):
            n, feat = a.shape[0], math.prod(a.shape[1:])
            full = ref[k][k].reshape(n, feat, n, feat)
            blocks = np.stack([full[b, :, b, :] for b in range(n)])
            got = H[k].reshape(n, feat, feat)
            scale = float(np.max(np.abs(full))) + 1e-3
            np.testing.assert_allclose(got, blocks, rtol=1e-4, atol=1e-5 * scale, err_msg=k)
        return
    layer = data.draw(st.sampled_from(_weighted_layers(model)), "layer")
    y = rng.normal(size=forward(model, xs).shape).astype("float32")
    with _set_jit(jit):
        H = np_(kgrad.hessian(model, _x(xs), wrt="weights", layers=layer.name, y=y, loss="mse"))
    paths = [v.path for v in layer.trainable_variables]
    w0 = [np_(v.value) for v in layer.trainable_variables]

    def f(w):
        return _mse(y, native.stateless_output(model, paths, w, _x(xs)))

    ref = native.hessian(f, w0)
    assert sorted(H) == sorted(paths)
    scale = max(float(np.max(np.abs(block))) for row in ref for block in row) + 1e-3
    for i, pi in enumerate(paths):
        assert sorted(H[pi]) == sorted(paths)
        for j, pj in enumerate(paths):
            np.testing.assert_allclose(
                H[pi][pj], ref[i][j], rtol=1e-4, atol=1e-5 * scale, err_msg=f"[{pi}][{pj}]"
            )


@_settings("hvp")
@given(spec=model_specs(), data=st.data())
def test_hvp_matches_the_backends_own_hessian_vector_product(spec, data):
    """kgrad.hvp against ``grad <grad f, v>`` in the backend's own autodiff.

    ``f(w) = mse(y, model.stateless_call(w, x))`` for the weights of one or two
    layers; the reference (``tests/native.py``) is reverse over reverse, which
    kgrad's hvp does not use on JAX and TensorFlow (forward over reverse).
    Compiled or eager, as drawn (mostly ``JIT``).
    """
    model = build(spec)
    rng = np.random.default_rng(spec["seed"] + 4)
    xs = inputs_of(spec, rng)
    layers = data.draw(
        st.lists(st.sampled_from(_weighted_layers(model)), min_size=1, max_size=2, unique=True),
        "layers",
    )
    names = [layer.name for layer in layers]
    jit = data.draw(st.sampled_from((JIT, JIT, JIT, not JIT)), "jit_compile")
    y = rng.normal(size=forward(model, xs).shape).astype("float32")
    variables = [v for layer in layers for v in layer.trainable_variables]
    paths = [v.path for v in variables]
    vector = {v.path: rng.normal(size=tuple(v.shape)).astype("float32") for v in variables}
    with _set_jit(jit):
        hv = np_(kgrad.hvp(model, _x(xs), vector, layers=names, y=y, loss="mse"))
    assert list(hv) == paths

    def f(w):
        return _mse(y, native.stateless_output(model, paths, w, _x(xs)))

    w0 = [np_(v.value) for v in variables]
    expected = native.hvp(f, w0, [vector[p] for p in paths])
    scale = max(float(np.max(np.abs(e))) for e in expected) + 1e-3
    for p, e in zip(paths, expected):
        np.testing.assert_allclose(hv[p], e, rtol=1e-4, atol=1e-5 * scale, err_msg=p)


@pytest.mark.parametrize("jit", [True, False], ids=["jit_compile=True", "jit_compile=False"])
def test_hvp_keeps_the_vector_key_order(jit):
    """hvp's dict has the vector's keys in the vector's order, as grad's has.

    ``jax.jit`` and ``jax.jvp`` sort dict keys, which once gave
    ``['net/d/bias', 'net/d/kernel']`` on JAX only.
    """
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="d")], name="net")
    vector = {"net/d/kernel": np.ones((2, 1), "float32"), "net/d/bias": np.ones((1,), "float32")}
    x, y = np.ones((3, 2), "float32"), np.zeros((3, 1), "float32")
    with _set_jit(jit):
        for _ in range(2):  # the compiled path compiles on the first call, reuses on the second
            hv = kgrad.hvp(model, x, vector, y=y, loss="mse")
            assert list(hv) == list(vector)
            reverse = dict(reversed(list(vector.items())))
            assert list(kgrad.hvp(model, x, reverse, y=y, loss="mse")) == list(reverse)
