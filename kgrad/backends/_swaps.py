"""Shared by kgrad's backends: swapping framework functions while kgrad runs.

A backend that must swap a framework kernel while its transforms trace or run
(the PyTorch backend's fused kernels, the JAX backend's cuDNN recurrent layers)
makes the swap with :func:`swapped_attributes` (or :func:`reference_counted`)
and wraps its transforms with :func:`each_call_under`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any


def reference_counted(
    enter: Callable[[], None], leave: Callable[[], None]
) -> Callable[[], AbstractContextManager]:
    """A context manager function for a process-wide switch: ``enter()`` then ``leave()``.

    The first entry, in any thread, calls ``enter()``; nested and concurrent
    entries only count; the last exit, also by an exception, calls
    ``leave()``. An ``enter()`` that raises leaves the count at zero.

    Example:

    >>> log = []
    >>> switch = reference_counted(lambda: log.append("on"), lambda: log.append("off"))
    >>> with switch():
    ...     with switch():
    ...         pass
    >>> log
    ['on', 'off']
    """
    lock = threading.Lock()
    depth = 0

    @contextlib.contextmanager
    def context():
        nonlocal depth
        with lock:
            if depth == 0:
                enter()
            depth += 1
        try:
            yield
        finally:
            with lock:
                depth -= 1
                if depth == 0:
                    leave()

    return context


def swapped_attributes(
    module: Callable[[], ModuleType], replacements: dict[str, Any]
) -> Callable[[], AbstractContextManager]:
    """A context manager function that swaps ``module()``'s attributes while entered.

    The swap is process-wide (module attributes), so it is
    :func:`reference_counted`. Attributes the module lacks (in older framework
    versions) are skipped.

    Example:

    >>> import types
    >>> m = types.SimpleNamespace(f=abs)
    >>> swap = swapped_attributes(lambda: m, {"f": round, "missing": None})
    >>> with swap():
    ...     with swap():
    ...         inner = m.f
    ...     still = m.f
    >>> inner is round, still is round, m.f is abs
    (True, True, True)
    """
    saved: dict[str, Any] = {}

    def enter():
        target = module()
        for name, replacement in replacements.items():
            if hasattr(target, name):
                saved[name] = getattr(target, name)
                setattr(target, name, replacement)

    def leave():
        target = module()
        for name, original in saved.items():
            setattr(target, name, original)
        saved.clear()

    return reference_counted(enter, leave)


def each_call_under(context: Callable[[], AbstractContextManager]) -> Callable:
    """Makes a wrapper of transforms: each call of ``transform(f, ...)``'s result
    runs inside ``context()``.

    Example:

    >>> import contextlib
    >>> seen = []
    >>> @contextlib.contextmanager
    ... def noted():
    ...     seen.append("in")
    ...     yield
    >>> twice = lambda f: (lambda x: 2 * f(x))
    >>> each_call_under(noted)(twice)(abs)(-3), seen
    (6, ['in'])
    """

    def wrap(transform):
        @functools.wraps(transform)
        def make(f, *args, **kwargs):
            inner = transform(f, *args, **kwargs)

            @functools.wraps(f)
            def wrapped(*call_args, **call_kwargs):
                with context():
                    return inner(*call_args, **call_kwargs)

            return wrapped

        return make

    return wrap
