"""Root pytest configuration.

Doctests import only the active backend's modules. On a GPU, matrix products and
convolutions run in full float32 (no TF32): the suite compares kgrad's float32
results with float64 references at float32 tolerances, which TF32's 10-bit
mantissa would miss by three digits. On a CPU nothing changes.
"""

import os

_active = os.environ.get("KERAS_BACKEND", "tensorflow")
# Another backend's module and its helpers (`_tf_kernels.py`, ...) import its framework.
_HELPER_PREFIX = {"jax": "_jax_", "tensorflow": "_tf_", "torch": "_torch_"}
_backends = os.path.join(os.path.dirname(__file__), "kgrad", "backends")
collect_ignore = [
    f"kgrad/backends/{file}"
    for file in sorted(os.listdir(_backends))
    for name, prefix in _HELPER_PREFIX.items()
    if name != _active and (file == f"{name}.py" or file.startswith(prefix))
]
# Scripts that tests/test_distribution.py runs in processes of their own: importing one
# (as --doctest-modules would) sets the backend and the device count of the process.
collect_ignore += ["tests/distributed_check.py", "tests/distributed_fit.py"]


def pytest_configure(config):
    """Turns TF32 off for the active backend's framework when it sees a GPU."""
    if _active == "jax":
        import jax

        if jax.default_backend() != "cpu":
            jax.config.update("jax_default_matmul_precision", "highest")
    elif _active == "torch":
        import torch

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    elif _active == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            tf.config.experimental.enable_tensor_float_32_execution(False)
