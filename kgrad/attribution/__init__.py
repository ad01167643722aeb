"""Attribution: relevance maps of Keras models with Captum's conventions, on every backend.

- :func:`saliency`: ``|∂ out[target] / ∂x|`` (Captum's ``Saliency``);
- :func:`input_x_gradient`: ``x ⊙ ∂ out[target] / ∂x``;
- :func:`integrated_gradients`: Captum's integration rules, the convergence
  delta, and a bound on the interpolated samples held at once;
- :func:`smoothgrad`: the gradient averaged over noisy copies, σ from each
  sample's range (tf-keras-vis's ``smooth_noise``);
- :func:`gradcam`: Grad-CAM, with per-sample channel weights and the
  corner-aligned resize of tf-keras-vis;
- :func:`plot`: heatmaps, over the images, one column per method.

``target`` is an int (one class for every sample), an int array ``(B,)`` (one
class per sample), a tuple index into each sample's output, or a callable
``y -> tensor`` that keeps the batch axis; ``None`` sums the whole output.
Every function also takes a dataset of batches (streamed with a progress
line, the results concatenated) and returns the backend's tensors.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> module; imported on first use, as kgrad's own names are.
_EXPORTS = {
    "saliency": "kgrad.attribution._gradients",
    "input_x_gradient": "kgrad.attribution._gradients",
    "integrated_gradients": "kgrad.attribution._integrated",
    "smoothgrad": "kgrad.attribution._gradients",
    "gradcam": "kgrad.attribution._gradcam",
    "plot": "kgrad.attribution._plot",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kgrad.attribution' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
