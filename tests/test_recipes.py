"""Every recipe YAML runs ``lightning-sgd fit --config ... --trainer.fast_dev_run=true`` on tiny generated data in
the exact distribution formats, with its plugins and callbacks on; networks match the sources' parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_sgd.cli import run
from lightning_sgd.data import synthetic
from lightning_sgd.recipes import (
    LSTMLM,
    VGG11,
    CifarResNet,
    FCAutoencoder,
    ResNet50,
    SimpleCNN,
    TransformerLM,
    WideResNet,
)

REPO = Path(__file__).resolve().parents[1]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


# ---------------------------------------------------------------------------------------------- parameter counts
def test_networks_match_the_sources_sizes():
    # ResNet32: He et al. (2016) Table 6 lists 0.46M; 31 convolutions + 1 linear layer (Zhang et al. App. F.2)
    resnet32 = CifarResNet(depth=32)
    assert n_params(resnet32) == 464_154 and n_convs(resnet32) == 31
    # ResNet8 (Shallue et al.): 7 convolutions + 1 linear layer, no batch norm
    resnet8 = CifarResNet(depth=8, batch_norm=False)
    assert n_convs(resnet8) == 7 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet8.modules())
    # VGG11: 8 convolutions + 1 linear layer (Zhang et al. App. F.2)
    vgg = VGG11()
    assert n_convs(vgg) == 8 and sum(isinstance(m, torch.nn.Linear) for m in vgg.modules()) == 1
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # WRN-16-4: 2.7M in Zagoruyko & Komodakis (2016) Table 1
    assert round(n_params(WideResNet(16, 4)) / 1e6, 1) == 2.7
    # ResNet-50: 25,557,032 (the reference implementation's count, "25.6M" in He et al.)
    resnet50 = ResNet50()
    assert n_params(resnet50) == 25_557_032 and n_convs(resnet50) == 53
    # Simple CNN "base": 5x5 convs with 32 and 64 filters, FC 1024: 832 + 51,264 + 3,212,288 + 10,250
    assert n_params(SimpleCNN()) == 3_274_634
    # FC auto-encoder 784-1000-500-250-30 and its mirror
    assert n_params(FCAutoencoder()) == 2 * (784 * 1000 + 1000 * 500 + 500 * 250 + 250 * 30) + (
        1000 + 500 + 250 + 30) + (250 + 500 + 1000 + 784)
    # Transformer Shallow: tied 32k x 512 embedding + 2 blocks of (4 d^2 + 2 d d_ff + biases + 2 LayerNorms)
    d, ff = 512, 2048
    block = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d
    assert n_params(TransformerLM()) == 32768 * d + 2 * block
    # Zaremba et al.'s small LSTM: embedding, 2 LSTM layers of 200, softmax over 10k words
    h, v = 200, 10000
    assert n_params(LSTMLM()) == v * h + 2 * (4 * (2 * h * h + 2 * h)) + h * v + v


def test_networks_forward_shapes():
    assert SimpleCNN()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for net in (CifarResNet(depth=8, batch_norm=False), WideResNet(10, 1, batch_norm=False)):
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert ResNet50(num_classes=7, layers=(1, 1, 1, 1))(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert TransformerLM(vocab_size=50, d_model=16, num_heads=2, d_ff=32)(torch.randint(0, 50, (3, 9))).shape == (
        3, 9, 50)
    assert LSTMLM(vocab_size=50, hidden=8)(torch.randint(0, 50, (3, 9))).shape == (3, 9, 50)
    assert FCAutoencoder()(torch.rand(2, 1, 28, 28)).shape == (2, 784)


def test_transformer_is_causal():
    torch.manual_seed(0)
    net = TransformerLM(vocab_size=30, d_model=16, num_heads=2, d_ff=32, dropout=0.0).eval()
    tokens = torch.randint(0, 30, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (tokens[0, 8] + 1) % 30
    a, b = net(tokens), net(changed)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-5) and not torch.allclose(a[0, 8:], b[0, 8:])


def test_skipinit_blocks_start_as_identity_maps():
    torch.manual_seed(0)
    net = WideResNet(10, 1, batch_norm=False)
    block = net.blocks[0]  # 16 -> 16 channels, identity shortcut
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), x)


# ------------------------------------------------------------------------------------------- YAML fast_dev_run
def _data_root(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / kind
    if kind in ("mnist", "fashion_mnist"):
        synthetic.write_mnist(root, num_train=96, num_test=32)
    elif kind == "cifar10":
        synthetic.write_cifar10(root, per_batch=16)  # 80 training images
    elif kind == "ptb":
        synthetic.write_ptb(root, sentences=60)
    elif kind == "lm1b":
        synthetic.write_lm1b(root, sentences=60)
    elif kind == "imagenet":
        synthetic.write_imagenet(root, classes=2, per_class=4)
    return root


#: big networks: GradientNoiseScale is built and set up but first measures at step 5 (the test runs 1 step);
#: its measurement is exercised on the other recipes, with and without (ghost) batch norm
NO_GNS_MEASUREMENT = {"resnet50_imagenet", "vgg11_cifar10", "wrn16_4_cifar10", "wrn16_4_skipinit_cifar10", "lstm_ptb"}


def _shrink(config: dict[str, Any], data: dict[str, Any], ghost: int | None = None,
            network: dict[str, Any] | None = None, measure_gns: bool = True) -> dict[str, Any]:
    """The recipe's config with smaller sizes only: data sizes, ghost batch, network dims (every class stays)."""
    config["data"]["init_args"].update(data)
    if network:
        config["model"]["init_args"]["network"]["init_args"].update(network)
    for callback in config["trainer"].get("callbacks", []):
        if ghost is not None and callback["class_path"].endswith("GhostBatchNormCallback"):
            callback["init_args"]["ghost_batch_size"] = ghost
        if callback["class_path"].endswith("GradientNoiseScale") and not measure_gns:
            callback["init_args"]["schedule"] = {"class_path": "lightning_sgd.schedules.EveryNSteps",
                                                 "init_args": {"interval": 1000, "offset": 5}}
        if callback["class_path"].endswith("CurvatureSpectrum"):  # a few matvecs, once
            callback["init_args"].update(probe_batch_size=8, k=1, lanczos_iterations=3, trace_matvecs=0,
                                         at_fit_end=False)
    config["trainer"]["accelerator"] = "cpu"
    config["trainer"]["devices"] = 1
    config["trainer"].pop("precision", None)  # bf16 autocast on CPU is slow and not what is tested here
    return config


