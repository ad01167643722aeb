"""The ``kgrad`` command line: ``kgrad compare``, ``report``, ``bench`` and ``explain``."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kgrad", description="Derivatives of Keras 3 models on every backend."
    )
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    sub = parser.add_subparsers(dest="command")
    cmp_ = sub.add_parser(
        "compare", help="compare derivatives across backends (built-in demos by default)"
    )
    cmp_.add_argument("model", nargs="?", help="a saved .keras model (default: demo models)")
    cmp_.add_argument("--inputs", help=f"a batch of inputs for MODEL ({_FORMATS})")
    cmp_.add_argument("--targets", help="a batch of targets (adds loss derivatives)")
    _loading_options(cmp_)
    cmp_.add_argument("--backends", help="comma-separated, default: every installed backend")
    cmp_.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmp_.add_argument("--quick", action="store_true", help="only the three small demos")
    cmp_.add_argument("--tolerance", type=float, default=None, help="relative, default 1e-3")
    cmp_.add_argument(
        "--zoo",
        nargs="?",
        const="env",
        default=None,
        help="compare the architecture zoo instead: 'ci', 'full' or names (default: "
        "$KGRAD_ZOO, else 'ci')",
    )
    rep = sub.add_parser("report", help="the gradient report of a saved model")
    rep.add_argument("model", help="a saved .keras model")
    rep.add_argument("--inputs", required=True, help=f"a batch of inputs ({_FORMATS})")
    rep.add_argument("--targets", help="a batch of targets (the objective is then the loss)")
    _loading_options(rep)
    rep.add_argument("--loss", help="a Keras loss name; default: the model's compiled loss")
    rep.add_argument("--plot", help="also write the gradient-flow chart to this PNG")
    rep.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench = sub.add_parser(
        "bench", help="time kgrad against hand-written native code on the active backend"
    )
    bench.add_argument("--quick", action="store_true", help="smaller sizes, 5 rounds")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--repeats", type=int, default=None, help="rounds per case")
    from kgrad.tools import explain

    explain.add_parser(sub)
    return parser


_FORMATS = ".npy; .npz with one array per input, named as the model's inputs; or .csv"


def _loading_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module (or .py file) before loading the model, e.g. one that "
        "registers custom layers with keras.saving.register_keras_serializable; repeatable",
    )
    sub.add_argument(
        "--custom-objects",
        dest="custom_objects",
        action="append",
        default=[],
        metavar="MODULE:NAME",
        help="pass MODULE.NAME to keras.models.load_model as a custom object; repeatable",
    )
    sub.add_argument(
        "--verbose", action="store_true", help="show tracebacks (a failed worker's whole log)"
    )


def _quiet_framework_logs() -> None:
    """Quiets TensorFlow's start-up logs unless the user chose a level.

    The command line controls the import order: this runs before Keras (and so
    TensorFlow) is imported, which is when TensorFlow reads the variable.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kgrad`` console script.

    Example:

    >>> from kgrad.tools.cli import main
    >>> main(["--version"])  # doctest: +ELLIPSIS
    kgrad 0.1.0 (keras ..., backend ...)
    0
    """
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    _quiet_framework_logs()
    if args.version or args.command is None:
        import keras

        import kgrad

        print(
            f"kgrad {kgrad.__version__} (keras {keras.__version__}, backend "
            f"{keras.backend.backend()})"
        )
        return 0
    if args.command == "compare":
        from kgrad.tools import compare

        backends = args.backends.split(",") if args.backends else None
        try:
            return compare.main(
                args.model,
                args.inputs,
                args.targets,
                backends,
                args.json,
                args.quick,
                args.tolerance if args.tolerance is not None else compare.TOLERANCE,
                zoo=(os.environ.get("KGRAD_ZOO") or "ci") if args.zoo == "env" else args.zoo,
                imports=args.imports,
                custom_objects=args.custom_objects,
                verbose=args.verbose,
            )
        except (ValueError, RuntimeError) as err:
            return _fail("compare", err, args.verbose)
    if args.command == "report":
        try:
            return _report(args)
        except (ValueError, TypeError, ImportError, OSError) as err:
            return _fail("report", err, args.verbose)
    if args.command == "bench":
        from kgrad.tools import bench

        argv_bench = ["--quick"] * args.quick + ["--json"] * args.json
        if args.repeats is not None:
            argv_bench += ["--repeats", str(args.repeats)]
        try:
            return bench.main(argv_bench)
        except (ValueError, NotImplementedError) as err:
            print(f"kgrad bench: {err}", file=sys.stderr)
            return 2
    if args.command == "explain":
        from kgrad.tools import explain

        try:
            return explain.main(args)
        except (ValueError, TypeError, ImportError, OSError) as err:
            return _fail("explain", err, args.verbose)
    print(f"kgrad {args.command}: not available in this version yet.", file=sys.stderr)
    return 2


def _fail(command: str, err: Exception, verbose: bool) -> int:
    """Prints the error as one line (and, with ``--verbose``, its traceback); returns 2."""
    if verbose:
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    print(f"kgrad {command}: {err}", file=sys.stderr)
    return 2


def _report(args) -> int:
    import kgrad
    from kgrad.tools import _loading

    for path in (args.model, args.inputs, args.targets):
        if path is not None and not os.path.exists(path):
            raise ValueError(f"No such file. Received: {path!r}.")
    compiled = args.targets is not None and not args.loss
    model = _loading.load_model(args.model, args.imports, args.custom_objects, compile=compiled)
    x = _loading.load_batch(args.inputs, model, "--inputs")
    y = _loading.load_batch(args.targets, model, "--targets") if args.targets else None
    if y is not None and args.loss is None and getattr(model, "loss", None) is None:
        raise ValueError(
            "--targets needs a loss, and the saved model was not compiled with one. "
            f"Received: --targets {args.targets!r} without --loss. Pass e.g. --loss mse."
        )
    rep = kgrad.grad_report(model, x, y, loss=args.loss)
    print(rep.to_json() if args.json else rep.to_text())
    if args.plot:
        rep.plot(args.plot)
        print(f"kgrad report: wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
