"""CurvatureSpectrum and lightning_sgd.curvature against dense ground truth on tiny models (< 500 parameters).

Ground truth: ``torch.autograd.functional.hessian`` + ``eigvalsh`` of the mean loss over the probe batches, the GGN
``mean_i J_iᵀ H_ℓ,i J_i`` and empirical Fisher ``mean_i g_i g_iᵀ`` built from per-example Jacobians/gradients.
Models run in float64 so the tolerances reflect the algorithms, not float32 rounding.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_sgd import curvature as C
from lightning_sgd.callbacks import CurvatureSpectrum
from lightning_sgd.recipes.classification import ClassificationModule
from tests.helpers import TinyDataModule, classification_data, fast_trainer_kwargs, tiny_module

SIZES = (6, 5, 3)  # 35 + 18 = 53 parameters: dense references and exact (3n-matvec) Hutch++ stay cheap


# --------------------------------------------------------------------------------------------- references
def _problem(sizes=SIZES, n=48, batches=2, seed=0):
    module = tiny_module(sizes=sizes, seed=seed).double()
    x, y = classification_data(n, sizes[0], sizes[-1], seed=seed)
    x = x.double()
    size = n // batches
    return module, [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(batches)]


def _flat(module):
    names = [n for n, p in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])

    def unflatten(vec):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = vec[i:i + shape.numel()].view(shape)
            i += shape.numel()
        return out

    return flat, unflatten


def dense_hessian(module, batches):
    flat, unflatten = _flat(module)

    def loss(vec):
        return sum(module.loss(functional_call(module, unflatten(vec), (x,)), y) for x, y in batches) / len(batches)

    return hessian(loss)(flat)  # torch.func: vectorized forward-over-reverse, same matrix as autograd's


def dense_ggn_and_fisher(module, batches):
    """Per-example Jacobians J_i (outputs x P), output Hessians H_i and gradients g_i = J_iᵀ ∇ℓ_i, batch-averaged."""
    flat, unflatten = _flat(module)
    ggn = torch.zeros(len(flat), len(flat), dtype=flat.dtype)
    fisher = torch.zeros_like(ggn)
    for x, y in batches:
        for xi, yi in zip(x, y):
            def out(vec, xi=xi):
                return functional_call(module, unflatten(vec), (xi[None],))[0]

            def ell(o, yi=yi):
                return module.loss(o[None], yi[None])

            jac = jacrev(out)(flat)  # (classes, P)
            o = out(flat)
            ggn += jac.T @ hessian(ell)(o) @ jac / (len(x) * len(batches))
            g = jac.T @ torch.func.grad(ell)(o)
            fisher += torch.outer(g, g) / (len(x) * len(batches))
    return ggn, fisher


# ----------------------------------------------------------------------------------------- eigen and trace
def test_top_eigenvalues_trace_and_frobenius_match_dense_hessian():
    # 24 + 15 = 39 parameters, one batch (batch averaging is covered by the GGN/Fisher and DDP tests)
    module, batches = _problem(sizes=(5, 4, 3), n=32, batches=1)
    h = dense_hessian(module, batches)
    true = torch.linalg.eigvalsh(h).flip(0)  # descending
    op = C.make_operator(module, batches, "hessian")
    result = C.measure(op, C.MeasureConfig(k=4, lanczos_iterations=25, trace_matvecs=117, frobenius_matvecs=18))

    # Ritz values: each lies within its residual ‖Hv − θv‖ of a true eigenvalue (a theorem for symmetric H);
    # with 25 Krylov steps on 39 dims the top 4 converge to float64 rounding, so also compare them directly.
    for theta, res in zip(result.eigenvalues, result.residuals):
        assert (true - theta).abs().min() <= res + 1e-10
    assert all(result.converged)
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), true[:4], rtol=1e-8, atol=1e-10)
    # Hutch++ with 3n matvecs sketches the whole space: exact up to rounding (1e-8 relative).
    assert result.trace == pytest.approx(float(h.trace()), rel=1e-8)
    # ‖H‖_F from Hutch++ on H² with a 6-column sketch: within 4 standard errors (fixed seed; ~6e-5 to fail by chance)
    true_frobenius = float(torch.linalg.matrix_norm(h))
    assert abs(result.frobenius - true_frobenius) <= 4 * result.frobenius_stderr
    assert result.frobenius == pytest.approx(true_frobenius, rel=0.05)  # H² is dominated by a few eigenvalues


def test_hutch_plus_plus_trace_is_within_its_standard_error():
    module, batches = _problem()
    true = float(dense_hessian(module, batches).trace())
    result = C.measure(C.make_operator(module, batches), C.MeasureConfig(k=1, trace_matvecs=30, seed=3))
    # 4 standard errors: a fixed seed, and a ~6e-5 chance to fail for a Gaussian estimate with any seed.
    assert abs(result.trace - true) <= 4 * result.trace_stderr
    assert result.trace_stderr > 0


def test_ggn_and_empirical_fisher_match_their_dense_definitions():
    module, batches = _problem(n=16)
    ggn, fisher = dense_ggn_and_fisher(module, batches)
    v = torch.randn(ggn.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, dense in (("ggn", ggn), ("empirical_fisher", fisher)):
        op = C.make_operator(module, batches, name)
        torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)  # float64 rounding
        result = C.measure(op, C.MeasureConfig(k=2, lanczos_iterations=20, trace_matvecs=0))
        true = torch.linalg.eigvalsh(dense).flip(0)[:2]
        torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), true, rtol=1e-8,
                                   atol=1e-10)
    # cross-entropy: the GGN is PSD, the Hessian is not; near these weights both share the top eigenvalue's scale
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12


# ---------------------------------------------------------------------------------------------- safety
class _BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(25, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_measurement_leaves_buffers_modes_rng_and_grads_bit_identical(mode):
    module = ClassificationModule(_BNDropNet(), num_classes=3)
    module.train()
    module.network.net[3].eval()  # a mixed mode pattern must come back as it was
    x, y = classification_data(32)
    module.loss(module(x), y).backward()  # .grad as the training step leaves it
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    grads = {k: (p.grad, p.grad.clone()) for k, p in module.named_parameters()}
    modes = {k: m.training for k, m in module.named_modules()}
    rng = torch.get_rng_state()

    with C.preserved_training_state(module, mode):
        op = C.CheckedOperator(C.make_operator(module, batches), fixed_seed=0 if mode == "train" else None)
        variance = lambda d: C.projection_variance(module, batches, d)  # noqa: E731
        result = C.measure(op, C.MeasureConfig(k=2, lanczos_iterations=6, trace_matvecs=3, frobenius_matvecs=3,
                                               density_runs=1, density_steps=4, alignment=True),
                           variance_fn=variance)
        assert module.training == (mode == "train")
    assert result.eigenvalues and result.alignment is not None

    for k, v in module.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for k, p in module.named_parameters():
        assert torch.equal(p, params[k]), k
        assert p.grad is grads[k][0] and torch.equal(p.grad, grads[k][1]), k
    assert {k: m.training for k, m in module.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_mode_fixes_dropout_masks_so_the_operator_is_one_symmetric_matrix():
    module = ClassificationModule(_BNDropNet(), num_classes=3)
    x, y = classification_data(16)
    with C.preserved_training_state(module, "train"):
        op = C.CheckedOperator(C.make_operator(module, [(x, y)]), fixed_seed=0)
        g = torch.Generator().manual_seed(1)
        u, v = torch.randn(op.size, generator=g), torch.randn(op.size, generator=g)
        # symmetric: uᵀ(Hv) = vᵀ(Hu) only if both products see the same dropout masks and batch statistics
        assert float(u @ op.matvec(v)) == pytest.approx(float(v @ op.matvec(u)), rel=1e-4)


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_training_with_the_callback_follows_the_same_trajectory_and_logs(tmp_path):
    """BN + dropout, shuffled data, measured every step in train mode: weights end bit-identical to no callback."""

    def fit(callbacks):
        pl.seed_everything(0)
        module = ClassificationModule(_BNDropNet(), num_classes=3,
                                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        logger = pl.loggers.CSVLogger(tmp_path, name="run", version=len(callbacks))
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=3, callbacks=callbacks, logger=logger))
        trainer.fit(module, datamodule=TinyDataModule(batch_size=16, shuffle=True))
        return module, Path(logger.log_dir) / "metrics.csv"

    callback = CurvatureSpectrum(schedule=1, k=2, lanczos_iterations=4, trace_matvecs=6, frobenius_matvecs=3,
                                 mode="train", probe_batch_size=16)
    plain, _ = fit([])
    measured, metrics_csv = fit([callback])
    assert torch.equal(_params(plain), _params(measured))

    assert [h["step"] for h in callback.history] == [0, 1, 2, 3]
    rows = list(csv.DictReader(metrics_csv.open()))
    keys = {k for row in rows for k, v in row.items() if v != ""}
    for name in ("eig_0", "eig_1", "trace", "trace_stderr", "frobenius", "sharpness",
                 "sharpness_threshold", "sharpness_ratio", "frobenius_bound", "truncated"):
        assert f"curvature/hessian/{name}" in keys, name
    for name in ("residual_0", "lanczos_iterations"):  # diagnostics: out of the main view
        assert f"diag/curvature/hessian/{name}" in keys, name
    last = callback.history[-1]
    assert last["sharpness_threshold"] == pytest.approx(2 * 1.9)  # heavy-ball β = 0.9 read from the optimizer
    assert last["sharpness"] == pytest.approx(last["eig_0"] * 0.1)
    assert last["frobenius_bound"] == pytest.approx(last["frobenius"] * 0.1 / math.sqrt(16))


def test_resume_from_a_checkpoint_keeps_history_and_does_not_measure_the_same_step_twice(tmp_path):
    def fit(max_steps, ckpt_path=None):
        pl.seed_everything(0)
        callback = CurvatureSpectrum(schedule=1, k=1, lanczos_iterations=3, trace_matvecs=0)
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=max_steps, callbacks=[callback]))
        trainer.fit(tiny_module(), datamodule=TinyDataModule(), ckpt_path=ckpt_path)
        return trainer, callback

    trainer, first = fit(2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    _, resumed = fit(4, tmp_path / "two.ckpt")
    assert [h["step"] for h in first.history] == [0, 1, 2]
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3, 4]  # step 2 restored, not measured again
    assert resumed.history[:3] == first.history
    # two instances with different operators keep separate checkpoint state
    assert CurvatureSpectrum(operator="ggn").state_key != CurvatureSpectrum(operator="hessian").state_key
    # two instances with different operators keep separate checkpoint state
    assert CurvatureSpectrum(operator="ggn").state_key != CurvatureSpectrum(operator="hessian").state_key


# -------------------------------------------------------------------------------------------- time budget
class _FakeTime:
    """A clock that advances one 'second' per matvec, so the budget arithmetic is deterministic."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_time_budget_truncates_lanczos_and_skips_what_does_not_fit(monkeypatch):
    module, batches = _problem()
    clock = _FakeTime()
    monkeypatch.setattr(C, "time", clock)
    inner = C.make_operator(module, batches)

    def ticking(v):
        clock.now += 1.0
        return inner.matvec(v)

    op = C.LambdaOperator(ticking, inner.size, dtype=torch.float64)
    # 2 probe matvecs: 2 s; then 9.5 s left -> 9 Lanczos iterations of the 30 asked; trace (30) does not fit
    result = C.measure(op, C.MeasureConfig(k=3, lanczos_iterations=30, trace_matvecs=30, time_budget=11.5))
    assert result.truncated and result.lanczos_iterations == 9 and len(result.eigenvalues) == 3
    assert result.matvecs == 2 + 9
    assert "trace" in result.skipped and result.trace is None
    true = torch.linalg.eigvalsh(dense_hessian(module, batches))
    for theta, res in zip(result.eigenvalues, result.residuals):  # truncated, but the residual bound still holds
        assert (true - theta).abs().min() <= res + 1e-10


