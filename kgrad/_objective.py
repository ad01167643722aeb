"""A model as a pure function of its variable values, inputs and watched activations.

:class:`Objective` is the running half of a model-level request
(:class:`kgrad._engine.Request` adds the resolved options): :meth:`Objective.run`
calls the model on ``args``, a dict with any of the keys

- ``"inputs"``: the model's input (structured like ``x``);
- ``"weights"``: trainable weight values keyed by ``variable.path``;
- ``"activations"``: zero probes added to watched layers' outputs, keyed by
  layer name: the derivative with respect to a probe is the derivative with
  respect to that layer's output.

Every other variable reads ``state`` (values aligned with ``variables``) when
the request runs inside a compiled function, else its current value. The
model runs inside a ``keras.StatelessScope``, so variables are never changed
(BatchNormalization statistics, seed states and metrics included). The
objective is the loss, or the sum of the outputs that ``target`` selects.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import keras

from kgrad import _layers, _loss, _model, _tree
from kgrad import backends as _backends

ops = keras.ops
tree = keras.tree

_NULL = contextlib.nullcontext()  # reusable, unlike the contexts it stands in for


class Objective:
    """Mixin of :class:`kgrad._engine.Request`: running the model and its objective."""

    def _variable_values(self) -> dict[int, Any]:
        if self.state is None:
            return {}
        variables = self.model.variables if self.variables is None else self.variables
        return {id(v): s for v, s in zip(variables, self.state)}

    # ------------------------------------------------------------ running

    @functools.cached_property
    def _weights(self) -> list:
        """The selected trainable variables (read once per request: Keras walks the layers)."""
        variables = self.model.trainable_variables
        if self.layers_given:
            chosen = {id(v) for layer in self.layers for v in layer.trainable_variables}
            variables = [v for v in variables if id(v) in chosen]
        return variables

    def weight_values(self) -> dict[str, Any]:
        """Current values of the trainable weights of the selected layers."""
        given = self._variable_values()
        if not given:
            weights = self._weights
            return dict(zip([v.path for v in weights], _model.current_values(weights)))
        return {v.path: given[id(v)] if id(v) in given else v.value for v in self._weights}

    def template(self, kind: str):
        """The structure (and dict key order) of ``args()[kind]``, without computing it."""
        if kind == "inputs":
            return self.x
        if kind == "weights":
            return dict.fromkeys(v.path for v in self._weights)
        return {name: self.probe_like[name] for name in self.act_names}

    @property
    def layers_given(self) -> bool:
        return self.layers_spec is not None

    def run(self, args: dict[str, Any], extra=None):
        """Runs the model on ``args``; returns ``(of_output, watch, extra_result)``.

        ``extra(y_pred)`` is evaluated inside the stateless scope (for losses that
        read variables, such as regularisers).
        """
        x = args.get("inputs", self.x)
        if not self.is_keras:
            out = self.model(x)
            return out, None, extra(out) if extra else None
        watch = _layers.Watch(self.watch, args.get("activations"))
        weights = args.get("weights")
        scope = _model.stateless_scope(
            self.model,
            weights or {},
            self._variable_values(),
            self._weights if weights else None,
        )
        seed = self.rng_seed
        seeded = _NULL if seed is None else _backends.hook("seeded")(seed)
        with scope, watch.active(), seeded, _backends.hook("forward_scope")():
            y_pred = self.model(x, **_training_kwargs(self.model, self.training))
            if self.of is not None:  # a shared or uncalled `of` layer has no single output
                watch.check_called_once([self.of_key])
            out = y_pred if self.of is None else watch.outputs.get(self.of_key)
            result = extra(out) if extra else None
        return out, watch, result

    # ------------------------------------------------------------ objectives

    def select(self, out):
        """Applies ``target`` to a batched output (batch axis first)."""
        target = self.target
        if target is None:
            return out
        if callable(target):
            return target(out)
        if not hasattr(out, "shape"):
            raise ValueError(
                f"An int or tuple `target` indexes a single output tensor, but this output "
                f"is a {type(out).__name__} of several tensors. Received: target={target!r}. "
                f"Pick one with `of=`, or pass a callable `target=lambda y: ...`."
            )
        if not isinstance(target, (int, tuple, list)):
            raise TypeError(
                f"`target` selects outputs by an int index, a tuple of int indices or a "
                f"callable. Received: target={target!r} of type {type(target).__name__}. "
                f"Pass e.g. `target=3`, `target=(0, 2)` or `target=lambda y: y[:, 3]`."
            )
        idx = (target,) if isinstance(target, int) else tuple(target)
        feat = tuple(out.shape[1:])
        if len(idx) > len(feat) or not all(isinstance(i, int) for i in idx):
            raise ValueError(
                f"`target` indexes each sample's output, of shape {feat}. Received: "
                f"target={target!r}. Give at most {len(feat)} integer indices."
            )
        for i, (j, n) in enumerate(zip(idx, feat)):
            if n is not None and not -n <= j < n:
                raise ValueError(
                    f"`target` index {j} is out of range for axis {i + 1} of the output, which "
                    f"has size {n} (output shape per sample: {feat}). Received: "
                    f"target={target!r}. Use an index from {-n} to {n - 1}."
                )
        return out[(slice(None),) + idx]

    @property
    def has_loss(self) -> bool:
        return self.loss is not None or self.y is not None

    def loss_value(self, y_pred):
        loss, y = self.loss, self.y
        if y is None:
            raise ValueError(
                f"`loss` was given without targets. Received: loss={loss!r}, y=None. Pass "
                f"the targets as `y=`."
            )
        sample_weight = getattr(self, "sample_weight", None)
        if loss is None:
            return self.model.compute_loss(
                x=self.x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=self.training
            )
        return _loss.value(self.model, loss, y, y_pred, sample_weight=sample_weight)

    def objective_from_output(self, out):
        if self.has_loss:
            return self.loss_value(out)
        return _sum_all(self.select(out))

    def objective(self, args):
        """The scalar objective: the loss, or the sum of the selected outputs."""
        if self.has_loss:
            _, _, value = self.run(args, extra=self.loss_value)
            return value
        out, _, _ = self.run(args)
        return _sum_all(self.select(out))

    def selected_output(self, args):
        out, _, _ = self.run(args)
        return self.select(out)

    # ------------------------------------------------------------ set-up

    def args(self, kinds=None) -> dict[str, Any]:
        """The values to differentiate with respect to, for the requested kinds."""
        kinds = self.wrt if kinds is None else kinds
        out = {}
        for kind in kinds:
            if kind == "inputs":
                out["inputs"] = self.x
            elif kind == "weights":
                out["weights"] = self.weight_values()
            else:
                out["activations"] = {
                    name: tree.map_structure(_zeros, self.probe_like[name])
                    for name in self.act_names
                }
        return out


def _sum_all(out):
    leaves = _tree.flatten(out)
    if len(leaves) == 1:  # no `0 +` in front: one operation fewer per call
        return ops.sum(leaves[0])
    return sum(ops.sum(leaf) for leaf in leaves)


class Probe:
    """The shape and dtype of a watched layer's output, known without running the model."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple, dtype: str):
        self.shape = shape
        self.dtype = dtype


