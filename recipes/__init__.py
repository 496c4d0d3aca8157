"""Benchmark recipes (installed as ``lightning_sgd.recipes``): LightningModules, DataModules, networks, YAML configs.

Run one with ``lightning-sgd fit --config recipes/<name>.yaml``; the README section "Benchmark recipes" lists them all.
"""

from lightning_sgd._lazy import lazy_exports

_EXPORTS = {
    # foundation: MNIST-1D and the classification module
    "ClassificationModule": "classification",
    "MNIST1DDataModule": "mnist_1d",
    "MNIST1DCNN": "mnist_1d",
    "MNIST1DMLP": "mnist_1d",
    # modules for language models and the auto-encoder
    "LanguageModelModule": "modules",
    "AutoencoderModule": "modules",
    "KFACClassificationModule": "kfac",
    # networks
    "SimpleCNN": "vision",
    "CifarResNet": "vision",
    "VGG11": "vision",
    "WideResNet": "vision",
    "ResNet50": "vision",
    "TransformerLM": "language",
    "LSTMLM": "language",
    "FCAutoencoder": "autoencoder",
    # data
    "MNISTDataModule": "datamodules",
    "FashionMNISTDataModule": "datamodules",
    "CIFAR10DataModule": "datamodules",
    "PTBDataModule": "datamodules",
    "LM1BDataModule": "datamodules",
    "ImageNetDataModule": "datamodules",
    "TensorBatchDataset": "datamodules",
    "tensor_dataloader": "datamodules",
    "random_crop_flip": "datamodules",
    # training details of the sources
    "ChannelWeightNorm": "weight_norm",
    "ConstantLR": "lr_schedules",
    "LinearDecayLR": "lr_schedules",
    "StepDecayLR": "lr_schedules",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
