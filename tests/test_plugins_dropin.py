"""EMAWeights, DeepBootstrap and AdaptiveBatchSize on LightningModules written the way their authors write them.

The modules have ``training_step`` and ``configure_optimizers`` (and ``validation_step`` where validation is
needed), nothing else: the Lightning README's ``LitAutoEncoder``, a HuggingFace-style module with dict batches whose
``training_step`` returns ``{"loss": ...}``, and a CNN with two BatchNorm layers. Each test runs under
``pytorch_lightning.Trainer`` and ``lightning.Trainer``, the module subclassing the matching package's
LightningModule. Ground truth is loss code written out by hand (not the modules' ``training_step``, not
``ModuleLoss``), ``torch.optim.swa_utils.update_bn``, and runs without the callback.
"""

from __future__ import annotations

import copy
import csv
import importlib
import math
from pathlib import Path
from typing import Any

import lightning.pytorch
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from lightning_sgd.batches import batch_size
from lightning_sgd.bootstrap import ChunkedStream
from lightning_sgd.callbacks import DeepBootstrap, GradientNoiseScale
from lightning_sgd.compat import Callback
from lightning_sgd.plugins import AdaptiveBatchSize, BatchSizeSchedule, EMAWeights
from tests.helpers import fast_trainer_kwargs

PACKAGES = {"pytorch_lightning": pytorch_lightning, "lightning": lightning.pytorch}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


