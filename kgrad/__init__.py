"""kgrad: gradients, Jacobians and Hessians of Keras 3 models on every backend.

The transforms live in :mod:`kgrad.func`; the model-level API is added on top.
Names are imported on first use (PEP 562), so ``import kgrad`` alone (and the
command line's ``--help``) imports neither Keras nor a framework.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, attribute); attribute None means the module itself.
_EXPORTS = {
    "func": ("kgrad.func", None),
    "callbacks": ("kgrad.callbacks", None),
    "attribution": ("kgrad.attribution", None),
    "grad": ("kgrad.api", "grad"),
    "value_and_grad": ("kgrad.api", "value_and_grad"),
    "jacobian": ("kgrad.api", "jacobian"),
    "hessian": ("kgrad.api", "hessian"),
    "hvp": ("kgrad.api", "hvp"),
    "layer_grad": ("kgrad.api", "layer_grad"),
    "per_sample_grad": ("kgrad._per_sample", "per_sample_grad"),
    "per_sample_grad_norm": ("kgrad._per_sample", "per_sample_grad_norm"),
    "hessian_eigenvalues": ("kgrad._curvature", "hessian_eigenvalues"),
    "hessian_trace": ("kgrad._curvature", "hessian_trace"),
    "LayerGrad": ("kgrad.api", "LayerGrad"),
    "partial": ("kgrad._operators", "partial"),
    "laplacian": ("kgrad._operators", "laplacian"),
    "divergence": ("kgrad._operators", "divergence"),
    "taylor": ("kgrad._operators", "taylor"),
    "check_grad": ("kgrad.check", "check_grad"),
    "GradCheck": ("kgrad.check", "GradCheck"),
    "grad_report": ("kgrad.report", "grad_report"),
    "GradReport": ("kgrad.report", "GradReport"),
    "LayerStats": ("kgrad.report", "LayerStats"),
    "set_memory_budget": ("kgrad._memory", "set_memory_budget"),
    "get_memory_budget": ("kgrad._memory", "get_memory_budget"),
    "set_jit_compile": ("kgrad._compiled", "set_jit_compile"),
    "get_jit_compile": ("kgrad._compiled", "get_jit_compile"),
    "clear_cache": ("kgrad._compiled", "clear_cache"),
    "differentiable": ("kgrad._recording", "differentiable"),
    "SUPPORTED_BACKENDS": ("kgrad.backends", "SUPPORTED"),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kgrad' has no attribute {name!r}")
    module_name, attribute = _EXPORTS[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
