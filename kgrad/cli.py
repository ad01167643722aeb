"""The ``kgrad`` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kgrad`` console script.

    Example:

    >>> from kgrad.cli import main
    >>> main(["--version"])  # doctest: +ELLIPSIS
    kgrad 0.1.0 (keras ..., backend ...)
    0
    """
    import keras

    import kgrad

    argv = sys.argv[1:] if argv is None else argv
    print(
        f"kgrad {kgrad.__version__} (keras {keras.__version__}, backend {keras.backend.backend()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
