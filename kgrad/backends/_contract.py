"""The contract every backend module of kgrad satisfies.

A backend module (``kgrad/backends/<name>.py``) holds the few primitives that
differ between frameworks. Everything else (validation, Hessians, model-level
derivatives) is written once, in shared code, on top of these primitives.
Adding a backend means one new module that satisfies :class:`Backend` and one
tox environment.

All functions follow JAX semantics: arguments may be pytrees (nested
lists, tuples and dicts of tensors), ``argnums`` is an int or a tuple of ints,
and ``has_aux=True`` means ``f`` returns ``(value, aux)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

#: The members a backend module defines, in the order they are documented below.
MEMBERS = (
    "name",
    "convert",
    "grad",
    "value_and_grad",
    "vjp",
    "jvp",
    "jacrev",
    "jacfwd",
    "vmap",
    "jit",
)


def _no_compile(f: Callable) -> None:
    return None


def _not_in_graph() -> bool:
    return False


#: Defaults of the optional hooks (see :class:`Backend`).
DEFAULTS = {
    "compile_call": _no_compile,
    "inside_graph": _not_in_graph,
}


@runtime_checkable
class Backend(Protocol):
    """What ``kgrad.backends.load()`` returns."""

    #: The Keras backend name this module implements (``keras.backend.backend()``).
    name: str

    def convert(self, x: Any) -> Any:
        """Turns a NumPy array or Python number into a native tensor.

        Native tensors pass through untouched (including tensors that a
        transform is tracing), so that nesting keeps working.
        """

    def grad(self, f: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False):
        """Returns ``g(*args)``: the gradient of scalar ``f`` w.r.t. ``args[argnums]``.

        With ``has_aux=True``, ``g`` returns ``(gradient, aux)``.
        """

    def value_and_grad(
        self, f: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False
    ):
        """Returns ``g(*args) -> (value, gradient)``; ``((value, aux), gradient)`` with aux."""

    def vjp(self, f: Callable, *primals: Any, has_aux: bool = False):
        """Returns ``(out, vjp_fn)`` (and ``aux``); ``vjp_fn(cotangent)`` gives a tuple,
        one cotangent per primal."""

    def jvp(self, f: Callable, primals: tuple, tangents: tuple, has_aux: bool = False):
        """Returns ``(out, tangent_out)`` (and ``aux``): the forward-mode product."""

    def jacrev(self, f: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False):
        """Returns ``g(*args)``: the Jacobian by reverse mode, shaped ``out.shape + in.shape``."""

    def jacfwd(self, f: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False):
        """Returns ``g(*args)``: the Jacobian by forward mode, shaped ``out.shape + in.shape``."""

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0):
        """Returns ``f`` mapped over the given axes of its positional arguments."""

    def jit(self, f: Callable):
        """Returns ``f`` compiled where the framework gains from it, else ``f`` itself."""

    # ------------------------------------------------------------------ hooks
    # Optional members: a backend that lacks one gets the default in DEFAULTS.

    def compile_call(self, f: Callable) -> Callable | None:
        """Compiles a model-level call ``f(state, arrays)`` for kgrad's cache.

        ``state`` holds every variable value and ``arrays`` the inputs, so
        nothing is read inside the compiled code. ``None``: the backend runs
        model-level calls eagerly (no cache).
        """

    def inside_graph(self) -> bool:
        """Whether a graph is being built around the call (then kgrad runs inline)."""
