"""kgrad's tooling: the command line, cross-backend comparison, the zoo, benchmarks.

Nothing in kgrad's derivative core imports this package; it is built on the
public API (``kgrad.grad``, ``kgrad.jacobian``, ...).
"""
