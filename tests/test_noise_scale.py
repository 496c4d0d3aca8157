"""Gradient noise scale: pure estimators against closed forms and Monte Carlo, and the callback's sources."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import MixedPrecision
from torch import nn

from lightning_sgd.callbacks import GradientNoiseScale
from lightning_sgd.gns_sources import BNoiseEstimator, GradDifferences, ParamLayout, Skip, StrategyRecordSource
from lightning_sgd.grad_stats import AllReduceGradStats
from lightning_sgd.module_loss import ModuleLoss
from lightning_sgd.noise_scale import (
    NoiseScaleEMA,
    NoiseScaleSample,
    fit_steps_vs_batch,
    per_example_estimate,
    small_batches_estimate,
    two_batch_estimate,
)
from lightning_sgd.per_example import per_example_gradient_stats
from lightning_sgd.recipes.classification import ClassificationModule
from tests.ddp import run_ddp
from tests.helpers import TinyDataModule, classification_data, fast_trainer_kwargs, tiny_mlp, tiny_module


def test_fit_steps_vs_batch_recovers_b_noise_from_noisy_points():
    # S(B) = 2000 (1 + 300/B) with 3% multiplicative noise at 7 batch sizes: the log-space fit recovers B_noise
    # within 5% (the noise level is what sweeps see between seeds; 5% is the tolerance).
    rng = np.random.default_rng(0)
    batch_sizes = 2.0 ** np.arange(4, 11)
    steps = 2000 * (1 + 300 / batch_sizes) * np.exp(0.03 * rng.standard_normal(batch_sizes.size))
    s_min, b_noise = fit_steps_vs_batch(batch_sizes, steps)
    assert abs(b_noise / 300 - 1) < 0.05
    assert abs(s_min / 2000 - 1) < 0.05


def test_fit_steps_vs_batch_exact_points_and_bad_input():
    s_min, b_noise = fit_steps_vs_batch([8, 32, 128, 512], [1000 * (1 + 100 / b) for b in (8, 32, 128, 512)])
    assert s_min == pytest.approx(1000, rel=1e-6) and b_noise == pytest.approx(100, rel=1e-6)
    with pytest.raises(ValueError, match="distinct"):
        fit_steps_vs_batch([32, 32], [100, 110])


# --------------------------------------------------------------------------------------------- linear regression


class LinearRegression(pl.LightningModule):
    """y ≈ wᵀx with loss ½(wᵀx − y)² averaged over the batch: |G|², tr Σ and the Hessian in closed form."""

    def __init__(self, w: torch.Tensor, lr: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(w.numel(), 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(w.reshape(1, -1))
        self.lr = lr

    def split_batch(self, batch):
        return batch

    def forward(self, x):
        return self.linear(x).squeeze(-1)  # (B,)

    def loss(self, outputs, targets):
        return 0.5 * (outputs - targets).pow(2).mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_problem(d=5, sigma=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 2.0, d)  # Σx = diag(scales²)
    w_star = torch.randn(d, generator=g)
    w = w_star + 0.7 * torch.randn(d, generator=g)  # frozen parameters, d = w − w*
    cov = torch.diag(scales**2)
    delta = w - w_star
    truth = {
        "grad_sq": float((cov @ delta).pow(2).sum()),
        "trace": float((cov @ delta).pow(2).sum() + (delta @ cov @ delta) * cov.trace() + sigma**2 * cov.trace()),
        "gHg": float(delta @ cov @ cov @ cov @ delta),
        "trace_h": float(delta @ cov @ cov @ cov @ delta + (delta @ cov @ delta) * (cov @ cov).trace()
                         + sigma**2 * (cov @ cov).trace()),
    }

    def draw(n, gen):
        x = torch.randn(n, d, generator=gen) * scales
        y = x @ w_star + sigma * torch.randn(n, generator=gen)
        return x, y

    return w, w_star, draw, truth


def _within(samples, truth, k=4.0, max_rel_se=0.1):
    """|mean − truth| < k standard errors (k = 4: a false failure has probability ~6e-5), and the standard error
    itself is below ``max_rel_se`` of the truth so the check has teeth."""
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(samples)))
    assert se < max_rel_se * abs(truth), (se, truth)
    assert abs(float(t.mean()) - truth) < k * se, (float(t.mean()), truth, se)


def test_per_example_estimates_converge_to_linear_regression_closed_form():
    # Frozen parameters, 300 independent batches of 32 through the real engine: the per-example estimator's mean
    # matches G = Σx d and trΣ = |Σx d|² + (dᵀΣx d) trΣx + σ² trΣx within 4 standard errors.
    w, _, draw, truth = regression_problem()
    module = LinearRegression(w)
    gen = torch.Generator().manual_seed(1)
    grad_sq, trace = [], []
    for _ in range(300):
        stats = per_example_gradient_stats(module, draw(32, gen), chunk_size=None)
        sample = per_example_estimate(stats.sq_norms, sum(float(g.pow(2).sum()) for g in stats.mean_grad))
        grad_sq.append(sample.grad_sq_norm)
        trace.append(sample.trace_cov)
    _within(grad_sq, truth["grad_sq"])
    _within(trace, truth["trace"])
    ema = NoiseScaleEMA(beta=0.99)
    for g2, tr in zip(grad_sq, trace):
        ema.update(NoiseScaleSample(g2, tr, 1, 32))
    # The EMA (effective window ~100 samples) lands within 15% of the true B_simple.
    assert ema.b_simple == pytest.approx(truth["trace"] / truth["grad_sq"], rel=0.15)


def test_unbiased_two_batch_estimators_vs_biased_naive_norm():
    # Closed-form per-example gradients g_i = x_i(x_iᵀw − y_i); 4000 draws of B = 16 split into W = 4 parts of 4.
    w, _, draw, truth = regression_problem(seed=2)
    gen = torch.Generator().manual_seed(3)
    naive, grad_sq, trace, pe_grad_sq, pe_trace = [], [], [], [], []
    for _ in range(4000):
        x, y = draw(16, gen)
        g = x * (x @ w - y)[:, None]  # (16, d)
        big = g.mean(0).pow(2).sum()
        naive.append(float(big))
        small = g.reshape(4, 4, -1).mean(1).pow(2).sum(1)  # (4,)
        s = small_batches_estimate(small, 4, big)
        grad_sq.append(s.grad_sq_norm)
        trace.append(s.trace_cov)
        p = per_example_estimate(g.pow(2).sum(1), big)
        pe_grad_sq.append(p.grad_sq_norm)
        pe_trace.append(p.trace_cov)
    _within(grad_sq, truth["grad_sq"])
    _within(trace, truth["trace"])
    _within(pe_grad_sq, truth["grad_sq"])
    _within(pe_trace, truth["trace"])
    # The naive |g_B|² estimates |G|² + trΣ/B instead: biased by far more than its standard error.
    _within(naive, truth["grad_sq"] + truth["trace"] / 16)
    t = torch.tensor(naive, dtype=torch.float64)
    assert float(t.mean()) - truth["grad_sq"] > 10 * float(t.std() / math.sqrt(len(naive)))


def test_estimator_edge_cases_and_ema_algebra():
    with pytest.raises(ValueError, match="B_small == B_big"):
        two_batch_estimate(1.0, 8, 1.0, 8)
    with pytest.raises(ValueError, match="at least 2"):
        per_example_estimate(torch.ones(1), 1.0)
    ema = NoiseScaleEMA(beta=0.5)
    assert math.isnan(ema.b_simple)
    ema.update(NoiseScaleSample(2.0, -1.0, 1, 2))  # a negative trace sample is kept (unbiasedness), clamped later
    ema.update(NoiseScaleSample(4.0, 7.0, 1, 2))
    # Debiased: weights (1−β)β, (1−β) over 1 − β² -> 1/3, 2/3.
    assert ema.grad_sq_norm == pytest.approx(2 / 3 + 8 / 3)
    assert ema.trace_cov == pytest.approx(-1 / 3 + 14 / 3)
    assert ema.b_simple == pytest.approx((13 / 3) / (10 / 3))  # ratio of EMAs
    clone = NoiseScaleEMA()
    clone.load_state_dict(ema.state_dict())
    assert clone.state_dict() == ema.state_dict() and clone.b_simple == ema.b_simple


def test_b_noise_hvp_estimate_converges_to_linear_regression_closed_form():
    # H = Σx for squared loss; GᵀHG = dᵀΣx³d and tr(HΣ) = dᵀΣx³d + (dᵀΣx d) tr Σx² + σ² tr Σx² (the per-example
    # gradient covariance Σ of regression_problem with Gaussian fourth moments). The callback's HVP estimator (group
    # gradients from one half of the batch, Hessian from the other) is unbiased: 150 batches of 64 land within 4
    # standard errors.
    w, _, draw, truth = regression_problem(seed=4)
    module = LinearRegression(w)
    estimator, loss = BNoiseEstimator(groups=4, beta=0.0), ModuleLoss(module, "test")
    gen = torch.Generator().manual_seed(5)
    ghg, trace_h = [], []
    for _ in range(150):
        estimator.measure(module, loss, draw(64, gen))
        ghg.append(estimator.ema.grad_sq_norm)  # beta = 0: the EMA is the last sample
        trace_h.append(estimator.ema.trace_cov)
    _within(ghg, truth["gHg"])
    _within(trace_h, truth["trace_h"])


# ------------------------------------------------------------------------------------------------ the callback
class StepRecorder(Callback):
    """Per optimizer step: the parameters, the micro-batches and the noise-scale callback's raw sample (runs after
    the callback: callbacks are called in list order)."""

    def __init__(self, gns):
        self.gns, self.steps = gns, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.steps or self.steps[-1]["step"] != trainer.global_step:
            self.steps.append({"step": trainer.global_step, "batches": []})
        self.steps[-1]["batches"].append([t.clone() for t in batch])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["params"] = [p.detach().clone() for p in pl_module.parameters()]
        self.steps[-1]["sample"] = self.gns.last_sample
        self.gns.last_sample = None


def flat_grads(module, params, x, y):
    """Brute force: the mean-loss gradient of (x, y) at `params`, flattened (one autograd call)."""
    with torch.no_grad():
        for p, v in zip(module.parameters(), params):
            p.copy_(v.reshape(p.shape))
    loss = module.loss(module(x), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.parameters()))]).double()


def brute_sample(kind, steps_batches, params, parts=4):
    """Ground truth sample from brute-force autograd on a fresh tiny MLP at the recorded parameters."""
    module = tiny_module()
    if kind == "per_example":
        x, y = steps_batches[0]
        g = torch.stack([flat_grads(module, params, x[i : i + 1], y[i : i + 1]) for i in range(len(y))])
        return per_example_estimate(g.pow(2).sum(1), g.mean(0).pow(2).sum())
    if kind == "split":
        x, y = steps_batches[0]
        size = len(y) // parts
        g = torch.stack([flat_grads(module, params, x[k * size : (k + 1) * size], y[k * size : (k + 1) * size])
                         for k in range(parts)])
        return small_batches_estimate(g.pow(2).sum(1), size, g.mean(0).pow(2).sum())
    # accumulation: one gradient per micro-batch
    g = torch.stack([flat_grads(module, params, x, y) for x, y in steps_batches])
    return small_batches_estimate(g.pow(2).sum(1), len(steps_batches[0][1]), g.mean(0).pow(2).sum())


@pytest.mark.parametrize("source, accumulate, extra, rel", [
    ("per_example", 1, {}, 1e-4),  # engine auto -> layer hooks on the training backward
    ("per_example", 1, {"engine": "vmap"}, 1e-4),
    # hooks under fp16 autocast + GradScaler: the hooks see scaled fp16 output gradients; off by 65536² if unscaled
    ("per_example", 1, {"amp": True}, 3e-2),
    ("split", 1, {}, 1e-4),
    ("accumulation", 2, {}, 1e-4),
    # fp16 autocast with a GradScaler (scale 65536; Lightning gives CPU no scaler by default, so pass one) and
    # clipping to 1e-4: the callback must undo the scale and see the gradients before clipping. Either mistake is
    # off by orders of magnitude; fp16 activations cost ~1e-3.
    ("accumulation", 2, {"gradient_clip_val": 1e-4, "amp": True}, 3e-2),
])
def test_each_source_matches_brute_force_on_tiny_mlp(source, accumulate, extra, rel):
    # Each measured step's raw sample equals the same estimator computed from brute-force autograd gradients at the
    # recorded parameters. float32 gradients, float64 sums: relative 1e-4 covers the rounding (trΣ is a difference
    # of norms of similar size).
    engine = extra.pop("engine", "auto")
    gns = GradientNoiseScale(source=source, schedule=1, split_parts=4, chunk_size=5, engine=engine)
    recorder = StepRecorder(gns)
    if extra.pop("amp", False):
        extra["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=3, accumulate_grad_batches=accumulate,
                                               callbacks=[gns, recorder], **extra))
    trainer.fit(tiny_module(lr=0.5), datamodule=TinyDataModule(n=64, batch_size=16 // accumulate))
    assert gns.measured == 3 and len(recorder.steps) == 3
    for entry in recorder.steps:
        truth = brute_sample(source, entry["batches"], entry["params"])
        got = entry["sample"]
        assert (got.b_small, got.b_big) == (truth.b_small, truth.b_big)
        assert got.grad_sq_norm == pytest.approx(truth.grad_sq_norm, rel=rel, abs=1e-8)
        assert got.trace_cov == pytest.approx(truth.trace_cov, rel=rel, abs=1e-8)
    assert math.isfinite(gns.b_simple) and gns.b_simple == gns.ema.b_simple
    if source == "per_example":  # the engine really used, with no fallback
        assert gns.engine_in_use == ("hooks" if engine == "auto" else "vmap")
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert scaler is None or scaler.get_scale() > 1000  # the AMP case really ran with scaled gradients


@pytest.mark.ddp
def test_ddp_source_matches_per_rank_brute_force(tmp_path):
    # A real 2-process gloo job, four runs: plain DDP without and with accumulation (2 micro-batches), where the
    # callback reads every micro-batch gradient of every rank as a difference of .grad (the synced one in an
    # autograd-engine callback that runs before DDP overwrites .grad with the average: if it ran after, every
    # number below would be off) and one all-reduce of scalars combines them; the same with
    # gradient_as_bucket_view=True, where .grad is DDP's bucket and tensor hooks read the gradients instead; and
    # GradStatsDDPStrategy, whose record the callback consumes (small batch = one rank's whole step). Ground
    # truth: the gradients recomputed here from the batches each rank saw, at the recorded parameters.
    results = run_ddp("tests.ddp_entries_gns:gns_ddp", tmp_path,
                      configs=[[1, False], [2, False], [2, False, "bucket_view"], [2, True]])
    module = tiny_module()
    for key in ("1-0", "2-0", "2-0-bucket_view", "2-1"):
        ranks = [r[key] for r in results]
        assert ranks[0]["measured"] == 3 and ranks[0]["b_simple"] == ranks[1]["b_simple"]
        assert ranks[0]["used_record"] == key.endswith("1")
        assert ranks[0]["differencing"] == (key in ("1-0", "2-0"))
        for step in range(3):
            entries = [r["steps"][step] for r in ranks]
            params = [torch.tensor(p) for p in entries[0]["params"]]
            assert entries[0]["params"] == entries[1]["params"]
            if key.endswith("1"):  # the record: one gradient per rank over its micro-batches
                g = torch.stack([torch.stack([flat_grads(module, params, torch.tensor(x), torch.tensor(y))
                                              for x, y in e["batches"]]).mean(0) for e in entries])
                b_small = 4 * len(entries[0]["batches"])
            else:
                g = torch.stack([flat_grads(module, params, torch.tensor(x), torch.tensor(y))
                                 for e in entries for x, y in e["batches"]])  # (ranks × micro-batches, P)
                b_small = 4
            truth = small_batches_estimate(g.pow(2).sum(1), b_small, g.mean(0).pow(2).sum())
            for e in entries:
                got = e["sample"]
                assert got[2:] == [truth.b_small, truth.b_big]
                assert got[0] == pytest.approx(truth.grad_sq_norm, rel=1e-4, abs=1e-8)
                assert got[1] == pytest.approx(truth.trace_cov, rel=1e-4, abs=1e-8)


def test_strategy_record_is_used_only_for_the_current_step():
    source = StrategyRecordSource()
    record = AllReduceGradStats(step=7, local_sq_norms=torch.tensor([3.0, 5.0]), global_sq_norm=2.5,
                                local_batch_size=8, global_batch_size=16)
    trainer = SimpleNamespace(strategy=SimpleNamespace(latest_grad_stats=record), global_step=7, world_size=2)
    source.setup(trainer, tiny_module(), ParamLayout.of(tiny_module()), None)
    samples = source.samples(trainer, None, None)
    expected = two_batch_estimate(4.0, 8, 2.5, 16)
    assert samples == {"": expected}
    trainer.global_step = 8  # a record from the previous step must never be paired with this one
    with pytest.warns(UserWarning, match="record"), pytest.raises(Skip) as skip:
        source.samples(trainer, None, None)
    assert skip.value.reason == "stale"  # counted in GradientNoiseScale.skipped["stale"]


class NaNAtStep(ClassificationModule):
    """Returns a NaN loss at one step (as an fp16 overflow would) and then drops that step's gradients (as the AMP
    grad scaler skips the step; module hooks run after callback hooks), a normal loss otherwise."""

    def __init__(self, bad_step):
        super().__init__(tiny_mlp(), num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.bad_step else loss

    def on_before_optimizer_step(self, optimizer):
        if self.global_step == self.bad_step:
            for p in self.parameters():
                p.grad = None


def test_nonfinite_steps_are_skipped_and_counted():
    gns = GradientNoiseScale(source="accumulation", schedule=1)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=4, accumulate_grad_batches=2, callbacks=[gns]))
    trainer.fit(NaNAtStep(bad_step=2), datamodule=TinyDataModule(n=64, batch_size=8))
    assert gns.skipped["nonfinite"] == 1 and gns.measured == 3
    assert math.isfinite(gns.b_simple) and math.isfinite(gns.grad_sq_norm)


def test_logs_stable_keys_and_per_layer_values():
    gns = GradientNoiseScale(schedule=2, per_layer=True, b_noise_schedule=3)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=6, callbacks=[gns], logger=CSVLogger("logs", name="gns")))
    trainer.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=16))
    import csv

    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {k for row in rows for k, v in row.items() if v}
    for key in ("gns/grad_sq_norm", "gns/trace_cov", "gns/b_simple", "gns/regime", "gns/batch_size", "gns/b_noise",
                "gns/layer/network.0/b_simple", "gns/layer/network.4/trace_cov"):
        assert key in keys, key
    steps = sorted({int(r["step"]) for r in rows if r.get("gns/b_simple")})
    assert steps == [0, 2, 4]  # the schedule, not log_every_n_steps, decides
    assert gns.measured == 3 and set(gns.layer_ema) == {"network.0", "network.2", "network.4"}
    assert gns.last_metrics["gns/batch_size"] == 16


def test_bad_input_is_a_clear_error_or_documented_fallback():
    with pytest.raises(ValueError, match="source must be"):
        GradientNoiseScale(source="magic")
    # A batch of one example (e.g. an epoch's last batch) is skipped and counted, not raised mid-run.
    for source in ("per_example", "split"):
        gns = GradientNoiseScale(source=source, schedule=1)
        pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[gns])).fit(
            tiny_module(), datamodule=TinyDataModule(n=8, batch_size=1))
        assert gns.measured == 0 and gns.skipped["too_few"] == 2
    for source, match in (("ddp", "more than one process"), ("accumulation", "B_small == B_big")):
        trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=[GradientNoiseScale(source=source)]))
        with pytest.raises(ValueError, match=match):
            trainer.fit(tiny_module(), datamodule=TinyDataModule())
    bn = ClassificationModule(nn.Sequential(nn.Linear(25, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)), 3)
    trainer = pl.Trainer(**fast_trainer_kwargs(callbacks=[GradientNoiseScale(source="per_example")]))
    with pytest.raises(ValueError, match="BatchNorm"):
        trainer.fit(bn, datamodule=TinyDataModule())
    # auto + BatchNorm: the documented fallback is the batch split. Its extra forwards leave the BN running
    # statistics, the RNG and hence the whole run unchanged: identical to a run without the callback.
    def bn_run(callbacks):
        torch.manual_seed(0)
        module = ClassificationModule(nn.Sequential(nn.Linear(25, 6), nn.BatchNorm1d(6), nn.Dropout(0.2),
                                                    nn.Linear(6, 3)), 3)
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=callbacks))
        trainer.fit(module, datamodule=TinyDataModule(n=64, batch_size=16))
        return module

    gns = GradientNoiseScale(schedule=1)
    with_cb, without = bn_run([gns]), bn_run([])
    assert gns.source_in_use == "split" and gns.measured == 2
    for (name, a), b in zip(with_cb.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_the_emas_exactly(tmp_path):
    # 2 epochs straight vs 1 epoch, checkpoint, resume for the second: identical EMA state and B_simple.
    def run(max_epochs, ckpt=None, **kw):
        gns = GradientNoiseScale(schedule=1, per_layer=True)
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=-1, max_epochs=max_epochs, callbacks=[gns], **kw))
        trainer.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=16), ckpt_path=ckpt)
        return trainer, gns

    _, straight = run(2)
    first, _ = run(1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = run(2, ckpt=str(tmp_path / "epoch1.ckpt"))
    assert resumed.measured == straight.measured == 8
    assert resumed.state_dict() == straight.state_dict()
    assert resumed.b_simple == straight.b_simple


def test_a_resumed_run_keeps_the_engine_the_timing_chose(tmp_path, monkeypatch):
    """engine="auto" times hooks vs vmap once per process; the checkpoint carries the choice, so a resumed run does
    not time again (it could choose differently under another load and round its numbers differently)."""
    import lightning_sgd.gns_sources as gns_sources

    calls = []

    def chooses(answer):
        def choose_engine(*args, **kwargs):
            calls.append(answer)
            return answer
        return choose_engine

    def run(max_epochs, ckpt=None):
        gns = GradientNoiseScale(schedule=1, engine="auto")
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=-1, max_epochs=max_epochs, callbacks=[gns]))
        trainer.fit(tiny_module(), datamodule=TinyDataModule(n=64, batch_size=16), ckpt_path=ckpt)
        return trainer, gns

    monkeypatch.setattr(gns_sources, "choose_engine", chooses("vmap"))
    first, gns = run(1)
    assert calls == ["vmap"] and gns.engine_in_use == "vmap" and gns.state_dict()["engine"] == "vmap"
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    monkeypatch.setattr(gns_sources, "choose_engine", chooses("hooks"))  # a resumed run must not ask again
    _, resumed = run(2, ckpt=str(tmp_path / "epoch1.ckpt"))
    assert calls == ["vmap"] and resumed.engine_in_use == "vmap" and resumed.measured == 8


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sources_agree_with_each_other_and_the_population_truth():
    # Frozen parameters (lr = 0), batches drawn with replacement from 128 examples, so each source's samples are
    # unbiased for the population |G|² and tr Σ (1/N covariance). 150 measured steps of batch 64 per source; each
    # mean lands within 4 standard errors of the brute-force population values.
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    x, y = classification_data(n=128, seed=7)
    module = tiny_module(lr=0.0)
    params = [p.detach().clone() for p in module.parameters()]
    g = torch.stack([flat_grads(tiny_module(), params, x[i : i + 1], y[i : i + 1]) for i in range(128)])
    truth_grad_sq = float(g.mean(0).pow(2).sum())
    truth_trace = float((g - g.mean(0)).pow(2).sum(1).mean())
    steps = 150
    for source, accumulate in (("per_example", 1), ("split", 1), ("accumulation", 2)):
        gns = GradientNoiseScale(source=source, schedule=1, split_parts=4)
        recorder = StepRecorder(gns)
        sampler = RandomSampler(range(128), replacement=True, num_samples=64 * steps,
                                generator=torch.Generator().manual_seed(8))
        loader = DataLoader(TensorDataset(x, y), batch_size=64 // accumulate, sampler=sampler)
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=steps, accumulate_grad_batches=accumulate,
                                                   callbacks=[gns, recorder]))
        trainer.fit(tiny_module(lr=0.0), train_dataloaders=loader)
        samples = [e["sample"] for e in recorder.steps]
        assert len(samples) == steps
        # B_simple ≈ 54 here: standard errors reach ~10% of the values (split has only 3 degrees of freedom per
        # sample), so 4 SE still rules out the naive estimator's bias (B_simple/B ≈ 85% of |G|²).
        _within([s.grad_sq_norm for s in samples], truth_grad_sq, k=4.0, max_rel_se=0.2)
        _within([s.trace_cov for s in samples], truth_trace, k=4.0, max_rel_se=0.2)


def test_accumulation_differencing_handles_parameters_that_get_grad_late():
    # The accumulation source on one process reads micro-batch k's gradient as .grad_k - .grad_{k-1}. A parameter
    # that first gets a gradient in micro-batch 2 (a branch not used before) must count as 0 before, and a new step
    # must not reuse the previous step's buffers. Exact arithmetic on small integers: equality.
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    layout = ParamLayout({"x.a": a, "y.b": b}, per_layer=True)  # columns: total, layer x, layer y
    differences = GradDifferences(layout.params)

    def micro(first, last):
        return layout.reduce(differences.record(first, last)).tolist()

    a.grad = torch.tensor([1.0, 2.0, 2.0])  # micro-batch 1: only a
    assert micro(True, False) == [9.0, 9.0, 0.0]
    a.grad = a.grad + torch.tensor([0.0, 0.0, 4.0])
    b.grad = torch.tensor([3.0, 4.0])  # micro-batch 2: b's first gradient
    assert micro(False, False) == [41.0, 16.0, 25.0]
    a.grad, b.grad = a.grad + torch.tensor([1.0, 2.0, 2.0]), b.grad + torch.tensor([3.0, 4.0])  # the last one
    assert micro(False, True) == [34.0, 9.0, 25.0]
    a.grad, b.grad = torch.tensor([2.0, 0.0, 0.0]), None  # a new step: fresh sums
    assert micro(True, True) == [4.0, 4.0, 0.0]
    a.grad, b.grad = None, None  # no gradient at all: a zero row
    assert micro(True, True) == [0.0, 0.0, 0.0]
