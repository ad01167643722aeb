"""``kgrad explain``: an attribution of a saved model for saved inputs, as ``.npy`` and a PNG."""

from __future__ import annotations

import os
import sys

import numpy as np

METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam")


def add_parser(sub) -> None:
    """Adds the ``explain`` subcommand to the command line's subparsers."""
    from kgrad.tools.cli import _FORMATS, _loading_options

    exp = sub.add_parser("explain", help="an attribution map of a saved model (kgrad.attribution)")
    exp.add_argument("model", help="a saved .keras model")
    exp.add_argument("--inputs", required=True, help=f"the inputs to explain ({_FORMATS})")
    exp.add_argument(
        "--target",
        required=True,
        help="the class: an int for every sample, comma-separated ints (one per sample), or "
        "'predicted' (each sample's highest output)",
    )
    exp.add_argument("--method", default="integrated_gradients", choices=METHODS)
    exp.add_argument("--output", help="where to write the .npy (default: METHOD.npy)")
    exp.add_argument("--plot", help="also write the heatmap to this PNG")
    exp.add_argument("--steps", type=int, default=50, help="integrated_gradients' nodes")
    exp.add_argument("--baseline", type=float, default=0.0, help="integrated_gradients' baseline")
    exp.add_argument("--samples", type=int, default=50, help="smoothgrad's noisy copies")
    exp.add_argument("--noise", type=float, default=0.15, help="smoothgrad's relative noise")
    exp.add_argument("--seed", type=int, default=0, help="smoothgrad's noise seed")
    exp.add_argument("--layer", help="gradcam's layer (default: the last spatial one)")
    _loading_options(exp)


def main(args) -> int:
    """Runs ``kgrad explain`` for parsed ``args``; returns the exit code."""
    import keras

    import kgrad
    from kgrad.tools import _loading

    target = None if args.target == "predicted" else _target(args.target)
    model = _loading.load_model(args.model, args.imports, args.custom_objects)
    x = _loading.load_batch(args.inputs, model, "--inputs")
    if target is None:
        out = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
        target = out.reshape(out.shape[0], -1).argmax(axis=1)
    attribution = kgrad.attribution
    method = getattr(attribution, args.method)
    options = {
        "integrated_gradients": {"steps": args.steps, "baseline": args.baseline},
        "smoothgrad": {"samples": args.samples, "noise": args.noise, "seed": args.seed},
        "gradcam": {"layer": args.layer},
    }.get(args.method, {})
    result = method(model, x, target=target, **options)
    leaves = keras.tree.flatten(result)
    arrays = [np.asarray(keras.ops.convert_to_numpy(leaf)) for leaf in leaves]
    output = args.output or f"{args.method}.npy"
    if len(arrays) == 1:
        np.save(output, arrays[0])
    else:  # a multi-input model: one array per input
        output = os.path.splitext(output)[0] + ".npz"
        np.savez(output, *arrays)
    print(f"kgrad explain: wrote {output} ({', '.join(str(a.shape) for a in arrays)})")
    if args.plot:
        attribution.plot(x, {args.method: result}, args.plot)
        print(f"kgrad explain: wrote {args.plot}", file=sys.stderr)
    return 0


def _target(spec: str):
    """``--target``: an int or comma-separated ints ('predicted' is resolved with the model)."""
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"--target takes an int, comma-separated ints (one per sample) or 'predicted'. "
            f"Received: --target {spec!r}."
        ) from None
    return values[0] if len(values) == 1 else np.asarray(values)
