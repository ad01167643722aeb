"""A Keras model as a pure function of its weights and inputs."""

from __future__ import annotations

from typing import Any

import keras

from kgrad import _errors

try:
    from keras.src.backend.common.stateless_scope import in_stateless_scope as _in_stateless_scope
except ImportError:  # pragma: no cover - the import moved

    def _in_stateless_scope() -> bool:
        return True  # always map every variable, which is always right


def check_built(model: Any) -> None:
    """Raises ValueError for a Keras layer or model that has no weights yet."""
    if isinstance(model, keras.layers.Layer) and not model.built:
        raise ValueError(
            f"The model '{model.name}' is not built, so it has no weights to differentiate "
            f"with respect to. Received: an unbuilt {type(model).__name__}. Build it first: "
            f"call it once on a batch (`model(x)`), call `model.build(input_shape)`, or "
            f"start it with `keras.Input(shape)`."
        )


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
    """A ``keras.StatelessScope`` in which some variables read their own values.

    ``own`` holds the ``id`` of each variable that is not mapped but still
    answers ``get_current_value`` with its value, as Keras expects of every
    variable of the model (its regularisation losses read them so); only the
    mapped values go through the scope's conversion.
    """

    def __init__(self, state_mapping: list, own: set[int]):
        super().__init__(state_mapping=state_mapping)
        self._own = own

    def get_current_value(self, variable):
        value = self.state_mapping.get(id(variable))
        if value is None and id(variable) in self._own:
            return variable._value
        return value


def stateless_scope(
    model: keras.layers.Layer, weights: dict[str, Any], by_id: dict[int, Any] | None = None
):
    """A ``keras.StatelessScope`` in which ``model``'s variables read ``weights``.

    Variables missing from ``weights`` read their current values (inside
    ``fit``, the trainer's traced values). Assignments made in the scope (BatchNorm
    statistics, seed states, metrics) are discarded when it closes. The model is
    then called through ``model(x, training=...)``, as a user calls it, so
    ``training`` reaches every layer, also in subclassed models whose ``call`` has
    no ``training`` argument. ``by_id`` (``id(variable)`` -> value) gives values
    for variables missing from ``weights``.

    Outside every other ``StatelessScope``, a variable that would read its own
    value is not converted into the mapping (see ``_Scope``), which spares a
    conversion per variable on every call; inside one, each such variable maps
    to the outer scope's value.
    """
    by_id = by_id or {}
    outer = _in_stateless_scope()
    mapping, own = [], set()
    for v in model.variables:
        if v.path in weights:
            value = weights[v.path]
        elif id(v) in by_id:
            value = by_id[id(v)]
        elif outer:
            value = v.value
        else:
            value = v._value  # its own value
        if outer or value is not v._value:
            mapping.append((v, value))
        else:
            own.add(id(v))
    if own:
        return _Scope(mapping, own)
    return keras.StatelessScope(state_mapping=mapping)
