"""Measurement callbacks for any Lightning ``Trainer`` (installed as ``lightning_sgd.callbacks``).

- :class:`GradientNoiseScale`: B_simple, B_noise and the critical batch size (McCandlish et al. 2018).
- :class:`GradientDiversity`: Yin et al.'s gradient diversity and the batch-size bound it implies.
- :class:`CurvatureSpectrum`: Hessian / GGN / Fisher eigenvalues, traces and densities.
- :class:`DeepBootstrap`: the gap between a finite-data model and its fresh-data twin (Nakkiran et al. 2021).
"""

from lightning_sgd._lazy import lazy_exports

_EXPORTS = {
    "GradientNoiseScale": "gradient_noise_scale",
    "GradientDiversity": "gradient_diversity",
    "CurvatureSpectrum": "curvature_spectrum",
    "DeepBootstrap": "deep_bootstrap",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
