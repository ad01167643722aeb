"""A Keras model as a pure function of its weights and inputs."""

from __future__ import annotations

from typing import Any

import keras

from kgrad import _errors
from kgrad import backends as _backends

try:
    from keras.src.backend.common.stateless_scope import get_stateless_scope as _get_stateless_scope
    from keras.src.backend.common.stateless_scope import in_stateless_scope as _in_stateless_scope
except ImportError:  # pragma: no cover - the import moved
    from keras.src.backend import get_stateless_scope as _get_stateless_scope
    from keras.src.backend import in_stateless_scope as _in_stateless_scope


def check_built(model: Any) -> None:
    """Raises ValueError for a Keras layer or model that has no weights yet."""
    if isinstance(model, keras.layers.Layer) and not model.built:
        raise ValueError(
            f"The model '{model.name}' is not built, so it has no weights to differentiate "
            f"with respect to. Received: an unbuilt {type(model).__name__}. Build it first: "
            f"call it once on a batch (`model(x)`), call `model.build(input_shape)`, or "
            f"start it with `keras.Input(shape)`."
        )


def current_values(variables) -> list:
    """Current variable values; inside a ``StatelessScope`` (``fit``, a user's), the scope's."""
    if _in_stateless_scope():
        return [v.value for v in variables]
    # Outside a scope `v.value` is `v._value` plus autocast bookkeeping (which
    # only applies to mixed-precision layers while they run, and then again when
    # the layer reads the value); this is the hot path.
    return [v._value for v in variables]


def _paths(variables) -> list[str]:
    paths = [v.path for v in variables]
    if len(set(paths)) != len(paths):
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(
            "kgrad keys weights by `variable.path`, but this model has several variables "
            f"with the same path. Received: duplicated paths {dupes}. Give the layers "
            "unique names."
        )
    return paths


def weights_of(model: keras.layers.Layer, trainable: bool = True) -> dict[str, Any]:
    """See :func:`kgrad.func.weights_of`."""
    check_built(model)
    variables = model.trainable_variables if trainable else model.variables
    # Copies, so that later assignments (set_weights, optimizer steps) do not change
    # them; a copy is differentiable, so autograd inside `fit` still reaches the
    # variables on every backend.
    return dict(zip(_paths(variables), (keras.ops.copy(v.value) for v in variables)))


def stateless_apply(
    model: keras.layers.Layer, weights: dict[str, Any], x: Any, training: bool = False
) -> Any:
    """See :func:`kgrad.func.functional_call`."""
    check_built(model)
    if not isinstance(weights, dict):
        raise TypeError(
            "`weights` must be a dict from `variable.path` to value, such as "
            f"`kgrad.func.weights_of(model)`. Received: weights of type "
            f"{type(weights).__name__}."
        )
    trainable, non_trainable = model.trainable_variables, model.non_trainable_variables
    known = _paths(list(trainable) + list(non_trainable))
    _errors.check_keys(
        weights, known, f"`weights` (keyed by `variable.path` of model '{model.name}')"
    )
    for v in list(trainable) + list(non_trainable):
        if v.path in weights:
            shape = tuple(getattr(weights[v.path], "shape", ()))
            if shape != tuple(v.shape):
                raise ValueError(
                    f"The value given for weight '{v.path}' has the wrong shape. Expected "
                    f"{tuple(v.shape)}. Received: shape {shape}."
                )
    with stateless_scope(model, weights):
        return model(x, training=training)


class _Scope(keras.StatelessScope):
    """A ``keras.StatelessScope`` in which unmapped variables read their values.

    An unmapped variable answers ``get_current_value`` with what the enclosing
    ``StatelessScope`` gives it (``fit``'s traced values, a user's mapping), or
    else with its own value, as Keras expects of every variable of the model
    (its regularisation losses read them so). So only the mapped values go
    through the scope's conversion, and nothing walks the model's variables.
    Assignments made in the scope land in its mapping, and are read back.
    """

    def __init__(self, state_mapping: list, outer):
        self._outer = outer
        if not state_mapping:
            super().__init__()
            return
        ready = _backends.hook("scope_ready")
        as_is = [ready(value, variable) for variable, value in state_mapping]
        super().__init__(state_mapping=[p for p, ok in zip(state_mapping, as_is) if not ok])
        for (variable, value), ok in zip(state_mapping, as_is):
            if ok:  # what the conversion would return: spared
                self.state_mapping[id(variable)] = value

    def get_current_value(self, variable):
        value = self.state_mapping.get(id(variable))
        if value is None and self._outer is not None:
            value = self._outer.get_current_value(variable)
        if value is None:
            return variable._value
        return value


def stateless_scope(
    model: keras.layers.Layer,
    weights: dict[str, Any],
    by_id: dict[int, Any] | None = None,
    variables: Any = None,
):
    """A ``keras.StatelessScope`` in which ``model``'s variables read ``weights``.

    Variables missing from ``weights`` read their current values (inside
    ``fit``, the trainer's traced values; inside a user's ``StatelessScope``,
    its mapping). Assignments made in the scope (BatchNorm statistics, seed
    states, metrics) are discarded when it closes. The model is then called
    through ``model(x, training=...)``, as a user calls it, so ``training``
    reaches every layer, also in subclassed models whose ``call`` has no
    ``training`` argument. ``by_id`` (``id(variable)`` -> value) gives values
    for variables missing from ``weights``. ``variables``, when given, are the
    variables that ``weights`` names (else every variable of ``model`` is
    looked at).
    """
    outer = _get_stateless_scope() if _in_stateless_scope() else None
    if by_id:
        mapping = []
        for v in model.variables:
            if v.path in weights:
                mapping.append((v, weights[v.path]))
            elif id(v) in by_id:
                mapping.append((v, by_id[id(v)]))
        return _Scope(mapping, outer)
    if not weights:
        return _Scope([], outer)
    mapping = [(v, weights[v.path]) for v in variables or () if v.path in weights]
    if len(mapping) != len(weights):  # `variables` do not name every weight: look at all
        mapping = [(v, weights[v.path]) for v in model.variables if v.path in weights]
    return _Scope(mapping, outer)