# ---------------------------------------------------------------------------------------------- alignment
def test_alignment_variance_matches_brute_force_per_example_gradients():
    module, batches = _problem(n=20)
    directions = torch.randn(3, C.num_parameters(module), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    var, n = C.projection_variance(module, batches, directions)
    grads = []
    for x, y in batches:
        for xi, yi in zip(x, y):
            module.zero_grad()
            module.loss(module(xi[None]), yi[None]).backward()
            grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    proj = torch.stack(grads) @ directions.T  # (n, 3)
    assert n == 20
    torch.testing.assert_close(var, proj.var(0), rtol=1e-10, atol=1e-14)

    corr, slope, used = C.loglog_fit([1.0, 2.0, 4.0, 8.0], [3.0, 12.0, 48.0, 192.0])  # var = 3 c²
    assert (corr, slope, used) == (pytest.approx(1.0), pytest.approx(2.0), 4)
    assert C.loglog_fit([1.0, -1.0], [1.0, 2.0])[2] == 1  # non-positive pairs are left out


# ----------------------------------------------------------------------------------------- derived values
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.5, True), (0.9, True)])
def test_stability_threshold_is_where_torch_sgd_on_a_quadratic_starts_to_diverge(momentum, nesterov):
    threshold = C.stability_threshold(momentum, nesterov)
    lam = 3.0

    def final(scale):
        theta = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([theta], lr=scale * threshold / lam, momentum=momentum, nesterov=nesterov)
        for _ in range(2000):
            opt.zero_grad()
            (0.5 * lam * theta ** 2).sum().backward()
            opt.step()
        return abs(float(theta))

    assert final(0.98) < 1e-3 and final(1.02) > 1e3


