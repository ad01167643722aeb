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

import contextlib
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


def _call(f: Callable, arrays: dict) -> Any:
    return f()


def _concrete(x: Any) -> Any:
    import numpy as np

    return np.asarray(x)


def _batched_map(fn: Callable, stacked: Any, fold: Callable | None = None) -> Any:
    from kgrad import func

    return func.vmap(fn)(stacked)


def _cannot_vmap(err: Exception) -> bool:
    return False


def _no_seed(model: Any) -> None:
    return None


def _seeded(seed: int | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _as_given(arrays: dict) -> dict:
    return arrays


def _not_distributed() -> bool:
    return False


def _results_as_given(out: Any, variables: list, arrays: dict) -> Any:
    return out


def _never_ready(value: Any, variable: Any) -> bool:
    return False


def _always_initialized(value: Any) -> bool:
    return True


def _no_taylor(g: Callable, x: Any, v: Any, order: int) -> None:
    return None


def _nested_jvp(f: Callable, primals: tuple, tangents: tuple, has_aux: bool = False, inner=0):
    from kgrad import func

    return func.jvp(f, primals, tangents, has_aux=has_aux)


#: Defaults of the optional hooks (see :class:`Hooks`).
DEFAULTS = {
    "compile_call": _no_compile,
    "inside_graph": _not_in_graph,
    "eager_call": _call,
    "concrete": _concrete,
    "eager_scope": contextlib.nullcontext,
    "no_grad": contextlib.nullcontext,
    "batched_map": _batched_map,
    "cannot_vmap": _cannot_vmap,
    "call_seed": _no_seed,
    "seeded": _seeded,
    "forward_scope": contextlib.nullcontext,
    "lay_out": _as_given,
    "distributed": _not_distributed,
    "place_results": _results_as_given,
    "scope_ready": _never_ready,
    "initialized": _always_initialized,
    "hvp_mode": "fwd",
    "reusable_hvp": False,
    "per_sample_hessian_mode": "fwd",
    "vmap_randomness": ("same",),
    "taylor_series": _no_taylor,
    "nested_jvp": _nested_jvp,
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
        """Returns ``f`` mapped over the given axes of its positional arguments.

        Random ops draw the same values for every example (``kgrad.func.vmap``'s
        ``randomness="same"``). A backend listing more modes in
        ``vmap_randomness`` takes them as a ``randomness`` keyword.
        """

    def jit(self, f: Callable):
        """Returns ``f`` compiled where the framework gains from it, else ``f`` itself."""


class Hooks(Protocol):
    """Optional members of a backend module; one that lacks one gets its default.

    ``kgrad.backends.hook(name)`` returns the active backend's member or the
    default in :data:`DEFAULTS`.
    """

    def compile_call(self, f: Callable) -> Callable | None:
        """Compiles a model-level call ``f(state, arrays)`` for kgrad's cache.

        ``state`` holds every variable value and ``arrays`` the inputs, so
        nothing is read inside the compiled code. ``None``: the backend runs
        model-level calls eagerly (no cache).
        """

    def inside_graph(self) -> bool:
        """Whether a graph is being built around the call (then kgrad runs inline)."""

    def eager_call(self, f: Callable, arrays: dict) -> Any:
        """Runs an uncompiled model-level call ``f()`` whose inputs are ``arrays``.

        The place for what the framework needs around it (PyTorch: no graph for
        results nobody will differentiate, see ``kgrad._recording``).
        """

    def concrete(self, x: Any) -> Any:
        """``x`` as a NumPy array, or ``None`` when it is traced (symbolic)."""

    def eager_scope(self) -> contextlib.AbstractContextManager:
        """A context in which ops on concrete values run eagerly, also while tracing."""

    def no_grad(self) -> contextlib.AbstractContextManager:
        """A context in which nothing records a graph (values only)."""

    def batched_map(self, fn: Callable, stacked: Any, fold: Callable | None = None) -> Any:
        """``vmap(fn)(stacked)`` over directions (Jacobian rows or columns) of one function.

        Random ops draw the same values for every direction, as in the
        unmapped forward pass. Where the backend cannot vectorise ``fn`` it
        calls ``fold(stacked)`` (the same result with the directions folded
        into the batch axis), where given, else loops over directions.
        """

    def cannot_vmap(self, err: Exception) -> bool:
        """Whether ``err`` says the backend cannot vectorise the model (then kgrad loops)."""

    def call_seed(self, model: Any) -> int | None:
        """A seed for the random ops of one kgrad call with ``training=True``, or None.

        For backends whose layers draw from a global generator rather than the
        model's seed states; see ``seeded``.
        """

    def seeded(self, seed: int | None) -> contextlib.AbstractContextManager:
        """A context in which every forward pass starts its random draws from ``seed``."""

    def forward_scope(self) -> contextlib.AbstractContextManager:
        """A context around every forward pass of the model in a kgrad call.

        Also around those that are not differentiated (shape probes, the
        value), so that a call's values and derivatives come from the same
        kernels. The JAX backend runs recurrent layers on their scan loop in it.
        """

    def taylor_series(self, g: Callable, x: Any, v: Any, order: int) -> list | None:
        """``[g, D_v g, ..., D_v^order g]`` in Taylor mode, or None where it has no rules.

        None (the default's answer) means nested ``jvp``
        (``kgrad._taylor.nested_series``).
        """

    def nested_jvp(
        self, f: Callable, primals: tuple, tangents: tuple, has_aux: bool = False, inner: int = 0
    ) -> Any:
        """``jvp`` for one level of nested forward mode with ``inner`` levels inside it.

        The default is ``jvp``; a backend may switch method for nested levels.
        """

    def lay_out(self, arrays: dict) -> dict:
        """A call's converted arrays, placed on the devices before it runs.

        ``arrays`` maps names to structures: ``"x"``, ``"y"`` and
        ``"sample_weight"`` hold batches. The default places nothing; the JAX
        backend lays batches out with ``keras.distribution``'s data layout.
        """

    def distributed(self) -> bool:
        """Whether calls now spread batches over several devices (``keras.distribution``).

        Batch-size buckets (``kgrad._buckets``) pad no batch then: each batch
        is laid out at its own size.
        """

    def place_results(self, out: Any, variables: list, arrays: dict) -> Any:
        """A compiled call's results (inside the compiled function), placed on the devices.

        ``variables`` are the model's variables (results keyed by a variable's
        ``path`` with its shape are weight-shaped), ``arrays`` the call's
        arrays (results whose first axis has the batch's size are per
        sample). The default places nothing; the JAX backend constrains
        weight-shaped results to their weights' layouts and per-sample ones to
        ``keras.distribution``'s data layout.
        """

    def scope_ready(self, value: Any, variable: Any) -> bool:
        """Whether ``value`` can stand for ``variable`` in a ``keras.StatelessScope`` as it is.

        That is, where the scope's conversion (``convert_to_tensor`` to the
        variable's dtype) would return it unchanged; kgrad then spares the
        conversion, a few microseconds per variable on every eager call. The
        default is False: every value is converted.
        """

    def initialized(self, value: Any) -> bool:
        """Whether a variable's stored value (``variable._value``) can be read eagerly.

        False for TensorFlow variables that a ``tf.function`` being traced
        creates (a model built inside ``fit``'s step), which hold no value
        until the function runs. The default is True.
        """

    hvp_mode: str
    """``"fwd"`` (forward over reverse) or ``"rev"`` (reverse over reverse) for ``hvp``."""

    reusable_hvp: bool
    """Whether one batch's Hessian-vector products may share one linearisation.

    Where True, ``kgrad.hessian_eigenvalues`` and ``kgrad.hessian_trace`` take
    the reverse-mode derivative of the gradient once for an in-memory batch
    (``kgrad._hessian.hvp_operator``) and each product is one backward pass
    through it, as PyHessian does; elsewhere each product is a ``kgrad.hvp``
    call (compiled once, all passes each time).
    """

    per_sample_hessian_mode: str
    """``"fwd"`` (columns, forward over reverse) or ``"rev"`` (rows) for per-sample Hessians."""

    vmap_randomness: tuple
    """The ``randomness`` values of ``kgrad.func.vmap`` that ``vmap`` supports (``"same"``)."""
