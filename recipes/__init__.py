"""Benchmark recipes (installed as ``lightning_sgd.recipes``): LightningModules, DataModules, networks, YAML configs.

Run one with ``lightning-sgd fit --config recipes/<name>.yaml``.
"""

from lightning_sgd._lazy import lazy_exports

_EXPORTS = {
    "ClassificationModule": "classification",
    "MNIST1DDataModule": "mnist1d",
    "MNIST1DCNN": "mnist1d",
    "MNIST1DMLP": "mnist1d",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