def test_optimizer_state_reads_lr_and_momentum():
    p = [nn.Parameter(torch.zeros(1))]
    state = C.optimizer_state(torch.optim.SGD(p, lr=0.3, momentum=0.8, dampening=0.5, nesterov=False))
    assert (state.lr, state.momentum, state.dampening, state.adaptive) == (0.3, 0.8, 0.5, False)
    assert C.sharpness(2.0, state) == (pytest.approx(0.3), pytest.approx(3.6))
    assert C.optimizer_state(torch.optim.Adam(p, lr=1e-3)).adaptive


def test_probe_indices_are_deterministic_disjoint_and_refuse_too_little_data():
    a = C.probe_indices(100, 2, 10, seed=1, rank=0, world_size=2)
    b = C.probe_indices(100, 2, 10, seed=1, rank=1, world_size=2)
    assert a == C.probe_indices(100, 2, 10, seed=1, rank=0, world_size=2)
    assert not set(sum(a, [])) & set(sum(b, [])) and [len(x) for x in a] == [10, 10]
    with pytest.raises(ValueError, match="needs 2 batch"):
        C.probe_indices(30, 2, 10, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        C.probe_indices(30, 0, 10)


# ------------------------------------------------------------------------------------------------ bad input
class _CdistNet(nn.Module):
    """Distances to learned centres: torch has no double backward (nor forward AD) for cdist."""

    def __init__(self):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(3, 25, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return -torch.cdist(x, self.centers)


def test_bad_configuration_is_refused_before_training():
    with pytest.raises(ValueError, match="probe set is empty"):
        CurvatureSpectrum(probe_batches=0)
    with pytest.raises(ValueError, match="operator must be one of"):
        CurvatureSpectrum(operator="kfac")
    with pytest.raises(ValueError, match="lanczos_iterations"):
        CurvatureSpectrum(k=5, lanczos_iterations=3)

    def fit(callback, module=None, n=256):
        trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=2, callbacks=[callback]))
        trainer.fit(module or tiny_module(), datamodule=TinyDataModule(n=n))
        return trainer

    with pytest.raises(ValueError, match="only 104 trainable parameters"):
        fit(CurvatureSpectrum(k=200), tiny_module(sizes=(25, 4)))  # 25·4 + 4 parameters
    with pytest.raises(ValueError, match="needs 4 batch"):
        fit(CurvatureSpectrum(probe_batches=4, probe_batch_size=16), n=40)
    with pytest.raises(C.NotTwiceDifferentiableError, match="differentiate the loss twice"):
        fit(CurvatureSpectrum(schedule=1, k=1), ClassificationModule(_CdistNet(), num_classes=3))


