"""A model-level request: its resolved arguments, checked, ready to run.

:func:`prepare` validates a call (``_checks``) and resolves ``wrt``, ``layers``,
``of`` and the watched layers into a :class:`Request`; running the model as a
pure function and its objective are :class:`kgrad._objective.Objective`'s part.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kgrad import _checks, _interaction, _layers, _model, _objective, _tree
from kgrad import backends as _backends
from kgrad._checks import WRT_KINDS, _normalize_wrt, check_x  # noqa: F401 (re-exported)

tree = keras.tree

BATCHED = ("inputs", "activations")

# Layers whose output for one sample depends on the other samples of the batch.
_MIXING = (keras.layers.BatchNormalization,)


@dataclasses.dataclass
class Request(_objective.Objective):
    """A resolved model-level call (the options; ``Objective`` runs it)."""

    fname: str
    model: Any
    x: Any
    wrt: tuple[str, ...]
    single_wrt: bool
    layers: list
    single_layer: bool
    of: Any
    target: Any
    y: Any
    loss: Any
    training: bool
    is_keras: bool
    watch: dict = dataclasses.field(default_factory=dict)  # name -> layer
    act_names: list = dataclasses.field(default_factory=list)
    probe_like: dict = dataclasses.field(default_factory=dict)  # name -> output structure
    # None when the batch axis is dynamic (a TensorFlow graph with an unknown batch).
    batch_size: int | None = 0
    layers_spec: Any = None
    of_key: str | None = None
    # Values for every variable of the model (aligned with ``variables``, by
    # default ``model.variables``), given when the request runs inside a
    # compiled function: then no variable is read, so nothing is baked into
    # the compiled code.
    state: Any = None
    variables: Any = None
    # With training=True on backends whose layers draw from a global generator
    # (PyTorch): the seed every forward pass of this request starts from.
    rng_seed: int | None = None
    # One weight per sample for the loss, as `fit`'s `sample_weight` (per-sample gradients).
    sample_weight: Any = None

    def check_per_sample(self, what: str, fix: str) -> None:
        """Refuses per-sample results where samples interact (see ``_interaction``).

        ``fix`` is what, besides ``training=False``, makes the call well defined.
        """
        if self.batch_size == 0:
            raise ValueError(
                f"`kgrad.{self.fname}` got an empty batch. Received: x with batch size 0. "
                f"Pass at least one sample."
            )
        if not self.is_keras or not _interaction.samples_interact(self):
            return
        mixing = [
            layer.name
            for layer in _layers._all_layers(self.model)
            if self.training and isinstance(layer, _MIXING)
        ]
        detail = (
            f" (the layers {mixing} normalise with batch statistics with `training=True`)"
            if mixing
            else ""
        )
        use = "`training=False`, or " if mixing else ""
        raise ValueError(
            f"{what} are per sample, but each sample's output depends on the other "
            f"samples of the batch{detail}: changing one sample changed another's output, "
            f"so per-sample results are undefined. Received: training={self.training}. "
            f"Use {use}{fix}."
        )


def prepare(
    fname,
    model,
    x,
    *,
    wrt="inputs",
    layers=None,
    of=None,
    target=None,
    y=None,
    loss=None,
    training=False,
    state=None,
    variables=None,
    input=None,
) -> Request:
    """Validates a model-level call and returns its :class:`Request`.

    ``state`` (values aligned with ``variables``, by default ``model.variables``)
    replaces every variable read; compiled functions pass it so that weights are
    arguments. ``input`` (the differential operators' choice of one input of a
    multi-input model) narrows the float check of ``wrt="inputs"`` to that input.
    """
    backend = _backends.load()
    kinds, single = _normalize_wrt(wrt, fname)
    is_keras = isinstance(model, keras.layers.Layer)
    if not is_keras:
        if not callable(model):
            raise TypeError(
                f"`model` must be a Keras model or a callable built from `keras.ops`. "
                f"Received: model={model!r} of type {type(model).__name__}."
            )
        if kinds != ("inputs",) or layers is not None or of is not None:
            raise ValueError(
                f"A plain callable has no weights or layers, so only `wrt='inputs'` is "
                f"possible, without `layers` or `of`. Received: wrt={wrt!r}, "
                f"layers={layers!r}, of={of!r}. Wrap it in a Keras model for more."
            )
    else:
        _model.check_built(model)
    check_x(x, fname, is_keras)
    x = _tree.map_structure(backend.convert, x)
    if y is not None:
        y = _tree.map_structure(backend.convert, y)
    if loss is None and y is not None and is_keras:
        if getattr(model, "_compile_loss", None) is None:
            raise ValueError(
                f"`y` was given without `loss`, so kgrad would use the model's compiled "
                f"loss, but model '{model.name}' is not compiled with a loss. Received: "
                f"y of shape {tuple(tree.flatten(y)[0].shape)}, loss=None. Pass "
                f"`loss=` (e.g. 'mse' or a keras.losses.Loss) or call `model.compile(loss=...)`."
            )
    if loss is not None and y is None:
        raise ValueError(
            f"`loss` was given without targets. Received: loss={loss!r}, y=None. Pass the "
            f"targets as `y=`."
        )
    if target is not None and (y is not None or loss is not None):
        raise ValueError(
            f"`target` picks the outputs to sum when there is no loss; with `y`/`loss` the "
            f"objective is the loss, so `target` would be ignored. Received: target={target!r} "
            f"with {'y' if y is not None else 'loss'} given. Pass either `target` or "
            f"`y`/`loss`; to weigh some outputs in a loss, write it as a callable `loss=`."
        )
    if is_keras:
        _checks.check_model_call(model, x, y, fname, "inputs" in kinds, input)
    elif "inputs" in kinds:
        _checks._check_inputs(model, _checks.float_part(model, x, input, fname), fname)
    leaves = _tree.flatten(x)
    batch = leaves[0].shape[0] if leaves and len(leaves[0].shape) else 1
    batch = None if batch is None else int(batch)
    req = Request(
        fname=fname,
        model=model,
        x=x,
        wrt=kinds,
        single_wrt=single,
        layers=[],
        single_layer=False,
        of=None,
        target=target,
        y=y,
        loss=loss,
        training=bool(training),
        is_keras=is_keras,
        batch_size=batch,
        state=state,
        variables=variables,
    )
    req.layers_spec = layers
    if is_keras and req.training:
        req.rng_seed = _backends.hook("call_seed")(model)
    if is_keras:
        req.layers, req.single_layer = _layers.resolve(model, layers)
        if of is not None:
            req.of = _layers.resolve_one(model, of, "of")
            req.of_key = _layers.key(model, req.of)
            req.watch[req.of_key] = req.of
        if "activations" in kinds:
            for layer in req.layers:
                req.watch[_layers.key(model, layer)] = layer
            _discover(req)
    return req


def _symbolic_outputs(req: Request) -> dict[str, Any] | None:
    """The watched layers' output shapes from a Functional model's graph, or None.

    Works where the graph settles it: every watched layer (and ``of``) sits at
    the top of a Functional (or Sequential) model and is called once, in this
    graph alone (one inbound node), with a single output whose only unknown
    axis is the batch axis. Anything else (subclassed models, nested or shared
    layers, several outputs) returns None, and the model is run instead.
    """
    model, batch = req.model, req.batch_size
    graph = getattr(model, "_functional", None) or model
    if not isinstance(batch, int) or not hasattr(graph, "_nodes_by_depth"):
        return None  # a dynamic batch, or not a Functional graph
    watched = [*req.layers, *([] if req.of is None else [req.of])]
    top = set(map(id, graph.layers))
    found = {}
    for layer in watched:
        if isinstance(layer, keras.layers.InputLayer):  # not called when the model runs
            continue
        nodes = getattr(layer, "_inbound_nodes", None)
        if id(layer) not in top or not nodes or len(nodes) != 1:
            return None
        out = getattr(layer, "output", None)
        if not isinstance(out, keras.KerasTensor) or not out.shape or out.shape[0] is not None:
            return None
        if any(d is None for d in out.shape[1:]):
            return None
        found[_layers.key(model, layer)] = _objective.Probe((batch, *out.shape[1:]), out.dtype)
    return found


def _discover(req: Request) -> None:
    """Learns the shapes of the watched layers' outputs.

    From the model's graph where it settles them (no forward pass); else by
    running the model once.
    """
    names = [_layers.key(req.model, layer) for layer in req.layers]
    outputs = _symbolic_outputs(req)
    if outputs is None:
        _, watch, _ = req.run({})
        watch.check_called_once([n for n in names if n in watch.calls or req.single_layer])
        if req.of is not None:
            watch.check_called_once([req.of_key])
        outputs = watch.outputs
    skipped = []
    for name in names:
        out = outputs.get(name)
        if out is None or not all(_checks._is_float(leaf) for leaf in tree.flatten(out)):
            if req.single_layer:
                if out is None and name not in outputs:
                    _, watch, _ = req.run({})  # the run gives the usual "was not called" error
                    watch.check_called_once([name])
                raise ValueError(
                    f"Layer '{name}' has no float output to differentiate with respect to. "
                    f"Received: layers={name!r}. Choose a layer with a float output."
                )
            skipped.append(name)
            continue
        req.act_names.append(name)
        req.probe_like[name] = out
    if skipped and req.layers_given:  # `layers=None` (every layer) leaves them out
        raise ValueError(
            f"`layers` lists layers with no float output in this call: {skipped} (not "
            f"called by the model's forward pass, or an integer or boolean output). "
            f"Received: layers={req.layers_spec!r}. Leave them out of the list, or pass "
            f"`layers=None` for every layer that has a float output."
        )
