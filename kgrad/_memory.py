"""The memory budget that guards Jacobians and Hessians before they are allocated."""

from __future__ import annotations

import math
import os

_DEFAULT = 2 * 1024**3
_budget: int | None = None


def set_memory_budget(nbytes: int | None) -> None:
    """Sets the largest Jacobian or Hessian (in bytes) kgrad will compute.

    Estimated before anything is allocated: the result plus what is in flight
    at once (one batched backward or forward pass per output or input element,
    bounded by ``chunk_size``). Past the budget, kgrad raises ``ValueError``
    with the size and what to do instead.

    Args:
        nbytes: the budget in bytes; ``None`` restores the default
            (the ``KGRAD_MEMORY_BUDGET`` environment variable, else 2 GiB).

    Example:

    >>> import kgrad
    >>> kgrad.set_memory_budget(512 * 1024**2)
    >>> kgrad.get_memory_budget()
    536870912
    >>> kgrad.set_memory_budget(None)
    """
    global _budget
    if nbytes is not None and (not isinstance(nbytes, int) or nbytes <= 0):
        raise ValueError(
            f"The memory budget must be a positive number of bytes or None. "
            f"Received: nbytes={nbytes!r}."
        )
    _budget = nbytes


def get_memory_budget() -> int:
    """Returns the memory budget in bytes (see :func:`set_memory_budget`).

    Example:

    >>> import kgrad
    >>> kgrad.get_memory_budget() > 0
    True
    """
    if _budget is not None:
        return _budget
    env = os.environ.get("KGRAD_MEMORY_BUDGET")
    return int(env) if env else _DEFAULT


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"  # pragma: no cover


def known_size(shape) -> int:
    """The number of elements of ``shape``, counting unknown (``None``) axes as 1."""
    return math.prod(1 if d is None else int(d) for d in shape)


def check(what: str, shapes, in_flight_bytes: float, itemsize: int = 4, fname: str = "") -> None:
    """Raises ValueError when ``what`` (result ``shapes`` plus in-flight bytes) is too big.

    A dimension that is unknown (``None``: a dynamic batch axis inside a graph)
    counts as 1, so the check is then a lower bound: one sample's share.
    """
    result = sum(known_size(s) for s in shapes) * itemsize
    total = result + in_flight_bytes
    budget = get_memory_budget()
    if total > budget:
        raise ValueError(
            f"The {what} needs about {human(total)} ({human(result)} for the result, shapes "
            f"{[tuple(s) for s in shapes][:4]}), more than kgrad's memory budget of "
            f"{human(budget)}. Received: a request of {human(total)} in `kgrad.{fname}`. "
            f"Pass `chunk_size=` to compute it in pieces, use `kgrad.hvp` or "
            f"`kgrad.func.jvp` for products instead of the full matrix, narrow it with "
            f"`target=`/`layers=`, or raise the budget with `kgrad.set_memory_budget()`."
        )
