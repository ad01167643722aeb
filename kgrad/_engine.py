"""A model-level request turned into pure functions that ``kgrad.func`` can differentiate.

A :class:`Request` holds the resolved arguments (``wrt``, ``layers``, ``of``,
``target``, ``y``/``loss``, ``training``). Its :meth:`Request.run` calls the
model as a pure function of ``args``, a dict with any of the keys

- ``"inputs"``: the model's input (structured like ``x``);
- ``"weights"``: trainable weight values keyed by ``variable.path``;
- ``"activations"``: zero probes added to watched layers' outputs, keyed by
  layer name: the derivative with respect to a probe is the derivative with
  respect to that layer's output.

The model runs inside a ``keras.StatelessScope``, so variables are never
changed (BatchNormalization statistics, seed states and metrics included).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kgrad import _errors, _interaction, _layers, _loss, _model
from kgrad import backends as _backends

ops = keras.ops
tree = keras.tree

WRT_KINDS = ("inputs", "weights", "activations")
BATCHED = ("inputs", "activations")

# Layers whose output for one sample depends on the other samples of the batch.
_MIXING = (keras.layers.BatchNormalization,)


def _is_float(x) -> bool:
    dtype = _errors.dtype_name(x)
    return dtype.startswith("float") or dtype.startswith("bfloat")


@dataclasses.dataclass
class Request:
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
    args_template: dict = dataclasses.field(default_factory=dict)
    # Values for every variable of the model (aligned with ``model.variables``),
    # given when the request runs inside a compiled function: then no variable
    # is read, so nothing is baked into the compiled code.
    state: Any = None
    # With training=True on backends whose layers draw from a global generator
    # (PyTorch): the seed every forward pass of this request starts from.
    rng_seed: int | None = None

    def _variable_values(self) -> dict[int, Any]:
        if self.state is None:
            return {}
        return {id(v): s for v, s in zip(self.model.variables, self.state)}

    # ------------------------------------------------------------ running

    def weight_values(self) -> dict[str, Any]:
        """Current values of the trainable weights of the selected layers."""
        variables = self.model.trainable_variables
        if self.layers_given:
            chosen = {id(v) for layer in self.layers for v in layer.trainable_variables}
            variables = [v for v in variables if id(v) in chosen]
        given = self._variable_values()
        return {v.path: given[id(v)] if id(v) in given else v.value for v in variables}

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
        scope = _model.stateless_scope(self.model, args.get("weights", {}), self._variable_values())
        with scope, watch.active(), _backends.hook("seeded")(self.rng_seed):
            y_pred = self.model(x, training=self.training)
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
        if loss is None:
            return self.model.compute_loss(x=self.x, y=y, y_pred=y_pred, training=self.training)
        return _loss.value(self.model, loss, y, y_pred)

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
                    name: tree.map_structure(ops.zeros_like, self.probe_like[name])
                    for name in self.act_names
                }
        self.args_template = out
        return out

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


def _sum_all(out):
    return sum(ops.sum(leaf) for leaf in tree.flatten(out))


def check_x(x, fname: str, is_keras: bool = True) -> None:
    """Raises for ``x=None`` and, for Keras models, for nested Python lists of numbers."""
    if x is None:
        raise ValueError(
            f"`kgrad.{fname}` needs the inputs `x`. Received: x=None. Pass a batch "
            f"(a NumPy array or a backend tensor; a list or dict of them for a "
            f"multi-input model)."
        )
    if is_keras and isinstance(x, (list, tuple)):
        numbers = [leaf for leaf in tree.flatten(x) if isinstance(leaf, (int, float, bool))]
        if numbers:
            raise ValueError(
                f"`x` is a Python list of numbers, which kgrad would read as "
                f"{len(tree.flatten(x))} separate inputs: a list stands for the inputs of "
                f"a multi-input model. Received: x of type {type(x).__name__} holding "
                f"Python numbers. Pass an array instead: `np.asarray(x, dtype='float32')`."
            )


def _check_inputs(model, x, fname):
    leaves = tree.flatten(x)
    if not leaves:
        raise ValueError(f"`kgrad.{fname}` got no input. Received: x={x!r}.")
    for leaf in leaves:
        if not _is_float(leaf):
            embeddings = []
            if isinstance(model, keras.layers.Layer):
                embeddings = [
                    layer.name
                    for layer in _layers._all_layers(model)
                    if isinstance(layer, keras.layers.Embedding)
                ]
            hint = (
                f" Use `wrt='activations', layers={embeddings[0]!r}` to differentiate with "
                f"respect to the embedding layer's output."
                if embeddings
                else " Cast the input to float, or differentiate with respect to a layer's "
                "output with `wrt='activations'`."
            )
            raise TypeError(
                f"`wrt='inputs'` needs float inputs, but an input has dtype "
                f"{_errors.dtype_name(leaf)} and shape {tuple(leaf.shape)}. Received: "
                f"x with dtype {_errors.dtype_name(leaf)}.{hint}"
            )


def _shape(leaf) -> tuple:
    return tuple(None if d is None else int(d) for d in leaf.shape)


def _model_inputs(model) -> list | None:
    """The model's symbolic inputs in the order of ``tree.flatten(x)``, or None."""
    struct = getattr(model, "_inputs_struct", None)
    try:
        inputs = tree.flatten(struct) if struct is not None else list(model.inputs or [])
    except (AttributeError, ValueError, TypeError):
        return None
    if not inputs or not all(hasattr(i, "shape") for i in inputs):
        return None
    return inputs