#: recipe -> (data set, data overrides, ghost batch override, network overrides)
RECIPES: dict[str, tuple[str, dict[str, Any], int | None, dict[str, Any] | None]] = {
    "simple_cnn_mnist": ("mnist", {"batch_size": 32, "num_val": 32, "eval_batch_size": 32}, None, None),
    "simple_cnn_fashion_mnist": ("fashion_mnist", {"batch_size": 32, "num_val": 32, "eval_batch_size": 32}, None,
                                 None),
    "simple_cnn_mnist_kfac": ("mnist", {"batch_size": 16, "num_val": 32, "eval_batch_size": 32}, None, None),
    "resnet8_cifar10": ("cifar10", {"batch_size": 32, "num_val": 16, "eval_batch_size": 16}, None, None),
    "resnet32_cifar10": ("cifar10", {"batch_size": 16, "num_val": 16, "eval_batch_size": 8}, 8, None),
    "vgg11_cifar10": ("cifar10", {"batch_size": 16, "num_val": 16, "eval_batch_size": 8}, 8, None),
    "wrn16_4_cifar10": ("cifar10", {"batch_size": 8, "num_val": 16, "eval_batch_size": 8}, 4, None),
    "wrn16_4_skipinit_cifar10": ("cifar10", {"batch_size": 8, "num_val": 16, "eval_batch_size": 8}, None, None),
    "autoencoder_mnist": ("mnist", {"batch_size": 32, "num_val": 32, "eval_batch_size": 32}, None, None),
    "lstm_ptb": ("ptb", {"batch_size": 8, "eval_batch_size": 8}, None, None),
    "transformer_lm1b": ("lm1b", {"batch_size": 4, "eval_batch_size": 4, "seq_len": 16, "num_workers": 0,
                                  "vocab_size": 500, "vocab_shards": 1}, None, {"vocab_size": 500}),
    "resnet50_imagenet": ("imagenet", {"batch_size": 8, "eval_batch_size": 2, "image_size": 32, "num_workers": 0},
                          2, {"num_classes": 2}),
}


def test_every_yaml_has_a_test():
    # mnist1d*: tests/test_foundation.py and test_deep_bootstrap.py; *_sweep: `lightning-sgd sweep` configs, not
    # LightningCLI ones (tests/test_sweep.py)
    mine = {p.stem for p in (REPO / "recipes").glob("*.yaml")
            if not p.stem.startswith("mnist1d") and not p.stem.endswith("_sweep")}
    assert mine == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_yaml_runs_fast_dev_run(name, tmp_path):
    if name.endswith("_kfac"):
        pytest.importorskip("asdl", reason="K-FAC recipes need ASDL: pip install asdfghjkl")
    kind, data, ghost, network = RECIPES[name]
    config = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    data = {**data, "root": str(_data_root(tmp_path, kind))}
    if "cache_dir" in config["data"]["init_args"]:
        data["cache_dir"] = str(tmp_path / "cache")
    if name == "resnet50_imagenet":
        config["model"]["init_args"]["num_classes"] = 2
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_shrink(config, data, ghost, network, name not in NO_GNS_MEASUREMENT)))
    cli = run(["fit", "--config", str(path), "--trainer.fast_dev_run=true"])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 1
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    classes = {type(c).__name__ for c in trainer.callbacks}
    for callback in config["trainer"].get("callbacks", []):
        assert callback["class_path"].rsplit(".", 1)[1] in classes
    for callback in trainer.callbacks:
        if type(callback).__name__ == "GradientNoiseScale" and name not in NO_GNS_MEASUREMENT:
            assert callback.measured == 1 and "gns/trace_cov" in callback.last_metrics
        if type(callback).__name__ == "CurvatureSpectrum":
            assert callback.last_result is not None
    if ghost is not None:
        ghost_layers = [m for m in module.modules() if type(m).__name__ == "GhostBatchNorm"]
        assert ghost_layers and all(m.ghost_batch_size == ghost for m in ghost_layers)
    if "ChannelWeightNorm" in classes:  # the projection ran after the optimizer step: unit channel norms
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                norms = m.weight.detach().flatten(1).norm(dim=1)
                assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
