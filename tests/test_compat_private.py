"""Every access to Lightning's private API goes through ``lightning_sgd.compat``; these tests pin what each accessor
relies on against the installed Lightning, in both packages, so a release that moves one fails here by name
(``make test-newest-lightning`` runs them against the newest Lightning on the package index)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgd import compat
from lightning_sgd.compat import PACKAGES, import_from

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(package):
    class Tiny(package.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(3, 1)
            self.seen: dict[str, object] = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault("fx", compat.current_fx_name(self))
            trainer = self.trainer
            self.seen.setdefault("loaders", compat.train_dataloaders(trainer))
            self.seen.setdefault("fetcher_length", compat.train_fetcher(trainer).length)
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_fit_loop_accessors_see_the_running_fit(package, tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(12, 3), torch.randn(12, 1)), batch_size=4)
    model = _module(package)
    assert compat.current_fx_name(model) is None
    trainer = package.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                              enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert model.seen["fx"] == "training_step"
    loaders = model.seen["loaders"]
    assert len(loaders) == 1 and isinstance(loaders[0], DataLoader) and len(loaders[0]) == 3
    assert model.seen["fetcher_length"] == 3
    compat.set_current_fx_name(model, "validation_step")
    assert compat.current_fx_name(model) == "validation_step"
    plain = nn.Linear(1, 1)
    compat.set_current_fx_name(plain, "x")  # not a LightningModule: left alone
    assert not hasattr(plain, "_current_fx_name")


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_ddp_strategy_accessors(package):
    strategy_cls = import_from(package, "strategies.DDPStrategy")
    strategy = strategy_cls(gradient_as_bucket_view=True, ddp_comm_hook=default_hooks.allreduce_hook)
    assert compat.ddp_kwargs(strategy) == {"gradient_as_bucket_view": True}
    hook, state, wrapper = compat.ddp_comm_settings(strategy)
    assert hook is default_hooks.allreduce_hook and state is None and wrapper is None
    assert callable(getattr(strategy_cls, compat.DDP_REGISTER_HOOKS))
    assert compat.ddp_kwargs(import_from(package, "strategies.SingleDeviceStrategy")("cpu")) == {}