def _check_input_shapes(model, x, fname) -> None:
    """Raises ValueError when ``x`` does not fit the model's declared inputs.

    Only models with symbolic inputs (Functional, Sequential with an ``Input``)
    are checked; Keras's own error for these cases names the layer but not
    what kgrad received.
    """
    inputs = _model_inputs(model)
    if inputs is None:
        return
    leaves = tree.flatten(x)
    expected = [tuple(i.shape) for i in inputs]
    if isinstance(x, dict) and len(inputs) > 1:
        names = [getattr(i, "name", None) for i in inputs]
        if set(x) == set(names):  # Keras matches a dict of inputs by name
            leaves = [x[n] for n in names]
    if len(leaves) != len(inputs):
        raise ValueError(
            f"Model '{model.name}' takes {len(inputs)} input(s) of shapes {expected}, but "
            f"`kgrad.{fname}` got {len(leaves)}. Received: x with shapes "
            f"{[_shape(leaf) for leaf in leaves]}. Pass one array per model input, as a "
            f"list (or dict keyed by input name) for a multi-input model."
        )
    for n, (leaf, want) in enumerate(zip(leaves, expected)):
        got = _shape(leaf)
        # Keras adds or drops a trailing axis of size 1 by itself.
        longer = got if len(got) > len(want) else want
        rank_ok = len(got) == len(want) or (
            abs(len(got) - len(want)) == 1 and longer[-1] in (1, None)
        )
        feat_ok = len(got) != len(want) or all(
            w is None or g is None or w == g for g, w in zip(got[1:], want[1:])
        )
        if not (rank_ok and feat_ok):
            which = f"input {n}" if len(inputs) > 1 else "the input"
            raise ValueError(
                f"`x` does not match model '{model.name}': {which} has shape {want} "
                f"(None is the batch axis), but the array given for it has shape {got}. "
                f"Received: x with shape {got}. Pass a batch of shape "
                f"(batch_size, {', '.join(str(d) for d in want[1:])}); for a single "
                f"sample, add the batch axis (`x[None]`)."
            )


def _check_batch_sizes(x, y, fname) -> None:
    """Raises ValueError when the arrays of ``x`` and ``y`` disagree on the batch size."""
    named = [("x", leaf) for leaf in tree.flatten(x)]
    if y is not None:
        named += [("y", leaf) for leaf in tree.flatten(y)]
    sizes = [(what, _shape(leaf)) for what, leaf in named if len(leaf.shape)]
    batch = {shape[0] for _, shape in sizes if shape[0] is not None}
    if len(batch) > 1:
        raise ValueError(
            f"`kgrad.{fname}` needs the same number of samples (the first axis) in every "
            f"array of `x` and `y`, but they differ. Received: "
            f"{', '.join(f'{what} with shape {shape}' for what, shape in sizes)}. Pass "
            f"arrays with one row per sample."
        )


def _normalize_wrt(wrt, fname):
    single = isinstance(wrt, str)
    kinds = (wrt,) if single else tuple(wrt) if isinstance(wrt, (list, tuple)) else None
    if not kinds or any(k not in WRT_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        bad = [k for k in (kinds or [wrt]) if k not in WRT_KINDS]
        hint = _errors.closest(bad[0], WRT_KINDS) if bad and isinstance(bad[0], str) else ""
        raise ValueError(
            f"`wrt` must be 'inputs', 'weights', 'activations' or a list of them without "
            f"repeats. Received: wrt={wrt!r}.{hint}"
        )
    return kinds, single


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
) -> Request:
    """Validates a model-level call and returns its :class:`Request`.

    ``state`` (values aligned with ``model.variables``) replaces every variable
    read; compiled functions pass it so that weights are arguments.
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
    x = tree.map_structure(backend.convert, x)
    if y is not None:
        y = tree.map_structure(backend.convert, y)
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
    if "inputs" in kinds:
        _check_inputs(model, x, fname)
    if is_keras:
        _check_input_shapes(model, x, fname)
        _check_batch_sizes(x, y, fname)
    leaves = tree.flatten(x)
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


def _discover(req: Request) -> None:
    """Runs the model once to learn the shapes of the watched layers' outputs."""
    _, watch, _ = req.run({})
    names = [_layers.key(req.model, layer) for layer in req.layers]
    watch.check_called_once([n for n in names if n in watch.calls or req.single_layer])
    if req.of is not None:
        watch.check_called_once([req.of_key])
    for name in names:
        out = watch.outputs.get(name)
        if out is None or not all(_is_float(leaf) for leaf in tree.flatten(out)):
            if req.single_layer:
                raise ValueError(
                    f"Layer '{name}' has no float output to differentiate with respect to. "
                    f"Received: layers={name!r}. Choose a layer with a float output."
                )
            continue
        req.act_names.append(name)
        req.probe_like[name] = out
