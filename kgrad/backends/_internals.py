"""Checks that the framework internals kgrad swaps while it differentiates are the ones it knows.

kgrad replaces a few functions for the duration of a derivative, because the
originals give wrong or missing higher derivatives:

- TensorFlow: ``keras.src.backend.tensorflow.nn._compute_moments`` (the
  variance around a stopped mean), reached by Keras's ``ops.moments``;
- PyTorch: ``torch.nn.functional.layer_norm`` and ``silu`` (swapped for
  composites), and attention routed to the math kernel by
  ``torch.nn.attention.sdpa_kernel``.

A private function can vanish or change its signature in any release. Without
these checks kgrad would then fail deep inside a transform, or, worse, run
without the swap and return wrong second derivatives. Each kernels module
(``_tf_kernels``, ``_torch_kernels``) calls its check once per process, on its
first swap (the first derivative that needs it); a mismatch raises
``ImportError`` that names the installed versions and the tested range.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

#: The versions kgrad's tests run on: the floors of pyproject.toml and the
#: newest releases tested (README, "Supported versions").
TESTED = {
    "keras": ("3.8.0", "3.15.1"),
    "tensorflow": ("2.16.1", "2.21.0"),
    "torch": ("2.4.0", "2.14.1"),
    "jax": ("0.4.33", "0.10.2"),
}


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        module = __import__(package)
        return str(getattr(module, "__version__", "unknown"))


def _unsupported(package: str, framework: str, what: str) -> ImportError:
    low, high = TESTED[package]
    keras_low, keras_high = TESTED["keras"]
    return ImportError(
        f"kgrad cannot run on the installed {framework}: {what} kgrad replaces this "
        f"internal while it differentiates, so that second and higher derivatives are "
        f"exact, and it will not run without it. Received: keras=={_version('keras')}, "
        f"{package}=={_version(package)}. kgrad is tested with keras {keras_low} to "
        f"{keras_high} and {package} {low} to {high}; install versions in that range, "
        f"e.g. `pip install 'keras>={keras_low},<={keras_high}' "
        f"'{package}>={low},<={high}'`."
    )


def _parameters(function: Callable) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return []


def require_function(
    owner: Any,
    attribute: str,
    parameters: Sequence[str],
    *,
    package: str,
    framework: str,
) -> Callable:
    """Returns ``owner.attribute`` if it is a function whose parameters start with ``parameters``.

    Raises:
        ImportError: naming the installed versions and the tested range, if the
            attribute is missing, not callable, or has other parameters.

    Example:

    >>> import math
    >>> from kgrad.backends import _internals
    >>> _internals.require_function(
    ...     math, "hypot", [], package="keras", framework="Python") is math.hypot
    True
    """
    name = f"{getattr(owner, '__name__', owner)}.{attribute}"
    function = getattr(owner, attribute, None)
    if function is None or not callable(function):
        raise _unsupported(package, framework, f"it has no function `{name}`.")
    found = _parameters(function)
    if found[: len(parameters)] != list(parameters):
        raise _unsupported(
            package,
            framework,
            f"`{name}` takes ({', '.join(found)}), not ({', '.join(parameters)}, ...).",
        )
    return function


def require_reached(
    caller: Callable, attribute: str, *, package: str, framework: str, via: str
) -> None:
    """Checks that ``caller`` looks ``attribute`` up by name when it runs.

    A swap of ``attribute`` reaches ``caller`` only if ``caller`` reads it from
    its module (or an imported module) at call time, which shows as the name
    in its code's ``co_names``.

    Raises:
        ImportError: if ``caller`` no longer names ``attribute``.

    Example:

    >>> from kgrad.backends import _internals
    >>> def f(x):
    ...     return abs(x)
    >>> _internals.require_reached(f, "abs", package="keras", framework="Python", via="f")
    """
    code = getattr(inspect.unwrap(caller), "__code__", None)
    if code is None or attribute not in code.co_names:
        raise _unsupported(
            package,
            framework,
            f"`{via}` no longer calls `{attribute}`, so replacing it would not reach "
            f"Keras's computation.",
        )


def check_tensorflow() -> None:
    """The internals that kgrad's TensorFlow backend swaps (see :mod:`._tf_kernels`)."""
    try:
        from keras.src.backend.tensorflow import nn as keras_tf_nn
    except ImportError as error:
        raise _unsupported(
            "keras", "Keras", "it has no module `keras.src.backend.tensorflow.nn`."
        ) from error
    require_function(
        keras_tf_nn,
        "_compute_moments",
        ["x", "axes", "keepdims"],
        package="keras",
        framework="Keras",
    )
    require_function(keras_tf_nn, "moments", ["x", "axes"], package="keras", framework="Keras")
    require_reached(
        keras_tf_nn.moments,
        "_compute_moments",
        package="keras",
        framework="Keras",
        via="keras.src.backend.tensorflow.nn.moments",
    )


def check_torch() -> None:
    """The internals that kgrad's PyTorch backend swaps (see :mod:`._torch_kernels`)."""
    import torch

    functional = torch.nn.functional
    require_function(
        functional,
        "layer_norm",
        ["input", "normalized_shape", "weight", "bias", "eps"],
        package="torch",
        framework="PyTorch",
    )
    require_function(functional, "silu", ["input", "inplace"], package="torch", framework="PyTorch")
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as error:
        raise _unsupported(
            "torch", "PyTorch", "it has no `torch.nn.attention.sdpa_kernel`."
        ) from error
    if not callable(sdpa_kernel) or not hasattr(SDPBackend, "MATH"):
        raise _unsupported("torch", "PyTorch", "it has no `SDPBackend.MATH` attention kernel.")