def _zeros(like):
    """Zeros shaped like a tensor, or like a :class:`Probe`."""
    if isinstance(like, Probe):
        return ops.zeros(like.shape, like.dtype)
    return ops.zeros_like(like)


try:
    from keras.src.backend.common.global_state import get_global_attribute as _global
except ImportError:  # pragma: no cover - the import moved

    def _global(name):
        return True  # as if inside a layer's call: `training` is always passed


def _training_kwargs(model, training) -> dict:
    """``{"training": training}``, or ``{}`` where leaving it out changes nothing.

    Passing ``training`` makes Keras bind it into every layer's call (about 20 us
    per layer on torch, which runs every call eagerly). Left out, each layer gets
    its own default, which is inference exactly where ``training=False``, the
    call is not made from inside another layer's call (whose ``training`` the
    layers would inherit), and every layer's ``call`` either takes no
    ``training``, defaults it to False, or is one of the Keras classes whose
    default None means inference (``_INFERENCE_ON_NONE``; not ``Lambda``, whose
    function may read it otherwise, nor ``TorchModuleWrapper``, which trains on
    None).
    """
    if training is not False or _global("current_call_ctx") is not None:
        return {"training": training}
    layers = getattr(model, "_flatten_layers", None)
    if layers is None or not all(_infers_by_default(type(layer)) for layer in layers()):
        return {"training": training}
    return {}


def _inference_on_none() -> frozenset:
    """Keras's classes whose ``call(training=None)`` runs in inference mode (read in 3.15)."""
    names = (
        "BatchNormalization",
        "Bidirectional",
        "Dense",
        "EinsumDense",
        "GroupQueryAttention",
        "MultiHeadAttention",
        "TimeDistributed",
    )
    classes = [getattr(keras.layers, n) for n in names if hasattr(keras.layers, n)]
    classes.append(keras.Sequential)
    try:
        from keras.src.models.functional import Functional

        classes.append(Functional)
    except ImportError:  # pragma: no cover - the class moved: such models get `training`
        pass
    return frozenset(classes)


_INFERENCE_ON_NONE = _inference_on_none()


@functools.cache
def _infers_by_default(cls: type) -> bool:
    """Whether ``cls``'s layers run in inference mode when called without ``training``."""
    try:
        param = inspect.signature(cls.call).parameters.get("training")
    except (TypeError, ValueError):
        return False
    if param is None or param.default is False:
        return True
    return param.default is None and cls in _INFERENCE_ON_NONE
