"""Backend selection, the backend contract and lazy framework imports."""

import inspect
import json
import os
import subprocess
import sys

import keras
import pytest

import kgrad
from kgrad import backends
from kgrad.backends import _contract

FRAMEWORKS = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}


def test_active_backend_module_satisfies_the_contract():
    module = backends.load()
    assert module.name == keras.backend.backend()
    assert isinstance(module, _contract.Backend)
    for member in _contract.MEMBERS:
        assert hasattr(module, member), member
        if member == "name":
            continue
        spec = inspect.signature(getattr(_contract.Backend, member))
        impl = inspect.signature(getattr(module, member))
        accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in impl.parameters.values())
        for pname, param in list(spec.parameters.items())[2:]:  # skip self and f/x
            if param.kind in (param.VAR_POSITIONAL,):
                continue
            assert pname in impl.parameters or accepts_kwargs, (member, pname)


def test_contract_members_are_documented():
    for member in _contract.MEMBERS[1:]:
        assert getattr(_contract.Backend, member).__doc__, member


def _run(code, backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


# The prefix of each backend's private helper modules in kgrad/backends/.
HELPER_PREFIX = {"jax": "_jax_", "tensorflow": "_tf_", "torch": "_torch_"}


def test_helper_modules_are_named_after_their_backend():
    """Every private module in kgrad/backends/ is shared or names its backend."""
    import kgrad.backends

    folder = os.path.dirname(kgrad.backends.__file__)
    shared = {"__init__", "_contract", "_internals", "_loop", "_swaps"}
    for file in os.listdir(folder):
        stem, ext = os.path.splitext(file)
        if ext != ".py" or stem in shared or stem in HELPER_PREFIX:
            continue
        assert any(stem.startswith(p) for p in HELPER_PREFIX.values()), file


# Keras 3.15 itself imports jax whenever it is installed (keras/src/callbacks/
# orbax_checkpoint.py does `import jax` at import time), so the reference is what
# `import keras` alone loads: kgrad must add no framework beyond the active one.
_PROBE = (
    "import sys, json\n"
    "fw = lambda: sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules)\n"
    "import numpy as np, keras\n"
    "after_keras = fw()\n"
    "import kgrad\n"
    "{use}\n"
    "print(json.dumps([after_keras, fw(), sorted(m for m in sys.modules "
    "if m.startswith('kgrad.backends.'))]))"
)


@pytest.mark.parametrize(
    "use",
    [
        "pass",
        "kgrad.func.grad(lambda x: keras.ops.sum(x ** 2))(np.ones(3, 'float32'))\n"
        "kgrad.func.hessian(lambda x: keras.ops.sum(x ** 3))(np.ones(2, 'float32'))",
    ],
    ids=["import", "import-and-use"],
)
def test_kgrad_never_imports_another_framework(use):
    active = keras.backend.backend()
    proc = _run(_PROBE.format(use=use), active)
    assert proc.returncode == 0, proc.stderr
    after_keras, after_kgrad, kgrad_backends = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(after_kgrad) <= set(after_keras) | {FRAMEWORKS[active]}, after_kgrad
    # A backend is one module plus private helpers named after it
    # (`kgrad.backends._torch_kernels`); `_contract`, `_internals` and `_loop` are shared.
    shared = ("_contract", "_internals", "_loop", "_swaps")
    allowed = {f"kgrad.backends.{active}", *(f"kgrad.backends.{m}" for m in shared)}
    prefix = f"kgrad.backends.{HELPER_PREFIX[active]}"
    assert {m for m in kgrad_backends if not m.startswith(prefix)} <= allowed, kgrad_backends


def test_numpy_backend_gives_a_clear_error():
    code = (
        "import numpy as np, kgrad\n"
        "try:\n"
        "    kgrad.func.grad(lambda x: x)(np.ones(()))\n"
        "except NotImplementedError as e:\n"
        "    print('ERR', e)\n"
    )
    proc = _run(code, "numpy")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ERR" in out and "Received: keras.backend.backend()='numpy'" in out
    for name in ("jax", "tensorflow", "torch", "KERAS_BACKEND=jax"):
        assert name in out


def test_openvino_backend_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "name", lambda: "openvino")
    with pytest.raises(NotImplementedError, match="'openvino'.*KERAS_BACKEND"):
        kgrad.func.grad(lambda x: x)


def test_console_script_prints_version_and_backend():
    proc = _run(
        "from kgrad.tools.cli import main; raise SystemExit(main([]))", keras.backend.backend()
    )
    assert proc.returncode == 0, proc.stderr
    assert f"kgrad {kgrad.__version__}" in proc.stdout
    assert keras.backend.backend() in proc.stdout


def test_hooks_are_documented_and_match_their_defaults():
    methods = {n for n, v in vars(_contract.Hooks).items() if callable(v) and n[0] != "_"}
    values = set(_contract.Hooks.__annotations__)
    assert set(_contract.DEFAULTS) == methods | values
    source = inspect.getsource(_contract.Hooks)
    module = backends.load()
    for name, default in _contract.DEFAULTS.items():
        impl = getattr(module, name, default)
        assert backends.hook(name) is impl
        if name in values:
            assert f"{name}: " in source and isinstance(impl, type(default)), name
            continue
        assert getattr(_contract.Hooks, name).__doc__, name
        want = list(inspect.signature(getattr(_contract.Hooks, name)).parameters)[1:]
        assert list(inspect.signature(impl).parameters)[: len(want)] == want, name


def test_no_backend_is_named_outside_the_backends_package():
    import pathlib
    import re

    root = pathlib.Path(kgrad.__file__).parent
    pattern = re.compile(r'"(torch|tensorflow|jax)"')
    found = [
        f"{path.name}:{n}"
        for path in sorted(root.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