# --------------------------------------------------------------------------------------------- the users' modules
def _module_classes(L: Any) -> dict[str, type]:
    """The three modules, subclassing ``L.LightningModule`` (``L`` is one of the two packages)."""

    class LitAutoEncoder(L.LightningModule):
        """The Lightning README's autoencoder (smaller hidden layer)."""

        def __init__(self, hidden: int = 16, lr: float = 1e-2) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 3))
            self.decoder = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 28 * 28))
            self.lr = lr

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = x.view(x.size(0), -1)
            z = self.encoder(x)
            x_hat = self.decoder(z)
            loss = F.mse_loss(x_hat, x)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            x = x.view(x.size(0), -1)
            self.log("val_loss", F.mse_loss(self.decoder(self.encoder(x)), x))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    class DictBatchClassifier(L.LightningModule):
        """HuggingFace style: dict batches, ``training_step`` returns ``{"loss": ..., "logits": ...}``."""

        def __init__(self, vocab: int = 20, dim: int = 8, classes: int = 3) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.head = nn.Linear(dim, classes)

        def training_step(self, batch, batch_idx):
            logits = self.head(self.embed(batch["input_ids"]).mean(1))
            loss = F.cross_entropy(logits, batch["labels"])
            self.log("train_loss", loss)
            return {"loss": loss, "logits": logits.detach()}

        def validation_step(self, batch, batch_idx):
            logits = self.head(self.embed(batch["input_ids"]).mean(1))
            self.log("val_loss", F.cross_entropy(logits, batch["labels"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class BatchNormCNN(L.LightningModule):
        """Two conv + BatchNorm blocks (the second BN's statistics depend on the first's batch statistics)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                     nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(4, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return {"autoencoder": LitAutoEncoder, "dict": DictBatchClassifier, "bn_cnn": BatchNormCNN}


def _hand_loss(kind: str, module: nn.Module, batch: Any) -> torch.Tensor:
    """Each module's training loss written out, independently of its ``training_step``."""
    if kind == "autoencoder":
        x = batch[0].flatten(1)
        return ((module.decoder(module.encoder(x)) - x) ** 2).mean()
    if kind == "dict":
        logits = module.head(module.embed(batch["input_ids"]).mean(1))
        return -logits.log_softmax(1).gather(1, batch["labels"][:, None]).mean()
    x, y = batch
    return -module.net(x).log_softmax(1).gather(1, y[:, None]).mean()


def sample(kind: str, n: int, seed: int) -> Any:
    """``n`` examples of ``kind``'s data: a tuple of tensors, or for ``"dict"`` a list of dicts."""
    g = torch.Generator().manual_seed(seed)
    if kind == "autoencoder":  # rank-3 images: an autoencoder with a 3-d code can learn them
        basis = torch.randn(3, 28 * 28, generator=torch.Generator().manual_seed(123)) / math.sqrt(3)
        x = (torch.randn(n, 3, generator=g) @ basis + 0.1 * torch.randn(n, 28 * 28, generator=g)).view(n, 1, 28, 28)
        return x, torch.zeros(n, dtype=torch.long)
    if kind == "dict":
        ids = torch.randint(0, 20, (n, 6), generator=g)
        labels = ids[:, 0] % 3
        return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()


def _dataset(data: Any) -> Any:
    return data if isinstance(data, list) else torch.utils.data.TensorDataset(*data)


def _datamodule_class(L: Any) -> type:
    class UserData(L.LightningDataModule):
        """Train (seed 1), val/test (seed 2) and, for the autoencoder, an unlimited fresh stream (``fresh_batch``)."""

        def __init__(self, kind: str = "autoencoder", n: int = 64, n_val: int = 40, batch_size: int = 16) -> None:
            super().__init__()
            self.kind, self.batch_size = kind, batch_size
            self.train_data, self.val_data = sample(kind, n, seed=1), sample(kind, n_val, seed=2)
            self.stream = ChunkedStream(lambda i: sample(kind, 256, seed=1000 + i), 256)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(_dataset(self.train_data), batch_size=self.batch_size, shuffle=False)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(_dataset(self.val_data), batch_size=16)  # 40 examples: batches of 16, 16, 8

        def test_dataloader(self) -> DataLoader:
            return self.val_dataloader()

        def fresh_batch(self, start: int, size: int):
            return self.stream.take(start, size)

    return UserData


MODULES = {name: _module_classes(package) for name, package in PACKAGES.items()}
DATA = {name: _datamodule_class(package) for name, package in PACKAGES.items()}
# Importable names for LightningCLI.
PLAutoEncoder, LAutoEncoder = MODULES["pytorch_lightning"]["autoencoder"], MODULES["lightning"]["autoencoder"]
PLData, LData = DATA["pytorch_lightning"], DATA["lightning"]


@pytest.fixture(params=list(PACKAGES))
def package(request) -> str:
    return request.param


def make(package: str, kind: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return MODULES[package][kind](**kwargs)


def fit(package: str, module: nn.Module, data: Any, callbacks=(), **overrides: Any) -> Any:
    trainer = PACKAGES[package].Trainer(**fast_trainer_kwargs(callbacks=list(callbacks), **overrides))
    trainer.fit(module, datamodule=data)
    return trainer


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Trajectory(Callback):
    """The parameters after each optimizer step (a compat.Callback, so it works under either Trainer)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = {k: p.detach().clone() for k, p in pl_module.named_parameters()}


# ------------------------------------------------------------------------------------------------------ EMAWeights
@pytest.mark.parametrize("kind", ["autoencoder", "dict", "bn_cnn"])
def test_ema_default_averages_the_trajectory(package, kind):
    """Default validate='ema' on each module: the weights fit leaves are the hand EMA (decay 0.5 from a copy) of
    the recorded trajectory; float32 lerp vs float64 recursion: atol 1e-6."""
    ema, trajectory = EMAWeights(decay=0.5), Trajectory()
    module = make(package, kind)
    fit(package, module, DATA[package](kind), [ema, trajectory], max_steps=3)
    assert ema.num_updates == 3
    for name, param in module.named_parameters():
        expected = trajectory.steps[1][name].double()
        for step in (2, 3):
            expected = 0.5 * expected + 0.5 * trajectory.steps[step][name].double()
        torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["autoencoder", "dict"])
def test_validate_both_logs_the_training_loss_of_the_ema_weights(package, kind):
    """val_ema/loss is the size-weighted mean over the validation batches (16, 16, 8) of the hand-written training
    loss of a fresh module loaded with the EMA state, in eval mode; no val_ema/acc without the protocol. The raw
    val_loss the module logs itself is that of the raw weights. Same float32 ops in another order: rel 1e-5."""
    ema = EMAWeights(decay=0.5, validate="both")
    module = make(package, kind)
    data = DATA[package](kind)
    trainer = fit(package, module, data, [ema], max_steps=3, val_check_interval=3, limit_val_batches=1.0)
    metrics = trainer.callback_metrics
    assert "val_ema/loss" in metrics and "val_ema/acc" not in metrics

    def mean_loss(model_state):
        fresh = make(package, kind, seed=5)
        fresh.load_state_dict(model_state)
        fresh.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in data.val_dataloader():
                n = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["labels"])
                total, count = total + float(_hand_loss(kind, fresh, batch)) * n, count + n
        assert count == 40
        return total / count

    assert float(metrics["val_ema/loss"]) == pytest.approx(mean_loss(ema.ema_module.state_dict()), rel=1e-5)
    assert float(metrics["val_loss"]) == pytest.approx(mean_loss(ema.raw_state_dict()), rel=1e-5)
    assert float(metrics["val_ema/loss"]) != pytest.approx(float(metrics["val_loss"]), rel=1e-3)


def test_bn_recalibration_equals_update_bn_and_leaves_training_alone(package):
    """bn_buffers='recalibrate' on the BatchNorm CNN (recalibrated at the validation of step 2 and at the end):
    the EMA copy's running statistics equal torch's update_bn on the first two training batches (float32, same
    formula: rtol 1e-5), and the raw run (weights and BN statistics) is bit-identical to a run without EMAWeights."""
    data = DATA[package]("bn_cnn")
    plain = make(package, "bn_cnn")
    kwargs = dict(max_steps=4, val_check_interval=2, limit_val_batches=1)
    fit(package, plain, data, **kwargs)
    ema = EMAWeights(decay=0.5, bn_buffers="recalibrate", recalibrate_batches=2)
    module = make(package, "bn_cnn")
    fit(package, module, data, [ema], **kwargs)
    raw = ema.raw_state_dict()
    assert raw is not None and all(torch.equal(raw[k], v) for k, v in state(plain).items())
    reference = copy.deepcopy(module.net)  # fit leaves the EMA weights (and recalibrated statistics) in the module
    x = data.train_data[0]
    update_bn([x[:16], x[16:32]], reference)
    for ours, theirs in zip(module.net.modules(), reference.modules()):
        if isinstance(ours, nn.BatchNorm2d):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
            assert not torch.allclose(ours.running_mean, raw[f"net.{_index(module.net, ours)}.running_mean"])


def _index(seq: nn.Sequential, layer: nn.Module) -> int:
    return next(i for i, m in enumerate(seq) if m is layer)


def test_ema_from_lightning_cli_yaml(package, tmp_path):
    """EMAWeights named by class_path in a LightningCLI YAML, for that package's LightningCLI and Trainer."""
    cli_class = importlib.import_module(f"{PACKAGES[package].__name__}.cli").LightningCLI
    model, data = (PLAutoEncoder, PLData) if package == "pytorch_lightning" else (LAutoEncoder, LData)
    config = {"trainer": {**fast_trainer_kwargs(max_steps=3, val_check_interval=3, limit_val_batches=1),
                          "callbacks": [{"class_path": "lightning_sgd.plugins.EMAWeights",
                                         "init_args": {"half_life_samples": 32, "validate": "both"}}]}}
    path = tmp_path / "ema.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_class(model, data, args=["fit", "--config", str(path)], save_config_callback=None)
    ema = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EMAWeights))
    assert isinstance(cli.trainer, PACKAGES[package].Trainer) and ema.num_updates == 3
    assert ema.last_decay == pytest.approx(0.5 ** (16 / 32))
    assert {"val_loss", "val_ema/loss"} <= set(cli.trainer.callback_metrics)


# ---------------------------------------------------------------------------------------------------- DeepBootstrap
def _train_losses(log_dir: str) -> list[tuple[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return [(row["step"], row["train_loss"]) for row in csv.DictReader(f) if row.get("train_loss")]


def test_deep_bootstrap_on_the_readme_autoencoder(package, tmp_path):
    """The twin trains with the autoencoder's own training_step on fresh rank-3 images; the real run (weights and
    every logged train_loss) is bit-identical to a run without the callback; only losses are logged (no protocol,
    no class outputs) and the twin's test loss falls."""
    L = PACKAGES[package]
    data = DATA[package]("autoencoder", n=64, batch_size=16)
    kwargs = dict(max_steps=8, log_every_n_steps=1)
    plain = make(package, "autoencoder")
    plain_trainer = fit(package, plain, data, logger=L.loggers.CSVLogger(str(tmp_path), name="plain"), **kwargs)
    module = make(package, "autoencoder")
    cb = DeepBootstrap(schedule=4, plot=True)
    trainer = fit(package, module, data, [cb], logger=L.loggers.CSVLogger(str(tmp_path), name="boot"), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(state(module).values(), state(plain).values()))
    losses = _train_losses(trainer.logger.log_dir)
    assert len(losses) == 8 and losses == _train_losses(plain_trainer.logger.log_dir)
    assert cb.twin_steps == 8 and not torch.equal(cb.twin.decoder[2].weight, module.decoder[2].weight)
    assert [h["step"] for h in cb.history] == [0, 4, 8]
    first, last = cb.history[0], cb.history[-1]
    assert not any("error" in key for h in cb.history for key in h)
    assert first["bootstrap/ideal_test_loss"] == first["bootstrap/real_test_loss"]  # the common initial point
    assert math.isfinite(last["bootstrap/ideal_online_loss"])
    assert last["bootstrap/ideal_test_loss"] < first["bootstrap/ideal_test_loss"]
    assert last["bootstrap/gap"] == last["bootstrap/loss_gap"]
    assert cb.plot_path is not None and Path(cb.plot_path).parent == Path(trainer.logger.log_dir)


# ------------------------------------------------------------------------------------------- batch-size control
class BatchesSeen(Callback):
    """The size of every batch the module gets, and the noise scale the controller read after each step."""

    def __init__(self, gns: Any = None) -> None:
        self.gns, self.sizes, self.b_simple = gns, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(batch_size(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.gns is not None:
            self.b_simple[trainer.global_step] = self.gns.b_simple


def test_batch_size_schedule_resizes_dict_batches(package):
    """Milestone at step 2 (x2) on the dict-batch module: the module gets batches of 4, 4, then 8."""
    seen = BatchesSeen()
    module = make(package, "dict")
    fit(package, module, DATA[package]("dict", n=64, batch_size=4),
        [BatchSizeSchedule([2], factors=2, interval="step"), seen], max_steps=5)
    assert seen.sizes == [4, 4, 8, 8, 8]


def test_adaptive_batch_size_with_gns_on_a_training_step_only_module(package):
    """AdaptiveBatchSize reads B_simple from GradientNoiseScale measuring the README autoencoder (no protocol).
    Ground truth: the controller's rule (hysteresis 0, one device) replayed on the B_simple values GNS held at the
    decision steps 2, 4, 6 gives the batch sizes the module actually got (a change applies to the next batch)."""
    gns = GradientNoiseScale(schedule=1, source="per_example")
    controller = AdaptiveBatchSize(max_batch_size=64, every_n_steps=2, start_step=2, hysteresis=0.0,
                                   min_measurements=2, max_growth=2.0)
    seen = BatchesSeen(gns)
    module = make(package, "autoencoder")
    fit(package, module, DATA[package]("autoencoder", n=256, batch_size=8), [gns, controller, seen], max_steps=6)
    expected, current = [], 8
    for step in range(1, 7):
        expected.append(current)  # the batch of step `step`
        b_simple = seen.b_simple[step]
        if step % 2 == 0 and math.isfinite(b_simple) and math.floor(min(64, b_simple, 2 * current)) > current:
            current = math.floor(min(64, b_simple, 2 * current))  # growth capped at max_growth per decision
    assert seen.sizes == expected and max(expected) > 8, (seen.sizes, seen.b_simple)
    assert controller.history[0]["reason"] == "start" and controller.history[-1]["global_batch_size"] == current


# ------------------------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_dropin_under_lightning_ddp(tmp_path):
    """2-process gloo DDP under lightning.Trainer, README autoencoder. DeepBootstrap: the twin's replicas agree and
    equal one process's twin at the global batch (2 x 8 consecutive fresh examples, gradients averaged = the mean
    loss of 16; float32 sums in another order, through 4 Adam steps: atol 1e-6). EMAWeights(validate='both'): each
    rank evaluates its half of the 40 validation examples (20 each) and sync_dist averages the two means, which is
    the mean of the hand loss of the EMA weights over all 40 (rel 1e-5)."""
    from tests.ddp import run_ddp

    rank0, rank1 = run_ddp("tests.ddp_entries_bootstrap:dropin_under_lightning", tmp_path, steps=4, per_rank_batch=8)
    assert rank0["twin"] == rank1["twin"] and rank0["fresh_pos"] == 4 * 16
    assert [h["step"] for h in rank0["history"]] == [0, 2, 4] and rank1["history"] == []
    lightning.pytorch.seed_everything(0)
    cb = DeepBootstrap(schedule=2, plot=False)
    fit("lightning", make("lightning", "autoencoder"), DATA["lightning"]("autoencoder", n=64, batch_size=16), [cb],
        max_steps=4)
    single = torch.cat([p.detach().flatten() for p in cb.twin.parameters()])
    torch.testing.assert_close(torch.tensor(rank0["twin"]), single, rtol=0, atol=1e-6)
    assert rank0["num_updates"] == 4 and rank0["ema_state"] == rank1["ema_state"]
    fresh = make("lightning", "autoencoder", seed=5)
    fresh.load_state_dict({k: torch.tensor(v) for k, v in rank0["ema_state"].items()})
    x = DATA["lightning"]("autoencoder").val_data[0]
    with torch.no_grad():
        expected = float(_hand_loss("autoencoder", fresh, (x,)))
    assert rank0["val_ema_loss"] == rank1["val_ema_loss"] == pytest.approx(expected, rel=1e-5)


def test_validate_both_without_a_validation_step_warns_before_training(package):
    """A module without ``validation_step`` (the Lightning README's autoencoder) never runs validation, so
    ``validate="both"`` would silently evaluate nothing: one warning at train start says so."""
    L = PACKAGES[package]

    class NoValidation(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)
    trainer = L.Trainer(**fast_trainer_kwargs(callbacks=[EMAWeights(decay=0.5, validate="both")], max_steps=2))
    with pytest.warns(UserWarning, match=r"validate='both'.*no validation.*val_ema/loss is never computed"):
        trainer.fit(NoValidation(), train_dataloaders=loader)
