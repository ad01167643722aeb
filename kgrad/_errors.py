"""Validation helpers shared by kgrad's public functions.

Messages follow Keras's style: what happened, what was expected, how to fix
it, and ``Received: ...``.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Iterable
from typing import Any

import keras


def closest(name: str, names: Iterable[str]) -> str:
    """Returns a ``Did you mean ...?`` sentence for the nearest valid name, or ''."""
    match = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def check_keys(given: Iterable[str], valid: list[str], what: str) -> None:
    """Raises ValueError for keys of ``given`` that are not in ``valid``."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise ValueError(
            f"{what} has keys that are not valid here. Received: {unknown[:5]}."
            f"{closest(unknown[0], valid)} Valid keys include {valid[:6]}."
        )


def check_callable(f: Any, fname: str) -> None:
    if not callable(f):
        raise TypeError(
            f"`kgrad.func.{fname}` expects a callable to transform. "
            f"Received: f={f!r} of type {type(f).__name__}."
        )


def check_argnums(argnums: Any, fname: str) -> tuple[int, ...]:
    """Validates ``argnums`` (an int or a tuple of ints); returns it as a tuple."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if (
        isinstance(argnums, bool)
        or not isinstance(nums, tuple)
        or not nums
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in nums)
    ):
        raise TypeError(
            f"`argnums` of `kgrad.func.{fname}` must be an int or a non-empty tuple of "
            f"ints. Received: argnums={argnums!r}."
        )
    return nums


def check_args_for_argnums(args: tuple, nums: tuple[int, ...], fname: str) -> None:
    for n in nums:
        if not -len(args) <= n < len(args):
            raise ValueError(
                f"`kgrad.func.{fname}` was asked to differentiate with respect to "
                f"positional argument {n}, but the function was called with only "
                f"{len(args)} positional arguments. Received: argnums={n}. Pass the "
                f"argument positionally, or change `argnums`."
            )


_DTYPE_NAMES: dict = {}


def dtype_name(x: Any) -> str:
    """``keras.backend.standardize_dtype(x.dtype)``, remembered per dtype object.

    The key holds the dtype's type too (``np.dtype("float64") == float``, which
    Keras names ``"float32"``). ``None``, which Keras reads as ``floatx()``,
    and which can change, is not remembered.
    """
    dtype = x.dtype
    key = (type(dtype), dtype)
    try:
        return _DTYPE_NAMES[key]
    except (KeyError, TypeError):  # new, or unhashable: standardize it
        name = keras.backend.standardize_dtype(dtype)
    if dtype is not None:
        try:
            _DTYPE_NAMES[key] = name
        except TypeError:
            pass
    return name


def differentiable(dtype: str) -> bool:
    """Whether values of this (standardized) dtype have derivatives: floats and complex."""
    return dtype.startswith("float") or dtype.startswith("bfloat") or "complex" in dtype


def check_float_leaves(leaves: Iterable[Any], fname: str, argname: str = "argument") -> None:
    """Raises TypeError for integer or boolean values that are to be differentiated."""
    for x in leaves:
        dtype = dtype_name(x)
        if not differentiable(dtype):
            raise TypeError(
                f"`kgrad.{fname}` requires real- or complex-valued inputs to "
                f"differentiate with respect to, but got dtype {dtype} for an {argname} "
                f"of shape {tuple(x.shape)}. Received: dtype={dtype}. Cast the input to "
                f"a float dtype, or, for token ids fed to an Embedding layer, use "
                f"`wrt='activations'` on the embedding layer instead."
            )


_public = threading.local()


class _PublicCall:
    """The context of :func:`public_call` (a class: it runs on every call)."""

    __slots__ = ("name", "model", "previous")

    def __init__(self, name: str, model: Any):
        self.name, self.model = name, model

    def __enter__(self) -> None:
        self.previous = getattr(_public, "name", None), getattr(_public, "model", None)
        _public.name, _public.model = self.name, self.model

    def __exit__(self, *exc) -> bool:
        _public.name, _public.model = self.previous
        return False


def public_call(name: str, model: Any = None) -> contextlib.AbstractContextManager:
    """Errors raised inside name the model-level ``kgrad.<name>`` the user called.

    The model-level functions are built on :mod:`kgrad.func`; without this an
    integer model output would be reported as a problem of ``kgrad.func.grad``
    or ``kgrad.func.hessian``, which the user never called.
    """
    return _PublicCall(name, model)


def current_model() -> Any:
    """The model of the model-level call running in this thread, or None."""
    return getattr(_public, "model", None)


def model_level(body):
    """Decorates a model-level body ``body(req, arrays, options)``: see :func:`public_call`."""

    def wrapped(req, arrays, options):
        with public_call(req.fname, req.model):
            return body(req, arrays, options)

    wrapped.__name__, wrapped.__doc__ = body.__name__, body.__doc__
    return wrapped


def _model_level() -> str | None:
    return getattr(_public, "name", None)


def check_float_output(value: Any) -> None:
    """Inside a model-level call: raises TypeError for an integer or boolean output."""
    dtype = dtype_name(value)
    if not differentiable(dtype):
        raise TypeError(
            f"`kgrad.{_model_level()}` needs a real- or complex-valued model output to "
            f"differentiate, but the selected output has dtype {dtype}, which has no "
            f"derivative. Received: an output of dtype {dtype}. Select a float output with "
            f"`of=` (a layer) or `target=`, or keep the model's last layers in float (an "
            f"argmax or a cast to int has no gradient)."
        )


def check_scalar(value: Any, fname: str) -> None:
    """Raises ValueError unless ``value`` is a scalar tensor."""
    if _model_level() is not None:
        check_float_output(value)
    shape = getattr(value, "shape", None)
    if shape is None or tuple(shape) != ():
        shape_txt = tuple(shape) if shape is not None else type(value).__name__
        raise ValueError(
            f"`kgrad.func.{fname}` is only defined for scalar-output functions. Output had "
            f"shape: {shape_txt}. Received: an output of shape {shape_txt}. Reduce the "
            f"output to a scalar (e.g. `keras.ops.sum`), or use `jacrev`/`jacfwd`/`vjp` "
            f"for non-scalar outputs."
        )
    dtype = dtype_name(value)
    if not differentiable(dtype):
        raise TypeError(
            f"`kgrad.func.{fname}` needs a real- or complex-valued output to differentiate, "
            f"but the output has dtype {dtype}, which has no derivative. Received: an "
            f"output of dtype {dtype}. Return a float value: keep the computation in float "
            f"(cast integers with `keras.ops.cast(..., 'float32')` before they are used), "
            f"or use `vjp` for integer outputs."
        )
