"""The drop-in matrix: every callback and plugin on LightningModules nobody here wrote, under both Lightning packages.

Each cell (module kind x feature x package) runs a tiny fit (3 optimizer steps, every feature scheduled every step)
and asserts the outcome written in :data:`TABLE`: either the feature ran and measured (a finite value where the
feature exposes its results), or it refused before the first step with the documented error. A cell that should
work and raises fails, and so does a cell that should raise and works. Cells that do not apply (ghost batch norm on
a model without BatchNorm, EMA validation on a module without ``validation_step``) are not generated.

The modules are in :mod:`tests.user_modules`. ``GradStatsDDPStrategy`` is tested under DDP elsewhere
(tests/test_grad_stats_ddp.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from lightning_sgd.callbacks import CurvatureSpectrum, DeepBootstrap, GradientDiversity, GradientNoiseScale
from lightning_sgd.compat import package_of
from lightning_sgd.module_loss import ProtocolRequired, has_protocol
from lightning_sgd.plugins import (
    AdaptiveBatchSize,
    BatchSizeSchedule,
    EMAWeights,
    GhostBatchNorm,
    GhostBatchNormCallback,
    LRWarmupScaling,
)
from tests.user_modules import BATCH_SIZE, HAS_BATCHNORM, HAS_VALIDATION_STEP, KINDS, PACKAGES, make, make_datamodule

MAX_STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)

# Expected outcome per (kind, feature); the same under both packages.
#   ok      the fit runs MAX_STEPS optimizer steps and the feature's check (FEATURES[...].check) passes
#   manual  ValueError mentioning manual optimization, before the first step (the feature re-runs training_step,
#           which for a GAN steps two optimizers itself)
#   proto   lightning_sgd.module_loss.ProtocolRequired before the first step (the GGN needs the network's outputs
#           separately from the loss: split_batch/forward/loss)
#   linear  an error before the first step saying the loss is linear in the outputs (GGN of log-probabilities with
#           nll_loss: its Hessian in the outputs is zero, so the GGN would be silently zero)
#   -       does not apply; no cell (ghost BN without BatchNorm, validate="both" without validation_step)
TABLE = """
kind              gns    gns_split gns_bnoise div    curv   curv_ggn boot   ema ema_both warmup bs_sched adaptive ghost
boring            ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
transformer       ok     ok        ok         ok     ok     proto    ok     ok  -        ok     ok       ok       -
autoencoder       ok     ok        ok         ok     ok     proto    ok     ok  -        ok     ok       ok       -
hf_dict           ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
hf_batchencoding  ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
bert              ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
nanogpt           ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
nanogpt_tied      ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
bn_cnn            ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       ok
gru               ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
lstm              ok     ok        ok         ok     ok     proto    ok     ok  ok       ok     ok       ok       -
gan               manual manual    manual     manual manual proto    manual ok  manual   ok     ok       manual   ok
protocol_logits   ok     ok        ok         ok     ok     ok       ok     ok  ok       ok     ok       ok       -
protocol_logprobs ok     ok        ok         ok     ok     linear   ok     ok  ok       ok     ok       ok       -
"""


def _parse(table: str) -> dict[tuple[str, str], str]:
    header, *rows = [line.split() for line in table.strip().splitlines()]
    return {(row[0], feature): outcome for row in rows for feature, outcome in zip(header[1:], row[1:])}


EXPECTED = _parse(TABLE)

#: outcome -> (exception types, message pattern)
ERRORS: dict[str, tuple[tuple[type[BaseException], ...], str]] = {
    "manual": ((ValueError,), r"manual optimization"),
    "proto": ((ProtocolRequired,), r"split_batch"),
    "linear": ((ValueError, RuntimeError), r"linear"),
}


# --------------------------------------------------------------------------------------------------- features
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_gns(callbacks: list[Any], trainer: Any, module: Any) -> None:
    gns = callbacks[0]
    assert gns.measured >= 1, f"GradientNoiseScale never measured (skipped: {gns.skipped})"
    for key in ("gns/grad_sq_norm", "gns/trace_cov"):
        assert _finite(gns.last_metrics.get(key)), f"{key} missing or not finite: {gns.last_metrics}"


def _check_gns_auto(callbacks: list[Any], trainer: Any, module: Any) -> None:
    """``source="auto"`` on one device: per-example gradients, or the split source for models with BatchNorm."""
    _check_gns(callbacks, trainer, module)
    kind = type(module).__name__
    expected = "split" if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) \
        else "per_example"
    assert callbacks[0].source_in_use == expected, f"{kind}: measured with {callbacks[0].source_in_use}"


def _check_gns_split(callbacks: list[Any], trainer: Any, module: Any) -> None:
    _check_gns(callbacks, trainer, module)
    assert callbacks[0].source_in_use == "split"


def _check_gns_b_noise(callbacks: list[Any], trainer: Any, module: Any) -> None:
    _check_gns(callbacks, trainer, module)
    metrics = callbacks[0].last_metrics
    for key in ("gns/gHg", "gns/trace_h_cov"):
        assert _finite(metrics.get(key)), f"{key} missing or not finite: {metrics}, skipped {callbacks[0].skipped}"


def _check_diversity(callbacks: list[Any], trainer: Any, module: Any) -> None:
    div = callbacks[0]
    assert div.measured >= 1, f"GradientDiversity never measured (skipped: {div.skipped})"
    assert _finite(div.diversity) and div.diversity > 0, div.last_metrics


def _check_curvature(callbacks: list[Any], trainer: Any, module: Any) -> None:
    curv = callbacks[0]
    assert curv.history, "CurvatureSpectrum logged no measurement (every one was skipped)"
    assert curv.last_result is not None and curv.last_result.eigenvalues
    assert all(_finite(v) for v in curv.last_result.eigenvalues), curv.last_result.eigenvalues


def _check_bootstrap(callbacks: list[Any], trainer: Any, module: Any) -> None:
    boot = callbacks[0]
    assert boot.history, "DeepBootstrap made no measurement"
    last = boot.history[-1]
    for key in ("bootstrap/real_test_loss", "bootstrap/ideal_test_loss"):
        assert _finite(last.get(key)), f"{key} missing or not finite: {last}"


def _check_ema(callbacks: list[Any], trainer: Any, module: Any) -> None:
    ema = callbacks[0]
    assert ema.num_updates >= 2 and ema.last_decay is not None
    raw = ema.raw_state_dict()
    assert raw is not None, "fit ended without storing the raw weights (the EMA was never swapped in)"
    current = module.state_dict()
    assert any(not torch.equal(raw[k], current[k]) for k in raw), "the module does not hold the EMA weights"


def _check_ema_both(callbacks: list[Any], trainer: Any, module: Any) -> None:
    value = trainer.callback_metrics.get("val_ema/loss")
    assert value is not None and math.isfinite(float(value)), dict(trainer.callback_metrics)


def _check_warmup(callbacks: list[Any], trainer: Any, module: Any) -> None:
    warmup = callbacks[0]
    assert warmup.global_batch_size == BATCH_SIZE and warmup.scale == pytest.approx(BATCH_SIZE / 4)
    assert warmup.steps and min(warmup.steps) >= 1, warmup.steps


def _check_bs_schedule(callbacks: list[Any], trainer: Any, module: Any) -> None:
    schedule = callbacks[0]
    assert schedule.batch_size == 2 * BATCH_SIZE, schedule.history
    assert schedule.history[-1]["batch_size"] == 2 * BATCH_SIZE


def _check_adaptive(callbacks: list[Any], trainer: Any, module: Any) -> None:
    _check_gns(callbacks, trainer, module)
    decisions = [m for _, m in trainer.logger.metrics if "batch_size/target" in m]
    assert decisions, "AdaptiveBatchSize took no decision"
    # B_simple is +inf when the smoothed |G|² is <= 0 (pure noise); NaN would mean no usable estimate
    assert all(m["batch_size/b_simple"] > 0 for m in decisions), decisions


def _check_ghost_bn(callbacks: list[Any], trainer: Any, module: Any) -> None:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GhostBatchNorm) for m in norms), [type(m).__name__ for m in norms]


def _curvature(**kwargs: Any) -> CurvatureSpectrum:
    return CurvatureSpectrum(schedule=1, k=1, lanczos_iterations=3, trace_matvecs=0, at_fit_end=False, **kwargs)


@dataclass(frozen=True)
class Feature:
    """A column of the matrix: fresh callbacks for one fit, and what to check after it."""

    callbacks: Callable[[], list[Any]]
    check: Callable[[list[Any], Any, Any], None]
    data: str = "loader"  # "loader": the module's train loader; "val": plus a validation loader; "datamodule"
    recording_logger: bool = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


FEATURES: dict[str, Feature] = {
    "gns": Feature(lambda: [GradientNoiseScale(schedule=1)], _check_gns_auto),
    "gns_split": Feature(lambda: [GradientNoiseScale(schedule=1, source="split")], _check_gns_split),
    "gns_bnoise": Feature(lambda: [GradientNoiseScale(schedule=1, b_noise_schedule=1)], _check_gns_b_noise),
    "div": Feature(lambda: [GradientDiversity(schedule=1)], _check_diversity),
    "curv": Feature(lambda: [_curvature()], _check_curvature),
    "curv_ggn": Feature(lambda: [_curvature(operator="ggn")], _check_curvature),
    "boot": Feature(lambda: [DeepBootstrap(schedule=1, plot=False, max_eval_examples=16,
                                                max_train_eval_examples=16)], _check_bootstrap, data="datamodule"),
    "ema": Feature(lambda: [EMAWeights()], _check_ema),
    "ema_both": Feature(lambda: [EMAWeights(validate="both")], _check_ema_both, data="val",
                        trainer_kwargs=dict(limit_val_batches=2, val_check_interval=2)),
    "warmup": Feature(lambda: [LRWarmupScaling(reference_batch_size=BATCH_SIZE // 2, warmup_steps=2)], _check_warmup),
    "bs_sched": Feature(lambda: [BatchSizeSchedule(milestones=[1], factors=2, interval="step")], _check_bs_schedule),
    "adaptive": Feature(lambda: [GradientNoiseScale(schedule=1),
                                 AdaptiveBatchSize(max_batch_size=64, every_n_steps=1, start_step=1, hysteresis=0.0)],
                        _check_adaptive, recording_logger=True),
    "ghost": Feature(lambda: [GhostBatchNormCallback(ghost_batch_size=BATCH_SIZE // 2)], _check_ghost_bn),
}


def test_table_covers_every_kind_and_feature():
    """The table is the whole specification: one row per zoo kind, one column per feature, every cell decided,
    and "-" exactly where a feature does not apply."""
    rows = {kind for kind, _ in EXPECTED}
    columns = {feature for _, feature in EXPECTED}
    assert rows == set(KINDS) and columns == set(FEATURES)
    assert len(EXPECTED) == len(KINDS) * len(FEATURES)
    assert set(EXPECTED.values()) <= {"ok", "-", *ERRORS}
    for kind in KINDS:
        assert (EXPECTED[kind, "ghost"] == "-") == (kind not in HAS_BATCHNORM), kind
        # validate="both" needs validation to run, except where it is refused at setup anyway
        if EXPECTED[kind, "ema_both"] not in ERRORS:
            assert (EXPECTED[kind, "ema_both"] == "-") == (kind not in HAS_VALIDATION_STEP), kind


@pytest.mark.parametrize("package", PACKAGES)
def test_zoo_is_what_users_write(package: str) -> None:
    """The premise of the matrix: each zoo module is a LightningModule of the package under test, and only the two
    ``protocol_*`` kinds implement split_batch/forward/loss (BoringModel has ``forward`` and ``loss`` but no
    ``split_batch``; the README autoencoder's ``forward`` returns the embedding)."""
    for kind in KINDS:
        module, loader = make(kind, package)
        assert package_of(module).__name__ == package, kind
        assert has_protocol(module) == kind.startswith("protocol_"), kind
        assert next(iter(loader)) is not None


CELLS = [pytest.param(kind, feature, id=f"{kind}-{feature}")
         for (kind, feature), outcome in EXPECTED.items() if outcome != "-"]


# ------------------------------------------------------------------------------------------------------ running
def _recording_logger(package: str) -> Any:
    """A logger of ``package`` that keeps every ``log_metrics`` call in memory as ``(step, metrics)``."""
    base = importlib.import_module(f"{package}.loggers").Logger

    class RecordingLogger(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.metrics: list[tuple[int | None, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.metrics.append((step, {k: float(v) for k, v in metrics.items()}))

    return RecordingLogger()


def _trainer(package: str, callbacks: list[Any], logger: Any = False, **overrides: Any) -> Any:
    lightning = importlib.import_module(package)
    kwargs: dict[str, Any] = dict(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=logger,
                                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                  num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    kwargs.update(overrides)
    return lightning.Trainer(callbacks=callbacks, **kwargs)


def _fit_kwargs(feature: Feature, kind: str, package: str, loader: Any) -> dict[str, Any]:
    if feature.data == "datamodule":
        return {"datamodule": make_datamodule(kind, package)}
    if feature.data == "val":
        return {"train_dataloaders": loader, "val_dataloaders": make_datamodule(kind, package).val_dataloader()}
    return {"train_dataloaders": loader}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize(("kind", "feature_name"), CELLS)
def test_cell(kind: str, feature_name: str, package: str) -> None:
    expected = EXPECTED[kind, feature_name]
    feature = FEATURES[feature_name]
    torch.manual_seed(0)  # dropout masks and the GAN's noise: the same in every run, whatever ran before
    module, loader = make(kind, package)
    callbacks = feature.callbacks()
    logger = _recording_logger(package) if feature.recording_logger else False
    trainer = _trainer(package, callbacks, logger=logger, **feature.trainer_kwargs)
    fit_kwargs = _fit_kwargs(feature, kind, package, loader)
    if expected == "ok":
        trainer.fit(module, **fit_kwargs)
        assert trainer.global_step >= MAX_STEPS, f"the fit stopped at step {trainer.global_step}"
        feature.check(callbacks, trainer, module)
    else:
        types, pattern = ERRORS[expected]
        with pytest.raises(types, match=pattern):
            trainer.fit(module, **fit_kwargs)
        assert trainer.global_step == 0, "refused only after training had started"


# --------------------------------------------------------------------------------------- training is unchanged
_OURS = ("gns/", "diversity/", "curvature/", "diag/")


def _train(kind: str, package: str, callbacks: list[Any]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Final ``state_dict`` and the user's own logged metrics ``[(step, {key: value})]`` of a 4-step seeded fit."""
    importlib.import_module(package).seed_everything(0, verbose=False)
    module, loader = make(kind, package)
    logger = _recording_logger(package)
    _trainer(package, callbacks, logger=logger, max_steps=4).fit(module, train_dataloaders=loader)
    user = [(step, {k: v for k, v in m.items() if not k.startswith(_OURS)}) for step, m in logger.metrics]
    return module.state_dict(), [(step, m) for step, m in user if m]


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("kind", ["autoencoder", "hf_dict", "bert"])
def test_measurements_leave_training_bit_identical(kind: str, package: str) -> None:
    """GNS (per-example and B_noise) + diversity + Hessian curvature on every step: the final weights are
    bit-identical to a run without them, and the user's own ``self.log`` values are unchanged step for step."""
    plain_state, plain_logs = _train(kind, package, [])
    gns = GradientNoiseScale(schedule=1, b_noise_schedule=1)
    diversity = GradientDiversity(schedule=1)
    curvature = _curvature()
    measured_state, measured_logs = _train(kind, package, [gns, diversity, curvature])

    assert gns.measured == 4 and diversity.measured == 4 and len(curvature.history) >= 4  # they did measure
    changed = _changed(plain_state, measured_state)
    assert not changed, f"measuring changed the trained weights: {changed}"
    assert any("train_loss" in m for _, m in plain_logs), plain_logs
    assert measured_logs == plain_logs


def test_bit_identity_catches_a_callback_that_draws_random_numbers() -> None:
    """Control for the test above: one ``torch.rand`` per step outside a forked RNG changes the dropout masks of
    the HF-style module, so its trained weights and logged loss differ."""
    package = "lightning.pytorch"
    callback_base = importlib.import_module(f"{package}.callbacks").Callback

    class DrawsRandomNumbers(callback_base):  # type: ignore[misc,valid-type]
        def on_train_batch_start(self, *args: Any) -> None:
            torch.rand(1)

    plain_state, plain_logs = _train("hf_dict", package, [])
    leaky_state, leaky_logs = _train("hf_dict", package, [DrawsRandomNumbers()])
    assert _changed(plain_state, leaky_state) and leaky_logs != plain_logs
