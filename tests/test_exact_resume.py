"""Exact resume of the recipes' DataModules: killed at any step and resumed, a fit sees the same batches (order and
augmentation) and ends with the same weights, bit for bit, as the uninterrupted fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_sgd.compat import Callback
from lightning_sgd.data import synthetic
from lightning_sgd.recipes.datamodules import CIFAR10DataModule
from lightning_sgd.recipes.mnist_1d import MNIST1DDataModule
from lightning_sgd.resumable import EpochSampler, ResumableDataLoader

BATCHES_PER_EPOCH = 6
MAX_EPOCHS = 3  # (with max_steps, Lightning 2.6 itself replays one batch after an on_train_epoch_end checkpoint)
MAX_STEPS = MAX_EPOCHS * BATCHES_PER_EPOCH
EVERY = 4  # checkpoints at steps 4, 8, 12, 16: mid-epoch, except 12 (the last batch of epoch 1)


class LinearClassifier(pl.LightningModule):
    def __init__(self, inputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(inputs, 10)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        self.log("train_loss", loss)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class BatchRecorder(Callback):
    """Every training batch with where Lightning says it is: ``(epoch, batch_idx, global_step, x, y)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.seen.append((trainer.current_epoch, batch_idx, trainer.global_step, x.clone(), y.clone()))


def mnist1d(tmp_path: Path) -> tuple[pl.LightningDataModule, int]:
    return MNIST1DDataModule(num_train=8 * BATCHES_PER_EPOCH, num_val=8, num_test=8, batch_size=8, seed=3,
                             cache_dir=str(tmp_path / "mnist1d-cache")), 40


def cifar(tmp_path: Path) -> tuple[pl.LightningDataModule, int]:
    root = tmp_path / "cifar"
    if not root.exists():
        synthetic.write_cifar10(root, per_batch=10)  # 50 training images, 2 held out: 6 batches of 8
    return CIFAR10DataModule(root=str(root), batch_size=8, eval_batch_size=8, num_val=2, device="cpu", seed=3), 3072


DATAMODULES = {"mnist1d": mnist1d, "cifar10": cifar}


def fit(make, data_dir: Path, run_dir: Path, ckpt_path: str | None = None):
    data, inputs = make(data_dir)
    model, recorder = LinearClassifier(inputs), BatchRecorder()
    checkpoints = [
        ModelCheckpoint(dirpath=run_dir / "ckpt", filename="mid-{step}", every_n_train_steps=EVERY,
                        save_top_k=-1),
        ModelCheckpoint(dirpath=run_dir / "ckpt", filename="end-{step}", every_n_epochs=1,
                        save_on_train_epoch_end=True, save_top_k=-1),
    ]
    trainer = pl.Trainer(max_epochs=MAX_EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[recorder, *checkpoints])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    assert trainer.global_step == MAX_STEPS
    return model, recorder.seen, trainer


