"""kgrad calls from several threads at once give the single-threaded results.

On PyTorch, kgrad's transforms switch process-wide state while they run (the
attention kernel flags and ``torch.nn.functional.layer_norm``, see the torch
backend's ``transform_kernels``), and torch's forward-mode AD keeps its levels
per process. These tests run forward- and reverse-mode calls concurrently on
an attention + LayerNorm model and on an MLP, check every thread's result
against the single-threaded one, and check that the process-wide state is
restored afterwards, also when transforms of two threads overlap.
"""

import threading

import keras
import numpy as np
import pytest
from helpers import np_

import kgrad
from kgrad import backends

BACKEND = keras.backend.backend()
L = keras.layers

N_THREADS = 4
REPEATS = 2
# How long a thread waits for another before the test fails instead of hanging.
WAIT_S = 60

CALLS = {
    "jacobian-fwd": lambda m, x: kgrad.jacobian(m, x, mode="fwd"),
    "jacobian-rev": lambda m, x: kgrad.jacobian(m, x, mode="rev"),
    "hessian": lambda m, x: kgrad.hessian(m, x, target=0),
    "grad": lambda m, x: kgrad.grad(m, x),
}


def _attention_model():
    inp = keras.Input((3, 4))
    h = L.MultiHeadAttention(num_heads=2, key_dim=2, name="mha")(inp, inp)
    h = L.LayerNormalization(name="norm")(h + inp)
    out = L.Dense(2, activation="tanh", name="out")(L.Flatten()(h))
    return keras.Model(inp, out, name="attention"), (2, 3, 4)


def _mlp():
    model = keras.Sequential(
        [keras.Input((3,)), L.Dense(8, activation="tanh"), L.Dense(2, activation="tanh")],
        name="mlp",
    )
    return model, (3, 3)


MODELS = {"attention": _attention_model, "mlp": _mlp}


def _run_threads(model, x, expected, kinds):
    """Runs ``kinds`` of calls in ``N_THREADS`` threads; returns errors and mismatches."""
    start = threading.Barrier(N_THREADS)
    errors, mismatches = [], []

    def work(t):
        # Each thread starts at another kind, so forward- and reverse-mode
        # calls overlap.
        order = kinds[t % len(kinds) :] + kinds[: t % len(kinds)]
        try:
            start.wait(timeout=WAIT_S)
            for _ in range(REPEATS):
                for kind in order:
                    got = np_(CALLS[kind](model, x))
                    want = expected[kind]
                    scale = float(np.abs(want).max())
                    if got.shape != want.shape or not np.allclose(
                        got, want, rtol=1e-6, atol=1e-6 * scale
                    ):
                        mismatches.append(kind)
        except Exception as err:  # reported by the test, with its type
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(N_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors, mismatches


def _model_and_batch(which):
    model, shape = MODELS[which]()
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    return model, x


@pytest.mark.parametrize("which", sorted(MODELS))
def test_concurrent_calls_match_single_threaded(which):
    model, x = _model_and_batch(which)
    expected = {kind: np_(call(model, x)) for kind, call in CALLS.items()}
    # The two Jacobian modes are computed independently: they agree.
    np.testing.assert_allclose(
        expected["jacobian-fwd"], expected["jacobian-rev"], rtol=1e-4, atol=1e-5
    )
    errors, mismatches = _run_threads(model, x, expected, list(CALLS))
    assert not errors, errors[:3]
    assert not mismatches, sorted(set(mismatches))


# ------------------------------------------------------------ torch only

torch_only = pytest.mark.skipif(
    BACKEND != "torch",
    reason="only PyTorch switches process-wide kernels and forward-mode state for transforms",
)


def _sdp_flags():
    import torch

    cuda = torch.backends.cuda
    flags = {
        "flash": cuda.flash_sdp_enabled(),
        "mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
    }
    if hasattr(cuda, "cudnn_sdp_enabled"):
        flags["cudnn"] = cuda.cudnn_sdp_enabled()
    return flags


def _math_only():
    return {name: name == "math" for name in _sdp_flags()}


@torch_only
def test_torch_kernels_are_restored_after_concurrent_calls():
    import torch

    fused = torch.nn.functional.layer_norm
    initial = _sdp_flags()
    try:
        # Every kernel but flash: not torch's defaults, and not math only.
        _restore({name: name != "flash" for name in initial}, fused)
        before = _sdp_flags()
        model, x = _model_and_batch("attention")
        kinds = ["jacobian-fwd", "jacobian-rev", "grad"]
        expected = {kind: np_(CALLS[kind](model, x)) for kind in kinds}
        errors, mismatches = _run_threads(model, x, expected, kinds)
        assert not errors, errors[:3]
        assert not mismatches, sorted(set(mismatches))
        assert _sdp_flags() == before
        assert torch.nn.functional.layer_norm is fused
    finally:
        _restore(initial, fused)


@torch_only
def test_torch_kernels_stay_switched_until_the_last_thread_leaves():
    import torch

    backend = backends.load()
    fused = torch.nn.functional.layer_norm
    initial = _sdp_flags()
    _restore(dict.fromkeys(initial, True), fused)  # every kernel, torch's default
    before = _sdp_flags()
    entered = {name: threading.Event() for name in "ab"}
    leave = {name: threading.Event() for name in "ab"}
    errors = []

    def inside(name):
        try:
            with backend.transform_kernels():
                entered[name].set()
                if not leave[name].wait(WAIT_S):
                    raise TimeoutError(f"thread {name} was never told to leave")
        except Exception as err:  # reported by the test
            errors.append(f"{name}: {type(err).__name__}: {err}")
            entered[name].set()

    threads = {name: threading.Thread(target=inside, args=(name,)) for name in "ab"}
    try:
        threads["a"].start()
        assert entered["a"].wait(WAIT_S)
        assert _sdp_flags() == _math_only()
        threads["b"].start()
        assert entered["b"].wait(WAIT_S)
        leave["a"].set()
        threads["a"].join()
        # b is still inside: attention stays on the math kernel, layer norm composite.
        assert _sdp_flags() == _math_only()
        assert torch.nn.functional.layer_norm is not fused
        leave["b"].set()
        threads["b"].join()
        assert not errors, errors
        assert _sdp_flags() == before
        assert torch.nn.functional.layer_norm is fused
    finally:
        for name in "ab":
            leave[name].set()
            if threads[name].ident is not None:  # started
                threads[name].join(WAIT_S)
        _restore(initial, fused)


def _restore(flags, layer_norm):
    """Sets the attention kernel flags and ``layer_norm`` (also after a failing test)."""
    import torch

    for name, enabled in flags.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(enabled)
    torch.nn.functional.layer_norm = layer_norm
