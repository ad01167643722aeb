"""An ``EinsumDense`` equation sorted into a Dense layer's parts, for ghost norms.

An ``EinsumDense`` layer computes ``z = einsum(equation, a, kernel) (+ bias)``.
Where each kernel axis meets either the input or the output (not both, not
neither), sample ``s``'s kernel gradient is ``sum_t a_st (x) d_st`` over the
positions ``t`` (the axes that the input and the output share, the batch
aside), with ``a_st`` the input's kernel-side axes there and ``d_st`` the
output gradient's: the form :mod:`kgrad._ghost` takes the norm of. Input axes
that meet neither the kernel nor the output are summed over by the einsum, so
``a`` is summed over them first.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras

ops = keras.ops

_OPERAND = r"([a-zA-Z]*(?:\.\.\.)?[a-zA-Z]*)"
_EQUATION = re.compile(rf"^{_OPERAND},([a-zA-Z]+)->{_OPERAND}$")


@dataclasses.dataclass(frozen=True)
class Split:
    """The equation's three operands, as written (``...`` included)."""

    inputs: str
    kernel: str
    output: str


def split(layer) -> Split | None:
    """The layer's equation, or ``None`` where ghost norms do not apply to it."""
    match = _EQUATION.match(layer.equation.replace(" ", ""))
    if match is None:
        return None
    inputs, kernel, output = match.groups()
    letters = [op.replace("...", "") for op in (inputs, kernel, output)]
    if any(len(set(op)) != len(op) for op in letters):
        return None  # a repeated axis (a diagonal)
    if ("..." in inputs) != ("..." in output):
        return None
    lhs, _, rhs = letters
    for axis in kernel:
        if (axis in lhs) == (axis in rhs):
            return None  # an elementwise or a summed kernel axis
    if not inputs.startswith("...") and (inputs[0] not in rhs or inputs[0] in kernel):
        return None  # the first input axis, the batch, must reach the output
    return Split(inputs, kernel, output)


def positions(layer, a, d):
    """``(B, T, K)`` inputs, ``(B, T, C)`` output gradients and the bias gradients.

    The bias gradients are ``(B, *bias axes)``: ``d`` summed over every other
    output axis but the batch.
    """
    parts = split(layer)
    rank = len(a.shape)
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in layer.equation]
    elided = "".join(free[: rank - len(parts.inputs.replace("...", ""))])
    lhs = parts.inputs.replace("...", elided)
    rhs = parts.output.replace("...", elided)
    batch = lhs[0]
    places = "".join(c for c in lhs if c in rhs and c != batch)
    k_in = "".join(c for c in parts.kernel if c in lhs)
    k_out = "".join(c for c in parts.kernel if c in rhs)
    sizes = dict(zip(parts.kernel, layer.kernel.shape))
    a_pos = ops.einsum(f"{lhs}->{batch}{places}{k_in}", a)
    d_pos = ops.einsum(f"{rhs}->{batch}{places}{k_out}", d)
    batch_size = ops.shape(a)[0]
    a_pos = ops.reshape(a_pos, (batch_size, -1, math.prod(sizes[c] for c in k_in)))
    d_pos = ops.reshape(d_pos, (batch_size, -1, math.prod(sizes[c] for c in k_out)))
    bias_axes = "".join(c for c in rhs if c in (layer.bias_axes or ""))
    bias_sums = ops.einsum(f"{rhs}->{batch}{bias_axes}", d) if bias_axes else None
    return a_pos, d_pos, bias_sums
