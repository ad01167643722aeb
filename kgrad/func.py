"""Composable function transforms with JAX semantics on every Keras backend.

Each transform delegates to the backend Keras runs on: ``jax.grad`` and
friends on JAX, ``torch.func`` on PyTorch, and tapes on TensorFlow. They nest
to any order (``grad(grad(grad(f)))``), compose (``vmap(grad(f))``,
``jit(grad(f))``, ``jacfwd(jacrev(f))``) and take pytrees (nested lists,
tuples and dicts of tensors) as arguments.

Inputs may be NumPy arrays, Python numbers or the backend's tensors; results
are the backend's native tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from kgrad import _errors, _func_checks, _model
from kgrad import backends as _backends
from kgrad._func_checks import _checked_output, _convert_tree, _differentiate, _mapped

__all__ = [
    "grad",
    "value_and_grad",
    "jacrev",
    "jacfwd",
    "hessian",
    "jvp",
    "vjp",
    "vmap",
    "jit",
    "functional_call",
    "weights_of",
]

tree = keras.tree
Argnums = int | tuple[int, ...]


def grad(f: Callable, argnums: Argnums = 0, has_aux: bool = False) -> Callable:
    """Returns a function that computes the gradient of scalar-valued ``f``.

    Args:
        f: function of tensors returning a scalar tensor (or ``(scalar, aux)``
            with ``has_aux=True``).
        argnums: int or tuple of ints: the positional arguments to
            differentiate with respect to. Each may be a pytree.
        has_aux: whether ``f`` returns ``(output, aux)``; then the returned
            function gives ``(gradient, aux)``.

    Returns:
        A function with ``f``'s signature returning the gradient, structured
        like ``args[argnums]`` (a tuple of them for a tuple ``argnums``).

    Raises:
        ValueError: if ``f``'s output is not a scalar.
        TypeError: if a differentiated input is integer or boolean.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> df = func.grad(lambda x: keras.ops.sum(x ** 3))
    >>> keras.ops.convert_to_numpy(df(keras.ops.ones((3,))))
    array([3., 3., 3.], dtype=float32)
    >>> d4 = func.grad(func.grad(func.grad(func.grad(lambda x: keras.ops.log(x + 2.0)))))
    >>> round(float(d4(0.0)), 4)  # -3! / 2**4
    -0.375
    """
    return _differentiate("grad", f, argnums, has_aux, scalar=True)


def value_and_grad(f: Callable, argnums: Argnums = 0, has_aux: bool = False) -> Callable:
    """Returns a function that computes ``(f(*args), grad(f)(*args))``.

    Args:
        f: function returning a scalar tensor (or ``(scalar, aux)``).
        argnums: int or tuple of ints, as in :func:`grad`.
        has_aux: whether ``f`` returns ``(output, aux)``; then the result is
            ``((output, aux), gradient)``.

    Returns:
        A function returning ``(value, gradient)``.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> value, g = func.value_and_grad(lambda x: keras.ops.sum(x ** 2))(
    ...     keras.ops.ones((2,)))
    >>> float(value), keras.ops.convert_to_numpy(g).tolist()
    (2.0, [2.0, 2.0])
    """
    return _differentiate("value_and_grad", f, argnums, has_aux, scalar=True)


def jacrev(f: Callable, argnums: Argnums = 0, has_aux: bool = False) -> Callable:
    """Returns a function that computes the Jacobian of ``f`` by reverse mode.

    Args:
        f: function of tensors returning a tensor or a pytree of tensors.
        argnums: int or tuple of ints, as in :func:`grad`.
        has_aux: whether ``f`` returns ``(output, aux)``; then the result is
            ``(jacobian, aux)``.

    Returns:
        A function returning the Jacobian with shape ``out.shape + in.shape``
        for each (output, input) pair, nested as output structure of input
        structure, as ``jax.jacrev`` does.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> J = func.jacrev(lambda x: x ** 2)(keras.ops.convert_to_tensor([1.0, 2.0]))
    >>> keras.ops.convert_to_numpy(J).tolist()
    [[2.0, 0.0], [0.0, 4.0]]
    """
    return _differentiate("jacrev", f, argnums, has_aux, scalar=False)


def jacfwd(f: Callable, argnums: Argnums = 0, has_aux: bool = False) -> Callable:
    """Returns a function that computes the Jacobian of ``f`` by forward mode.

    Same arguments and result as :func:`jacrev`; forward mode is cheaper when
    ``f`` has fewer inputs than outputs.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> J = func.jacfwd(lambda x: x ** 2)(keras.ops.convert_to_tensor([1.0, 2.0]))
    >>> keras.ops.convert_to_numpy(J).tolist()
    [[2.0, 0.0], [0.0, 4.0]]
    """
    return _differentiate("jacfwd", f, argnums, has_aux, scalar=False)


def hessian(f: Callable, argnums: Argnums = 0) -> Callable:
    """Returns a function that computes the Hessian of scalar ``f``.

    Computed forward over reverse: ``jacfwd(jacrev(f))`` on JAX, as
    ``jax.hessian``; ``jacfwd(grad(f))`` on PyTorch (the same matrix, without a
    mapped backward inside a derivative, see the backend notes); reverse over
    reverse on TensorFlow, where a forward accumulator cannot follow Keras's
    recurrent layers inside a graph.

    Args:
        f: function returning a scalar tensor.
        argnums: int or tuple of ints, as in :func:`grad`.

    Returns:
        A function returning the Hessian, shaped ``in.shape + in.shape``.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> H = func.hessian(lambda x: keras.ops.sum(x ** 3))(
    ...     keras.ops.convert_to_tensor([1.0, 2.0]))
    >>> keras.ops.convert_to_numpy(H).tolist()
    [[6.0, 0.0], [0.0, 12.0]]
    """
    _errors.check_callable(f, "hessian")
    _errors.check_argnums(argnums, "hessian")
    backend = _backends.load()
    if hasattr(backend, "hessian"):  # a backend's own composite, where it needs one
        return _differentiate(
            "hessian",
            f,
            argnums,
            False,
            scalar=True,
            make=lambda g: backend.hessian(g, argnums=argnums),
        )
    inner = _differentiate(
        "jacrev", _checked_output(f, "hessian", False, True), argnums, False, scalar=False
    )
    return _differentiate("jacfwd", inner, argnums, False, scalar=False)


def jvp(f: Callable, primals: tuple | list, tangents: tuple | list, has_aux: bool = False):
    """Computes ``f(*primals)`` and its Jacobian-vector product with ``tangents``.

    Args:
        f: function of tensors.
        primals: tuple of the arguments of ``f`` (pytrees allowed).
        tangents: tuple of tangents, structured like ``primals``.
        has_aux: whether ``f`` returns ``(output, aux)``.

    Returns:
        ``(output, tangent_out)``, or ``(output, tangent_out, aux)``.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> y, t = func.jvp(lambda x: x ** 2, (keras.ops.convert_to_tensor([3.0]),),
    ...                 (keras.ops.convert_to_tensor([1.0]),))
    >>> keras.ops.convert_to_numpy(t).tolist()
    [6.0]
    """
    _errors.check_callable(f, "jvp")
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError(
            "`kgrad.func.jvp` expects `primals` and `tangents` to be tuples of the "
            f"function's arguments. Received: primals of type {type(primals).__name__}, "
            f"tangents of type {type(tangents).__name__}. Wrap a single argument as `(x,)`."
        )
    backend = _backends.load()
    primals = tuple(_convert_tree(p, backend) for p in primals)
    tangents = tuple(_convert_tree(t, backend) for t in tangents)
    p_leaves, t_leaves = tree.flatten(primals), tree.flatten(tangents)
    _errors.check_float_leaves(p_leaves, "func.jvp", "argument")
    if len(p_leaves) != len(t_leaves) or any(
        tuple(p.shape) != tuple(t.shape) for p, t in zip(p_leaves, t_leaves)
    ):
        raise ValueError(
            "`kgrad.func.jvp` needs tangents with the same structure and shapes as the "
            f"primals. Received: primal shapes {[tuple(p.shape) for p in p_leaves]}, "
            f"tangent shapes {[tuple(t.shape) for t in t_leaves]}."
        )
    return backend.jvp(
        _checked_output(f, "jvp", has_aux, False), primals, tangents, has_aux=has_aux
    )


def vjp(f: Callable, *primals: Any, has_aux: bool = False):
    """Computes ``f(*primals)`` and a function that pulls cotangents back.

    Args:
        f: function of tensors.
        *primals: the arguments of ``f`` (pytrees allowed).
        has_aux: whether ``f`` returns ``(output, aux)``.

    Returns:
        ``(output, vjp_fn)`` or ``(output, vjp_fn, aux)``. ``vjp_fn(cotangent)``
        takes a cotangent structured like ``output`` and returns a tuple with
        one cotangent per primal.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> y, pullback = func.vjp(lambda x: x ** 2, keras.ops.convert_to_tensor([3.0]))
    >>> (g,) = pullback(keras.ops.ones((1,)))
    >>> keras.ops.convert_to_numpy(g).tolist()
    [6.0]
    """
    _errors.check_callable(f, "vjp")
    backend = _backends.load()
    primals = tuple(_convert_tree(p, backend) for p in primals)
    _errors.check_float_leaves(tree.flatten(primals), "func.vjp")
    result = backend.vjp(_checked_output(f, "vjp", has_aux, False), *primals, has_aux=has_aux)
    inner = result[1]

    def vjp_fn(cotangent):
        return inner(_convert_tree(cotangent, backend))

    return (result[0], vjp_fn, *result[2:])


def vmap(f: Callable, in_axes: Any = 0, out_axes: Any = 0, randomness: str = "same") -> Callable:
    """Returns ``f`` vectorised over an axis of its arguments.

    Args:
        f: function of tensors.
        in_axes: an int, ``None``, or a tuple with one entry per positional
            argument: the axis to map over (``None`` broadcasts the argument).
        out_axes: where the mapped axis goes in the outputs.
        randomness: what random ops inside ``f`` (Dropout with
            ``training=True``, ``keras.random``) draw. ``"same"`` (the default,
            on every backend): the same values for every example, as JAX does
            with a key that is not mapped, and as ``torch.func.vmap`` does with
            ``randomness="same"``. ``"different"``: independent values per
            example, PyTorch only (elsewhere, map a per-example seed argument).

    Returns:
        The vectorised function.

    Raises:
        ValueError: for a ``randomness`` other than ``"same"`` or ``"different"``.
        NotImplementedError: for ``randomness="different"`` on JAX or TensorFlow.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> per_example = func.vmap(func.grad(lambda x: keras.ops.sum(x ** 2)))
    >>> keras.ops.convert_to_numpy(per_example(keras.ops.ones((4, 2)))).shape
    (4, 2)
    """
    _errors.check_callable(f, "vmap")
    backend = _backends.load()
    mapped = _mapped(backend, f, in_axes, out_axes, randomness)

    @functools.wraps(f)
    def call(*args):
        args = tree.map_structure(
            lambda a: backend.convert(a) if isinstance(a, (np.ndarray, np.generic)) else a,
            args,
        )
        _func_checks._check_mapped_axes(args, in_axes)
        return mapped(*args)

    return call


def jit(f: Callable) -> Callable:
    """Compiles ``f`` where the backend gains from it.

    ``jax.jit`` on JAX and ``tf.function`` (with ``reduce_retracing``) on
    TensorFlow. On PyTorch it returns ``f`` unchanged: eager ``torch.func`` is
    what works for arbitrary functions of Keras ops. Expect one trace per new
    input shape. Never close over model weights inside ``f``: pass them as
    arguments (see :func:`weights_of`), or the compiled function keeps the
    values it was traced with.

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> fast = func.jit(func.grad(lambda x: keras.ops.sum(keras.ops.sin(x))))
    >>> keras.ops.convert_to_numpy(fast(keras.ops.zeros((2,)))).tolist()
    [1.0, 1.0]
    """
    _errors.check_callable(f, "jit")
    return _backends.load().jit(f)


def functional_call(
    model: keras.Model, weights: dict[str, Any], x: Any, training: bool = False
) -> Any:
    """Calls ``model`` as a pure function of its weights.

    Args:
        model: a built Keras model or layer.
        weights: dict from ``variable.path`` to value. Variables missing
            from the dict use their current values; ``weights_of(model)`` gives a
            complete dict to start from.
        x: the model's input (a tensor, or a nested structure for
            multi-input models).
        training: passed to the layers (Dropout, BatchNormalization).

    Returns:
        The model's output. The variables are not changed (BatchNormalization
        statistics are not updated).

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(1, name="out")], name="net")
    >>> x = keras.ops.ones((2, 3))
    >>> loss = lambda w: keras.ops.sum(func.functional_call(model, w, x))
    >>> g = func.grad(loss)(func.weights_of(model))
    >>> sorted(g)
    ['net/out/bias', 'net/out/kernel']
    >>> keras.ops.convert_to_numpy(g["net/out/bias"]).tolist()
    [2.0]
    """
    return _model.stateless_apply(model, weights, x, training=training)


def weights_of(model: keras.Model, trainable: bool = True) -> dict[str, Any]:
    """Returns the model's current weight values keyed by ``variable.path``.

    Args:
        model: a built Keras model or layer.
        trainable: ``True`` for the trainable weights only; ``False`` for all
            weights, non-trainable ones (BatchNormalization statistics, seed
            states) included.

    Returns:
        A dict from ``variable.path`` to a copy of the current value, in the
        order of ``model.trainable_variables`` (or ``model.variables``). Later
        assignments to the variables do not change the copies, and the copies
        stay differentiable with respect to the variables (inside ``fit``).

    Example:

    >>> import keras
    >>> from kgrad import func
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(2, name="d")], name="net")
    >>> {k: tuple(v.shape) for k, v in func.weights_of(model).items()}
    {'net/d/kernel': (3, 2), 'net/d/bias': (2,)}
    """
    return _model.weights_of(model, trainable=trainable)