@pytest.fixture(scope="module", params=sorted(DATAMODULES))
def straight(request, tmp_path_factory):
    """The uninterrupted fit (which also writes the checkpoints the resumed fits start from)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    model, seen, trainer = fit(DATAMODULES[request.param], tmp_path, tmp_path)
    assert len(seen) == MAX_STEPS and trainer.num_training_batches == BATCHES_PER_EPOCH
    return request.param, tmp_path, model, seen


def assert_resume_is_exact(straight, checkpoint: str, resumed_at: int) -> None:
    name, tmp_path, model, seen = straight
    path = tmp_path / "ckpt" / checkpoint
    assert path.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    resumed, resumed_seen, _ = fit(DATAMODULES[name], tmp_path, tmp_path / f"resumed-{checkpoint}", ckpt_path=str(path))
    tail = seen[resumed_at:]
    assert [r[:3] for r in resumed_seen] == [s[:3] for s in tail]  # epoch, batch_idx, global_step line up
    for (*_, x, y), (*_, x0, y0) in zip(resumed_seen, tail):
        assert torch.equal(y, y0) and torch.equal(x, x0)  # same examples, same augmentation
    assert resumed.losses == model.losses[resumed_at:]
    for (key, p), p0 in zip(resumed.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, p0), key


@pytest.mark.parametrize("step", [BATCHES_PER_EPOCH, 2 * BATCHES_PER_EPOCH])
def test_resume_from_an_end_of_epoch_checkpoint_is_exact(straight, step):
    assert_resume_is_exact(straight, f"end-step={step}.ckpt", step)


@pytest.mark.parametrize("step", [EVERY, 2 * EVERY, 3 * EVERY, 4 * EVERY])
def test_resume_from_a_train_step_checkpoint_is_exact(straight, step):
    """Checkpoints of ``every_n_train_steps``: mid-epoch (4, 8, 16) and on the last batch of an epoch (12)."""
    checkpoint = torch.load(straight[1] / "ckpt" / f"mid-step={step}.ckpt", weights_only=False)
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    epoch, batches = divmod(step - 1, BATCHES_PER_EPOCH)
    assert loader_state == [{"epoch": epoch, "batches": batches + 1}]
    assert_resume_is_exact(straight, f"mid-step={step}.ckpt", step)


class ValidatedClassifier(LinearClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x.flatten(1)), y))


def fit_validated(data_dir: Path, run_dir: Path, ckpt_path: str | None = None):
    """The recipes' setting: ``max_steps``, validation every epoch, Lightning's default checkpoint (validation end)."""
    data, inputs = mnist1d(data_dir)
    model, recorder = ValidatedClassifier(inputs), BatchRecorder()
    trainer = pl.Trainer(max_steps=15, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[recorder, ModelCheckpoint(dirpath=run_dir, filename="{step}", save_top_k=-1)])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, recorder.seen


def test_resume_from_a_validation_end_checkpoint_with_max_steps_is_exact(tmp_path):
    """Lightning 2.6 calls ``set_epoch`` one epoch ahead after this resume; the order follows ``current_epoch``."""
    model, seen = fit_validated(tmp_path, tmp_path / "straight")
    for step in (BATCHES_PER_EPOCH, 2 * BATCHES_PER_EPOCH):
        resumed, resumed_seen = fit_validated(tmp_path, tmp_path / f"resumed-{step}",
                                              str(tmp_path / "straight" / f"step={step}.ckpt"))
        assert [r[:3] for r in resumed_seen] == [s[:3] for s in seen[step:]]
        assert all(torch.equal(r[3], s[3]) for r, s in zip(resumed_seen, seen[step:]))
        assert resumed.losses == model.losses[step:]
        assert all(torch.equal(p, p0) for p, p0 in zip(resumed.parameters(), model.parameters()))


def test_the_straight_run_reshuffles_every_epoch(straight):
    seen = straight[3]
    epochs = [torch.cat([y for e, *_, y in seen if e == epoch]) for epoch in (0, 1)]
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) and not torch.equal(epochs[0], epochs[1])


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_the_order_is_a_function_of_seed_and_epoch(name, tmp_path):
    def order(epoch: int, make=DATAMODULES[name]) -> list[torch.Tensor]:
        data, _ = make(tmp_path)
        data.setup("fit")
        loader = data.train_dataloader()
        assert isinstance(loader, ResumableDataLoader)
        loader.sampler.set_epoch(epoch)
        return [x for x, _ in loader]

    first, again, second = order(1), order(1), order(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # data order and augmentation
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_epoch_sampler_orders_shards_and_skips():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(5)
    assert list(a) != list(b)
    ranks = [EpochSampler(10, seed=1, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(4)
    shards = [list(r) for r in ranks]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))  # padded by repetition
    a.resume(4, 3)
    a.set_epoch(4)
    assert list(a) == list(b.epoch_indices(4))[3:]
    a.resume(4, 3)  # a resume for another epoch is ignored
    a.set_epoch(5)
    assert list(a) == b.epoch_indices(5)


def test_side_passes_do_not_move_the_training_pass():
    data = torch.arange(12.0)
    loader = ResumableDataLoader(data, batch_size=3, sampler=EpochSampler(12, seed=0))
    loader.sampler.set_epoch(2)
    training = iter(loader)
    first = next(training)
    assert torch.equal(next(iter(loader)), first)  # a probe drawn on the side sees the same order
    assert loader.state_dict() == {"epoch": 2, "batches": 1}
    rest = list(training)
    assert loader.state_dict() == {"epoch": 2, "batches": 4} and len(rest) == 3
    with pytest.raises(ValueError, match="'epoch' and 'batches'"):
        loader.load_state_dict({"step": 3})


def test_overfit_batches_still_trains(tmp_path):
    """Lightning rebuilds the loader around a SequentialSampler: it must stay a working (plain) loader."""
    data, inputs = mnist1d(tmp_path)
    trainer = pl.Trainer(overfit_batches=2, max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(LinearClassifier(inputs), datamodule=data)
    assert trainer.global_step == 4


def test_imagenet_crops_are_a_function_of_seed_epoch_and_index(tmp_path):
    from lightning_sgd.recipes.datamodules import EpochSeededImageFolder, ImageNetDataModule

    synthetic.write_imagenet(tmp_path, classes=2, per_class=3)
    data = ImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=2, num_workers=0, seed=1)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.dataset, EpochSeededImageFolder)
    dataset = loader.dataset
    first = dataset[(2, 4)][0]
    dataset[(0, 1)], dataset[3]  # whatever was decoded before
    assert torch.equal(dataset[(2, 4)][0], first)
    assert any(not torch.equal(dataset[(epoch, 4)][0], first) for epoch in range(3, 8))
    loader.sampler.set_epoch(2)
    assert [len(x) for x, _ in loader] == [2, 2, 2]


# ------------------------------------------------------------------------------------------------------------- DDP
def fit_cifar_ddp(outdir: Path, root: str, ckpt_path: str | None = None) -> None:
    """Entry (both ranks): CIFAR-10 with augmentation for two epochs, mid-epoch checkpoints every 3 steps; report
    the weights and every batch seen (epoch, batch_idx, step, fingerprint of the augmented images and the labels)."""
    from tests.ddp import ddp_trainer_kwargs, dump

    data = CIFAR10DataModule(root=root, batch_size=4, eval_batch_size=8, num_val=2, device="cpu", seed=5)
    model, seen = LinearClassifier(3072), []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x, y = batch
            seen.append([trainer.current_epoch, batch_idx, trainer.global_step, x.double().sum().item(), y.tolist()])

    checkpoint = ModelCheckpoint(dirpath=outdir / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(**ddp_trainer_kwargs(max_steps=-1, max_epochs=2, enable_checkpointing=True,
                                              callbacks=[Record(), checkpoint]))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    dump(outdir, trainer.global_rank, {"seen": seen, "weights": weights.tolist(), "losses": model.losses})


@pytest.mark.ddp
@pytest.mark.slow
def test_mid_epoch_resume_is_exact_under_ddp(tmp_path):
    from tests.ddp import run_ddp

    root = synthetic.write_cifar10(tmp_path / "cifar", per_batch=10)  # 48 training images: 6 steps of 2 x 4
    straight = run_ddp("tests.test_exact_resume:fit_cifar_ddp", tmp_path / "straight", root=str(root))
    assert all(len(r["seen"]) == 12 for r in straight)
    resumed = run_ddp("tests.test_exact_resume:fit_cifar_ddp", tmp_path / "resumed", root=str(root),
                      ckpt_path=str(tmp_path / "straight" / "ckpt" / "step=9.ckpt"))  # epoch 1, batch 3 of 6
    for full, rest in zip(straight, resumed):
        assert rest["seen"] == full["seen"][9:] and rest["losses"] == full["losses"][9:]
        assert rest["weights"] == full["weights"]
    assert straight[0]["seen"] != straight[1]["seen"]  # each rank its own shard and augmentation


def fit_resized(data_dir: Path, run_dir: Path, ckpt_path: str | None = None):
    """BatchSizeSchedule doubles the batch after 2 steps and halves it back after 5, inside epoch 0 (48 examples:
    8, 8, 16, 16, 16 → 8 left, then 8s), so checkpoints fall in an epoch whose batches had different sizes."""
    from lightning_sgd.plugins import BatchSizeSchedule

    data, inputs = mnist1d(data_dir)
    model, recorder = LinearClassifier(inputs), BatchRecorder()
    schedule = BatchSizeSchedule(milestones=[2, 5], factors=[2.0, 0.5], interval="step")
    trainer = pl.Trainer(max_steps=14, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[
                             recorder, schedule,
                             ModelCheckpoint(dirpath=run_dir, filename="{step}", every_n_train_steps=1,
                                             save_top_k=-1)])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, recorder.seen


def test_mid_epoch_resume_is_exact_after_the_batch_size_changed_in_that_epoch(tmp_path):
    """The loader BatchSizeSchedule rebuilds saves the indices consumed, not batches × the original batch size."""
    model, seen = fit_resized(tmp_path, tmp_path / "straight")
    sizes = [len(y) for *_, y in seen]
    assert sizes[:6] == [8, 8, 16, 16, 16, 8] and sizes[6] == 8 and len(seen) == 14  # epoch 0 is 6 batches
    state = torch.load(tmp_path / "straight" / "step=4.ckpt", weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 4, "indices": 48}]
    for step in (3, 4, 5, 8):
        resumed, resumed_seen = fit_resized(tmp_path, tmp_path / f"resumed-{step}",
                                            str(tmp_path / "straight" / f"step={step}.ckpt"))
        assert [r[:3] for r in resumed_seen] == [s[:3] for s in seen[step:]], step
        assert all(torch.equal(r[4], s[4]) and torch.equal(r[3], s[3]) for r, s in zip(resumed_seen, seen[step:]))
        assert resumed.losses == model.losses[step:]
        assert all(torch.equal(p, p0) for p, p0 in zip(resumed.parameters(), model.parameters())), step
