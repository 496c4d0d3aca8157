"""lightning-sgd: measure and act on gradient noise, curvature and batch size in PyTorch Lightning.

Subpackages: ``lightning_sgd.callbacks`` (measurement callbacks), ``lightning_sgd.plugins`` (training plugins),
``lightning_sgd.recipes`` (benchmark LightningModules/DataModules and YAML configs), ``lightning_sgd.nqm`` (the
noisy quadratic model) and ``lightning_sgd.sweep`` (batch-size sweeps).
"""

__version__ = "0.1.0"
