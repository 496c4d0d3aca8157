"""Recipe building blocks against brute force: LR schedules, channel weight normalization, on-device augmentation
and batching, the LM / auto-encoder losses, and optimizer choice from the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from lightning_sgd.cli import run
from lightning_sgd.data import synthetic
from lightning_sgd.protocols import require_supervised
from lightning_sgd.recipes import (
    AutoencoderModule,
    ChannelWeightNorm,
    LanguageModelModule,
    LinearDecayLR,
    StepDecayLR,
    TransformerLM,
    random_crop_flip,
    tensor_dataloader,
)
from tests.helpers import TinyDataModule, fast_trainer_kwargs

REPO = Path(__file__).resolve().parents[1]


def _lrs(scheduler_cls, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = scheduler_cls(optimizer, **kwargs)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


# ------------------------------------------------------------------------------------------------- LR schedules
def test_linear_decay_matches_the_formula_and_holds_after_T():
    alpha0, gamma, T = 2.0, 0.1, 10
    lrs = _lrs(LinearDecayLR, 15, decay_steps=T, final_fraction=gamma)
    expected = [alpha0 - (1 - gamma) * alpha0 * min(t, T) / T for t in range(15)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[T:] == pytest.approx([gamma * alpha0] * 5)


def test_step_decay_and_smith_milestones():
    lrs = _lrs(StepDecayLR, 8, milestones=[2, 5], gamma=0.5)
    assert lrs == pytest.approx([2, 2, 1, 1, 1, 0.5, 0.5, 0.5])
    milestones = StepDecayLR.smith_et_al_milestones(200)
    assert milestones == [100, 110, 120, 130, 140, 150, 160, 170, 180, 190]
    with pytest.raises(ValueError, match="increasing"):
        _lrs(StepDecayLR, 1, milestones=[5, 2])
    with pytest.raises(ValueError, match="final_fraction"):
        _lrs(LinearDecayLR, 1, decay_steps=3, final_fraction=1.5)


# ------------------------------------------------------------------------------------ channel weight normalization
class _ConvBN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
        self.net(torch.zeros(2, 2, 5, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.view(-1, 2, 5, 5)[..., :5, :5]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def test_channel_weight_norm_holds_after_every_step_and_keeps_bn_outputs():
    torch.manual_seed(0)
    module = _ConvBN()
    conv, bn = module.net[0], module.net[1]
    x = torch.randn(8, 2, 5, 5)
    norms_seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            norms_seen.append(conv.weight.detach().flatten(1).norm(dim=1).clone())

    dm = TinyDataModule(n=64, features=50, classes=3, batch_size=16)
    weights_at_start = conv.weight.detach().clone()
    weight_norm = ChannelWeightNorm()
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=4, callbacks=[weight_norm, Spy()]))
    trainer.fit(module, datamodule=dm)
    assert not weight_norm._handles  # the optimizer hook is removed when fit ends
    assert len(norms_seen) == 4
    for norms in norms_seen:
        assert torch.allclose(norms, torch.ones(4), atol=1e-6)
    # the projection does not change what the network computes after training-mode BN (scale invariance)
    projected = weights_at_start / weights_at_start.flatten(1).norm(dim=1)[:, None, None, None]
    after = F.batch_norm(F.conv2d(x, projected), None, None, bn.weight.new_ones(4), bn.bias.new_zeros(4),
                         training=True, eps=bn.eps)
    reference = F.batch_norm(F.conv2d(x, weights_at_start), None, None, bn.weight.new_ones(4),
                             bn.bias.new_zeros(4), training=True, eps=bn.eps)
    assert torch.allclose(after, reference, atol=1e-4)


# ------------------------------------------------------------------------------------ on-device augmentation
def test_random_crop_flip_is_a_window_of_the_padded_image_or_its_mirror():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(1))
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(16):  # brute force: search every offset and both orientations
        matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, i
    assert any(not torch.equal(out[i], images[i]) for i in range(16))
    no_aug = random_crop_flip(images, padding=0, flip=False)
    assert torch.equal(no_aug, images)


def test_tensor_dataloader_fetches_whole_batches_and_stays_a_dataloader():
    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    calls = []

    def transform(batch, generator):
        calls.append(generator is not None)
        return batch[0] * 10, batch[1]

    loader = tensor_dataloader((x, y), batch_size=4, shuffle=True, transform=transform, seed=3)
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 5  # drop_last: 23 // 4
    epoch0 = [b for b in loader]
    seen = torch.cat([b[1] for b in epoch0])
    assert len(set(seen.tolist())) == 20 and all(torch.equal(b[0][:, 0], b[1] * 10.0) for b in epoch0)
    assert not torch.equal(seen, torch.cat([b[1] for b in loader]))  # reshuffled next epoch
    assert all(calls)  # training batches get the augmentation generator
    # the per-example path (tools that collate their own probe batches) gives the same batch
    dataset = loader.dataset
    manual = loader.collate_fn([dataset[i] for i in (3, 7)])
    fetched = loader.collate_fn(dataset.__getitems__([3, 7]))
    assert torch.equal(manual[0], fetched[0]) and torch.equal(manual[1], torch.tensor([3, 7]))
    evaluation = tensor_dataloader((x, y), batch_size=10, shuffle=False, transform=transform)
    assert torch.equal(torch.cat([b[1] for b in evaluation]), y) and len(evaluation) == 3


# --------------------------------------------------------------------------------------------- module losses
def test_language_model_loss_is_the_mean_token_cross_entropy_and_per_example():
    module = LanguageModelModule(TransformerLM(vocab_size=20, d_model=8, num_heads=2, d_ff=16, dropout=0.0))
    require_supervised(module, "test")
    logits, targets = torch.randn(3, 5, 20), torch.randint(0, 20, (3, 5))
    expected = F.cross_entropy(logits.reshape(15, 20), targets.reshape(15))
    assert torch.allclose(module.loss(logits, targets), expected)
    per_example = torch.stack([module.loss(logits[i : i + 1], targets[i : i + 1]) for i in range(3)])
    assert torch.allclose(per_example.mean(), expected)


def test_autoencoder_targets_are_the_flattened_inputs():
    from lightning_sgd.recipes import FCAutoencoder

    module = AutoencoderModule(FCAutoencoder((16, 8, 4)), reconstruction="bce")
    x = torch.rand(3, 1, 4, 4)
    inputs, targets = module.split_batch((x, torch.zeros(3)))
    assert torch.equal(targets, x.flatten(1))
    out = module(inputs)
    expected = F.binary_cross_entropy_with_logits(out, targets, reduction="sum") / 3
    assert torch.allclose(module.loss(out, targets), expected)
    with pytest.raises(ValueError, match="reconstruction"):
        AutoencoderModule(FCAutoencoder(), reconstruction="l1")


def test_vocab_mismatch_is_reported(tmp_path):
    synthetic.write_ptb(tmp_path / "ptb", sentences=20)
    with pytest.raises(ValueError, match="vocab_size >= "):
        run(["fit", "--config", str(REPO / "recipes" / "lstm_ptb.yaml"), "--trainer.fast_dev_run=true",
             f"--data.init_args.root={tmp_path / 'ptb'}", "--model.init_args.network.init_args.vocab_size=5",
             "--trainer.accelerator=cpu"])


# ------------------------------------------------------------------------------------- optimizers from YAML
@pytest.mark.parametrize("overrides, check", [
    (["--model.init_args.optimizer.init_args.nesterov=true"],
     lambda opt: isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9),
    (["--model.init_args.optimizer=torch.optim.Adam", "--model.init_args.optimizer.init_args.betas=[0.0,0.999]",
      "--model.init_args.optimizer.init_args.lr=0.001"],
     lambda opt: isinstance(opt, torch.optim.Adam) and tuple(opt.defaults["betas"]) == (0.0, 0.999)),
])
def test_optimizer_is_chosen_from_the_command_line(overrides, check, tmp_path):
    synthetic.write_mnist(tmp_path / "mnist", num_train=48, num_test=16)
    cli = run(["fit", "--config", str(REPO / "recipes" / "simple_cnn_mnist.yaml"), "--trainer.fast_dev_run=true",
               "--trainer.accelerator=cpu", f"--data.init_args.root={tmp_path / 'mnist'}",
               "--data.init_args.num_val=16", "--data.init_args.batch_size=16", *overrides])
    assert check(cli.trainer.optimizers[0]) and cli.trainer.global_step == 1


# ---------------------------------------------------------------------------------------------------------- K-FAC
def test_kfac_step_is_invariant_to_rescaling_the_inputs():
    """K-FAC's defining property: for a linear layer, rescaling the input features by D (and the weights by D^-1)
    leaves the function after a K-FAC step unchanged, because the input factor A becomes D A D. Plain SGD is not
    invariant. Damping 1e-8 is tiny next to A's eigenvalues (~1); what is left is float32 round-off amplified by
    the (singular: softmax) output factor's inverse, measured at ~0.1% of the outputs, so we allow 1%."""
    pytest.importorskip("asdl")
    from lightning_sgd.recipes.kfac import KFACClassificationModule

    scale = torch.linspace(0.5, 3.0, 25)

    class ScaledData(TinyDataModule):
        def __init__(self, factor: torch.Tensor) -> None:
            super().__init__(n=256, features=25, classes=3, batch_size=256)
            self.x = self.x * factor

    def one_step(factor: torch.Tensor, kfac: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(25, 3, bias=False))  # ASDL needs a named sub-module
        with torch.no_grad():
            net[0].weight /= factor  # same function on the rescaled inputs
        optimizer = lambda params: torch.optim.SGD(params, lr=0.5)
        if kfac:
            module = KFACClassificationModule(net, num_classes=3, optimizer=optimizer, damping=1e-8, ema_decay=-1,
                                              fisher_type="fisher_emp")
        else:
            from lightning_sgd.recipes import ClassificationModule

            module = ClassificationModule(net, num_classes=3, optimizer=optimizer)
        data = ScaledData(factor)
        pl.Trainer(**fast_trainer_kwargs(max_steps=1)).fit(module, datamodule=data)
        return net(data.x).detach()

    ones = torch.ones(25)
    reference = one_step(ones, kfac=True)
    kfac_gap = float((reference - one_step(scale, kfac=True)).abs().max())
    sgd_gap = float((one_step(ones, kfac=False) - one_step(scale, kfac=False)).abs().max())
    assert kfac_gap < 0.01 * float(reference.abs().max())
    assert kfac_gap < 0.05 * sgd_gap
