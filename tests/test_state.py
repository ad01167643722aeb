"""kgrad calls never change a model's state, and are safe to run from several threads.

The state is every variable of the model (weights, BatchNormalization moving
statistics, Dropout seed-generator states), of its compiled optimizer (stepped
once, so that its slots are not zeros) and of its metrics, compared bit for bit
before and after each public call.
"""

import threading

import keras
import numpy as np
import pytest

import kgrad
from kgrad import func

L = keras.layers
ops = keras.ops

X = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(6, 2)).astype("float32")


def npy(t):
    return np.asarray(ops.convert_to_numpy(t))


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(8, activation="tanh", name="h"),
            L.BatchNormalization(name="bn"),
            L.Dropout(0.3, name="drop"),
            L.Dense(2, name="o"),
        ],
        name="st",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    model.train_on_batch(X, Y)  # optimizer slots, moving statistics, seed and metric states
    return model


def _state(model) -> list[tuple[str, str, tuple, bytes]]:
    variables = [
        *model.variables,
        *model.optimizer.variables,
        *model.metrics_variables,
    ]
    out = []
    for v in variables:
        a = npy(v.value)
        out.append((v.path, str(a.dtype), a.shape, a.tobytes()))  # bytes: NaN-safe
    return out


def _weights(m):
    return {"st/o/kernel": np.ones((8, 2), "float32")}


CALLS = {
    "grad-inputs": lambda m, t: kgrad.grad(m, X, y=Y, loss="mse", training=t),
    "grad-weights": lambda m, t: kgrad.grad(m, X, wrt="weights", training=t),
    "grad-activations": lambda m, t: kgrad.grad(
        m, X, wrt="activations", y=Y, loss="mse", training=t
    ),
    "value_and_grad-compiled-loss": lambda m, t: kgrad.value_and_grad(
        m, X, wrt=["inputs", "weights"], y=Y, training=t
    ),
    "jacobian-rev": lambda m, t: kgrad.jacobian(m, X, mode="rev", per_sample=not t, training=t),
    "jacobian-fwd": lambda m, t: kgrad.jacobian(m, X, mode="fwd", per_sample=not t, training=t),
    "jacobian-weights": lambda m, t: kgrad.jacobian(m, X, wrt="weights", layers="o", training=t),
    "hessian-inputs": lambda m, t: kgrad.hessian(
        m, X, y=Y, loss="mse", per_sample=not t, training=t
    ),
    "hessian-weights": lambda m, t: kgrad.hessian(
        m, X, wrt="weights", layers="o", y=Y, loss="mse", training=t
    ),
    "hvp": lambda m, t: kgrad.hvp(m, X, _weights(m), y=Y, loss="mse", training=t),
    "layer_grad": lambda m, t: kgrad.layer_grad(m, X, Y, loss="mse", training=t),
    "check_grad": lambda m, t: kgrad.check_grad(
        m, X, wrt="weights", layers="o", y=Y, loss="mse", training=t, max_entries=20
    ),
    "grad_report": lambda m, t: kgrad.grad_report(m, X, Y, loss="mse", training=t),
    "func-functional_call": lambda m, t: func.value_and_grad(
        lambda w: ops.sum(func.functional_call(m, w, X, training=t))
    )(func.weights_of(m)),
    "func-jacrev-functional_call": lambda m, t: func.jacrev(
        lambda w: func.functional_call(m, w, X, training=t)
    )(func.weights_of(m, trainable=True)),
}


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("call", list(CALLS))
def test_calls_leave_every_variable_bit_identical(trained, call, training, jit):
    before = _state(trained)
    kgrad.set_jit_compile(jit)
    try:
        for _ in range(2):  # with jit, the second call runs the compiled function
            CALLS[call](trained, training)
    finally:
        kgrad.set_jit_compile(True)
    after = _state(trained)
    assert [s[:3] for s in after] == [s[:3] for s in before]
    changed = [b[0] for b, a in zip(before, after) if b[3] != a[3]]
    assert not changed, f"{call} changed {changed}"


def test_the_state_check_can_fail(trained):
    """The snapshot sees a moving-statistics update, a seed step and an optimizer step."""
    before = _state(trained)
    trained(X, training=True)  # a plain call updates the BatchNormalization statistics
    after = _state(trained)
    changed = {b[0] for b, a in zip(before, after) if b[3] != a[3]}
    assert any("moving_mean" in p for p in changed)
    trained.train_on_batch(X, Y)
    again = _state(trained)
    changed = {b[0] for b, a in zip(after, again) if b[3] != a[3]}
    assert any("iteration" in p for p in changed) and any("st/o/kernel" == p for p in changed)


# ------------------------------------------------------------ threads


def _thread_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(8, activation="tanh", name="h"),
            L.Dropout(0.3, name="drop"),
            L.Dense(2, name="o"),
        ],
        name="th",
    )


THREAD_CALLS = {
    "inputs": lambda m: kgrad.grad(m, X),
    "activations": lambda m: kgrad.grad(m, X, wrt="activations", layers="h"),
    "of": lambda m: kgrad.jacobian(m, X, of="h", target=1),
    "layer_grad": lambda m: kgrad.layer_grad(m, X, Y, loss="mse")["h"].output_grad,
    "weights-training": lambda m: kgrad.grad(m, X, wrt="weights", layers="h", training=True),
}


def _flat(result):
    return [npy(leaf) for leaf in keras.tree.flatten(result)]


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_concurrent_calls_on_one_model_match_single_threaded(jit):
    model = _thread_model()
    kgrad.set_jit_compile(jit)
    try:
        expected = {k: _flat(fn(model)) for k, fn in THREAD_CALLS.items()}
        kgrad.clear_cache()  # the threads also race to compile
        errors, mismatches = [], []
        start = threading.Barrier(2 * len(THREAD_CALLS))

        def work(kind):
            try:
                start.wait()
                for _ in range(3):
                    got = _flat(THREAD_CALLS[kind](model))
                    if not all(
                        np.allclose(g, e, rtol=1e-5, atol=1e-6) for g, e in zip(got, expected[kind])
                    ):
                        mismatches.append(kind)
            except Exception as err:  # reported below, with its type
                errors.append(f"{kind}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=work, args=(k,)) for k in THREAD_CALLS for _ in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        kgrad.set_jit_compile(True)
    assert not errors, errors[:3]
    assert not mismatches, mismatches
