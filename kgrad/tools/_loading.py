"""Loading what the command line is given: modules with custom objects, models, batches.

Shared by ``kgrad report`` (in its own process) and ``kgrad compare``'s
workers (one process per backend), so that both accept the same files.
Batches are read from ``.npy``, ``.npz`` and ``.csv`` files, never from
pickles: NumPy is always called with ``allow_pickle=False``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import numpy as np

#: The batch formats ``--inputs`` and ``--targets`` accept.
FORMATS = (".npy", ".npz", ".csv")


def absolute(spec: str) -> str:
    """An ``--import`` (or ``--custom-objects``) value with a ``.py`` path made absolute."""
    module, colon, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if module.endswith(".py"):
        module = os.path.abspath(module)
    return module + colon + name


def import_modules(specs) -> list:
    """Imports each ``--import`` value: a module name, or the path of a ``.py`` file.

    A module name is looked up on ``sys.path`` and in the current folder (as
    ``python -m`` does). Importing the module runs its
    ``keras.saving.register_keras_serializable`` decorators.
    """
    modules = []
    for spec in specs or ():
        try:
            if spec.endswith(".py"):
                name = os.path.splitext(os.path.basename(spec))[0]
                loader_spec = importlib.util.spec_from_file_location(name, spec)
                if loader_spec is None or not os.path.exists(spec):
                    raise ImportError(f"no such file {spec!r}")
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path:
                    sys.path.append(os.getcwd())
                module = importlib.import_module(spec)
        except ImportError as err:
            raise ValueError(
                f"Could not import {spec!r}: {err}. Received: --import {spec}. Pass a module "
                f"name that is on PYTHONPATH or in the current folder, or the path of its .py "
                f"file."
            ) from None
        modules.append(module)
    return modules


def custom_objects(specs) -> dict:
    """``{NAME: object}`` for each ``--custom-objects MODULE:NAME`` (the module is imported)."""
    objects = {}
    for spec in specs or ():
        module_spec, _, name = spec.rpartition(":")
        if not module_spec or not name:
            raise ValueError(
                f"--custom-objects takes MODULE:NAME, a module and an object in it. Received: "
                f"--custom-objects {spec}. For example: --custom-objects mylayers:Scale."
            )
        (module,) = import_modules([module_spec])
        if not hasattr(module, name):
            raise ValueError(
                f"Module {module_spec!r} has no object {name!r}. Received: --custom-objects "
                f"{spec}. Name a class or function defined in that module."
            )
        objects[name] = getattr(module, name)
    return objects


def load_model(path: str, imports=(), objects=(), compile: bool = False):
    """Loads a ``.keras`` model after the ``--import`` modules, with ``--custom-objects``."""
    import keras

    if not os.path.exists(path):
        raise ValueError(f"No such file. Received: {path!r}.")
    import_modules(imports)
    custom = custom_objects(objects)
    try:
        return keras.models.load_model(path, custom_objects=custom or None, compile=compile)
    except TypeError as err:  # Keras: "Could not locate class ..."
        raise ValueError(
            f"Could not load {path!r}: {err} If the model uses custom layers or functions, "
            f"pass the module that defines (and registers) them with --import MODULE, or "
            f"name each one with --custom-objects MODULE:NAME."
        ) from None


def _input_names(model) -> tuple[list[str], bool]:
    """The model's input names, and whether it takes its inputs as a dict."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return list(struct), True
    return [getattr(t, "name", "") for t in getattr(model, "inputs", None) or ()], False


def _npz(path: str, model, what: str):
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: _numeric(data[name], path, what) for name in data.files}
    names, as_dict = _input_names(model) if model is not None else ([], False)
    if len(arrays) == 1 and len(names) <= 1:
        return next(iter(arrays.values()))
    if names and set(names) <= set(arrays):
        return {n: arrays[n] for n in names} if as_dict else [arrays[n] for n in names]
    positional = [f"x{k}" for k in range(len(arrays))]
    if sorted(arrays) == sorted(positional) and (not names or len(names) == len(arrays)):
        return [arrays[n] for n in positional]
    raise ValueError(
        f"The arrays in {path!r} do not match the model's inputs. Received: arrays "
        f"{sorted(arrays)} for inputs named {names}. Save one array per input under the "
        f"input's name (np.savez({os.path.basename(path)!r}, "
        + ", ".join(f"{n}=..." for n in names or ["x0", "x1"])
        + "), or as x0, x1, ... in the order of model.inputs."
    )


def _numeric(array, path: str, what: str):
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{what} {path!r} holds a {array.dtype} array, not numbers. Received: dtype "
            f"{array.dtype}. Save a numeric array (float or int)."
        )
    return array


def _csv(path: str, model, what: str):
    try:
        array = np.loadtxt(path, delimiter=",", ndmin=2, dtype="float32")
    except ValueError:
        try:  # a header line
            array = np.loadtxt(path, delimiter=",", ndmin=2, dtype="float32", skiprows=1)
        except ValueError as err:
            raise ValueError(
                f"{what} {path!r} is not a CSV file of numbers: {err}. Received: {path!r}. "
                f"Write one sample per row, comma-separated numbers, at most one header line."
            ) from None
    inputs = getattr(model, "inputs", None) or ()
    if len(inputs) == 1 and len(inputs[0].shape) > 2 and what == "--inputs":
        shape = tuple(inputs[0].shape[1:])
        if None not in shape and int(np.prod(shape)) == array.shape[1]:
            array = array.reshape((-1, *shape))  # one flattened sample per row
    return array


def load_batch(path: str, model=None, what: str = "--inputs"):
    """A batch from ``.npy``, ``.npz`` (named arrays for multi-input models) or ``.csv``.

    Args:
        path: the file.
        model: the loaded model, to match ``.npz`` array names to its inputs and
            to reshape CSV rows to a single input's sample shape.
        what: the option the file came from, for messages.

    Returns:
        An array, or a list (dict) of arrays for a multi-input model.

    Raises:
        ValueError: the file is missing, has another format, holds pickled
            (object) data, or its arrays do not match the model's inputs.
    """
    if not os.path.exists(path):
        raise ValueError(f"No such file. Received: {what} {path!r}.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(
            f"{what} reads {', '.join(FORMATS)} files. Received: {path!r}. Save the batch with "
            f"np.save('x.npy', x), np.savez('x.npz', input_name=x, ...) for several inputs, "
            f"or as CSV (one sample per row)."
        )
    try:
        if ext == ".npy":
            return _numeric(np.load(path, allow_pickle=False), path, what)
        if ext == ".npz":
            return _npz(path, model, what)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(
                f"{what} {path!r} holds pickled Python objects, which kgrad never loads (a "
                f"pickle can run any code). Received: {path!r}. Save a numeric array instead: "
                f"np.save(path, np.asarray(x, dtype='float32'))."
            ) from None
        raise
    return _csv(path, model, what)