class _Poison(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_non_finite_curvature_mid_run_is_a_logged_skip_not_a_crash(tmp_path):
    callback = CurvatureSpectrum(schedule=1, k=1, lanczos_iterations=3, trace_matvecs=0, at_fit_end=False)
    logger = pl.loggers.CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(**fast_trainer_kwargs(max_steps=4, callbacks=[_Poison(), callback], logger=logger))
    with pytest.warns(UserWarning, match="skipped the measurement at step 2"):
        trainer.fit(tiny_module(), datamodule=TinyDataModule())
    assert trainer.global_step == 4
    assert [h["step"] for h in callback.history] == [0, 1]
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    skipped = {int(r["step"]): float(r["curvature/hessian/skipped"]) for r in rows
               if r.get("curvature/hessian/skipped")}
    assert skipped == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_ddp_ranks_agree_and_match_one_process_on_the_union(tmp_path):
    from tests.ddp import run_ddp

    ranks = run_ddp("tests.ddp_entries_curvature:measure_at_start", tmp_path)
    assert ranks[0]["world"] == 2
    assert ranks[0]["hessian"] == ranks[1]["hessian"] and ranks[0]["ggn"] == ranks[1]["ggn"]  # identical numbers
    module = tiny_module().double()
    with torch.no_grad():
        for p, values in zip(module.parameters(), ranks[0]["params"]):
            p.copy_(torch.tensor(values).view_as(p))
    union = [(torch.tensor(x, dtype=torch.float64), torch.tensor(y)) for r in ranks for x, y in r["probe"]]
    assert len({tuple(map(tuple, x.tolist())) for x, _ in union}) == 4  # 2 ranks x 2 disjoint batches
    h = dense_hessian(module, union)
    ggn, _ = dense_ggn_and_fisher(module, union)
    # float32 HVPs on each rank, Lanczos converged (30 steps, 139 dims): 1e-4 relative covers the rounding
    for name, dense in (("hessian", h), ("ggn", ggn)):
        top = torch.linalg.eigvalsh(dense).flip(0)
        assert ranks[0][name]["eig_0"] == pytest.approx(float(top[0]), rel=1e-4), name
        assert ranks[0][name]["eig_1"] == pytest.approx(float(top[1]), rel=1e-4), name


# ----------------------------------------------------------------------------------------- CLI, W&B, YAML
DEMO_SNIPPET = """
trainer:
  callbacks:
    - class_path: lightning_sgd.callbacks.CurvatureSpectrum
      init_args:
        schedule:
          class_path: lightning_sgd.schedules.LogSpaced
          init_args: {start: 0, end: 4000, per_decade: 3}
        operator: hessian
        k: 5
        trace_matvecs: 30
        frobenius_matvecs: 15
        density_runs: 2
        alignment: true
        probe_batch_size: 500
        time_budget: 20.0
"""


@pytest.mark.slow  # a CLI run with W&B start-up: ~20 s on an idle machine
def test_demo_yaml_snippet_logs_spectrum_density_and_alignment_to_wandb_and_csv(tmp_path):
    """The snippet proposed for recipes/mnist1d.yaml (scaled down), through the CLI (W&B offline + CSV)."""
    from lightning_sgd.cli import run
    from tests.wandb_reader import logged_keys

    REPO = Path(__file__).resolve().parents[1]
    snippet = tmp_path / "curvature.yaml"
    # the shared test machine is too slow for a wall-clock budget here (test_time_budget_... covers it)
    small = {"probe_batch_size: 500": "probe_batch_size: 100", "time_budget: 20.0": "time_budget: null",
             "k: 5": "k: 3\n        lanczos_iterations: 6\n        density_steps: 5",
             "trace_matvecs: 30": "trace_matvecs: 6",
             "frobenius_matvecs: 15": "frobenius_matvecs: 3", "density_runs: 2": "density_runs: 1"}
    text = DEMO_SNIPPET
    for old, new in small.items():
        assert old in text
        text = text.replace(old, new)
    snippet.write_text(text)
    cli = run(["fit", "--config", str(REPO / "recipes" / "mnist1d.yaml"), "--config", str(snippet),
               "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.limit_test_batches=1",
               "--data.init_args.num_train=200",
               "--data.init_args.num_val=100", "--data.init_args.num_test=100", "--data.init_args.batch_size=50"])
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CurvatureSpectrum))
    assert [h["step"] for h in callback.history] == [0, 1]
    wandb_logger = next(lg for lg in cli.trainer.loggers if not isinstance(lg, pl.loggers.CSVLogger))
    keys = logged_keys(wandb_logger.last_run_dir)
    for name in ("eig_0", "eig_2", "trace", "frobenius", "sharpness", "frobenius_bound", "alignment_corr",
                 "spectrum", "density", "alignment_table"):
        # W&B stores media under keys that start with the logged name (histogram fields, "<name>_table" for plots)
        assert any(k.startswith(f"curvature/hessian/{name}") for k in keys), name
    alignment = callback.last_result.alignment
    assert alignment.kind == ["eigenvector"] * 3 + ["random"] * 3 and alignment.num_examples == 100
