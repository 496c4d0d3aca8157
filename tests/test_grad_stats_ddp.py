"""GradStatsDDPStrategy: norms from the comm hook against gradients computed by hand on each rank (2-process gloo)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DistributedSampler

from tests.ddp import run_ddp

CONFIGS = ["plain", "bucket_view", "static_graph", "accumulate", "bf16", "fp16_scaler", "fp16_hook", "powersgd",
           "every2"]


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One DDP job, nine short fits (2 optimizer steps each, "every2": 3; per-device batch 8)."""
    return run_ddp("tests.ddp_entries_grad_stats:norms_by_hand", tmp_path_factory.mktemp("by_hand"), configs=CONFIGS,
                   steps=2, batch_size=8)


def assert_record_matches(record: dict, step: int, grads: list[torch.Tensor]) -> None:
    """A rank's published record at ``step`` against the two ranks' local gradients ``grads`` computed by hand:
    local squared norms, the all-reduced gradient (their mean) and its squared norm (float32 norms: 1e-5)."""
    assert record["stats_step"] == record["step"] == step
    torch.testing.assert_close(torch.tensor(record["local_sq_norms"], dtype=torch.float64),
                               torch.stack([g @ g for g in grads]), rtol=1e-5, atol=0)
    reduced = torch.tensor(record["reduced_grad"], dtype=torch.float64)
    torch.testing.assert_close(reduced, (grads[0] + grads[1]) / 2, rtol=1e-5, atol=1e-7)
    assert record["global_sq_norm"] == pytest.approx(float(reduced @ reduced), rel=1e-5)


def _local_grads(ranks: list[dict], config: str, step: int, micro: int) -> list[torch.Tensor]:
    """Each rank's mean-loss gradient of optimizer step ``step``: the mean of its micro-batch gradients (Lightning
    divides the loss by accumulate_grad_batches, so the accumulated .grad is that mean)."""
    return [torch.tensor(r[config]["micro"][step * micro:(step + 1) * micro], dtype=torch.float64).mean(0)
            for r in ranks]


# Tolerances: fp32 gradients of a 139-parameter MLP, norms summed bucket by bucket in a different order than the
# hand dot product: relative error ~1e-7, so 1e-5 fails on any real mistake (a missing bucket, a factor W, a
# norm taken after averaging) while passing rounding. bf16 / fp16 autocast: the hand gradient runs the same
# autocast ops but low-precision matmuls may round differently (fp16: the scaled loss is backpropagated): 1e-3
# (bf16 itself changes the norms by ~1%, see below). fp16_scaler: GradScaler(init_scale=1024) on CPU, so a
# missing unscale would be off by 1024² and a norm read after the scaler's update by a factor 4.
@pytest.mark.parametrize("config", CONFIGS)
def test_local_and_global_norms_match_hand_gradients(by_hand: list[dict], config: str) -> None:
    micro = 2 if config in ("accumulate", "every2") else 1
    rtol = 1e-3 if config in ("bf16", "fp16_scaler") else 1e-5
    for step in range(3 if config == "every2" else 2):
        grads = _local_grads(by_hand, config, step, micro)  # [(P,), (P,)]
        expected_local = torch.stack([g @ g for g in grads])  # (W,)
        if config == "every2" and step == 1:  # not measured: the record stays step 0's, DDP still averages
            assert [r[config]["steps"][1]["stats_step"] for r in by_hand] == [0, 0]
            reduced = torch.tensor(by_hand[0][config]["steps"][1]["reduced_grad"], dtype=torch.float64)
            torch.testing.assert_close(reduced, (grads[0] + grads[1]) / 2, rtol=1e-5, atol=1e-7)
            continue
        for rank in range(2):
            record = by_hand[rank][config]["steps"][step]
            assert record["stats_step"] == record["step"] == step
            torch.testing.assert_close(torch.tensor(record["local_sq_norms"], dtype=torch.float64), expected_local,
                                       rtol=rtol, atol=0)
            reduced = torch.tensor(record["reduced_grad"], dtype=torch.float64)  # the .grad the optimizer sees
            torch.testing.assert_close(torch.tensor(record["global_sq_norm"], dtype=torch.float64), reduced @ reduced,
                                       rtol=1e-5, atol=0)
            assert record["local_batch_size"] == 8 * micro
            assert record["global_batch_size"] == 2 * 8 * micro
        mean = (grads[0] + grads[1]) / 2
        reduced = torch.tensor(by_hand[0][config]["steps"][step]["reduced_grad"], dtype=torch.float64)
        if config == "fp16_hook":
            # the wrapped fp16 hook ran: the .grad is exactly the fp16 average (each half(g_r)/2 summed in fp16)
            fp16_mean = sum((g.float().half() / 2).float() for g in grads).half().double()
            torch.testing.assert_close(reduced, fp16_mean, rtol=0, atol=0)
            assert not torch.allclose(reduced, mean, rtol=0, atol=1e-7)
        elif config == "powersgd" and step == 1:
            # PowerSGD compresses from its iteration 1 on: rank-1 approximation, visibly not the mean
            assert (reduced - mean).abs().max() > 1e-4
        else:
            torch.testing.assert_close(reduced, mean, rtol=1e-5, atol=1e-7)


def test_each_config_ran_the_measuring_path_it_is_meant_to_cover(by_hand: list[dict]) -> None:
    """Without a user hook DDP keeps its own all-reduce and the norms come from ``.grad`` at the end of backward;
    a user hook or gradient_as_bucket_view (``.grad`` is the bucket being all-reduced) takes the comm-hook path."""
    for config in CONFIGS:
        hooked = config in ("bucket_view", "fp16_hook", "powersgd")
        assert by_hand[0][config]["recorder"] == ("_BucketNormRecorder" if hooked else "_BackwardEndRecorder")


def test_bf16_autocast_changes_norms_only_by_rounding(by_hand: list[dict]) -> None:
    """Same data and init as "plain": bf16 autocast on CPU has no loss scaler, norms differ by bf16 rounding only."""
    plain = torch.tensor(by_hand[0]["plain"]["steps"][0]["local_sq_norms"])
    bf16 = torch.tensor(by_hand[0]["bf16"]["steps"][0]["local_sq_norms"])
    torch.testing.assert_close(bf16, plain, rtol=3e-2, atol=0)  # bf16 has 8 mantissa bits: ~0.4% per op


def test_warnings_only_for_hooks_that_change_the_gradient(by_hand: list[dict]) -> None:
    for config in ["plain", "bucket_view", "static_graph", "accumulate", "bf16", "fp16_scaler", "fp16_hook", "every2"]:
        assert by_hand[0][config]["warnings"] == []
    assert any("compressed" in w and "powerSGD_hook" in w for w in by_hand[0]["powersgd"]["warnings"])


def test_strategy_validates_arguments() -> None:
    from lightning_sgd.plugins import GradStatsDDPStrategy

    with pytest.raises(ValueError, match="max_logged_ranks"):
        GradStatsDDPStrategy(max_logged_ranks=-1)
    with pytest.raises(ValueError, match="every_n_steps"):
        GradStatsDDPStrategy(every_n_steps=0)
    assert GradStatsDDPStrategy().latest_grad_stats is None


def test_b_simple_from_strategy_matches_single_process_per_example(tmp_path) -> None:
    """GradientNoiseScale on the strategy's record (2 ranks × 64) vs the per-example estimator on the same global
    batches of 128 in one process, at the same (fixed, lr = 0)
    parameters, 200 fresh batches, same EMA (beta 0.99: ~150 effective samples).

    Both are unbiased per-step samples of the same |G|² and tr Σ; they share |ḡ_B|² and differ only in how the
    small-batch norm is estimated (2 local gradients vs 128 per-example gradients), so their per-step difference is
    pure sampling noise. Tolerance: 4 standard errors of B_ddp − B_pe from the delta method on the paired per-step
    differences with the EMA weights (a false failure under the normal approximation has probability < 1e-4). The
    same check rejects the estimate one gets if the strategy misreported its local batch size by 2×.
    """
    from lightning_sgd.noise_scale import per_example_estimate, two_batch_estimate
    from lightning_sgd.per_example import per_example_gradient_stats
    from tests.helpers import classification_data, tiny_module

    steps, b, beta, world = 200, 64, 0.99, 2
    ranks = run_ddp("tests.ddp_entries_grad_stats:gns_from_strategy", tmp_path, steps=steps, batch_size=b, beta=beta)
    assert ranks[0]["measured"] == ranks[1]["measured"] == steps
    x, y = classification_data(steps * b * world)
    module = tiny_module(lr=0.0)
    # Lightning gives each rank a DistributedSampler(shuffle=True, seed=0) over the training set (epoch 0)
    order = [list(DistributedSampler(range(len(x)), num_replicas=world, rank=r, shuffle=True, seed=0))
             for r in range(world)]
    ddp = torch.tensor(ranks[0]["samples"], dtype=torch.float64)  # (steps, 4): |G|², tr Σ, b, B
    n_params = sum(p.numel() for p in module.parameters())
    # every example's full gradient at the fixed parameters, in one engine call: projections on the basis vectors
    per_example = per_example_gradient_stats(module, (x, y), directions=torch.eye(n_params),
                                             chunk_size=4096).projections  # (n, P)
    pe = []
    for t in range(steps):
        rank_idx = [order[r][t * b:(t + 1) * b] for r in range(world)]
        for r in range(world):  # the batches each rank really saw
            assert ranks[r]["batch_sums"][t] == pytest.approx(float(x[rank_idx[r]].double().sum()), rel=1e-9)
        grads = per_example[sum(rank_idx, [])]  # (2 × 64, P): the global batch
        sample = per_example_estimate(grads.square().sum(1), grads.mean(0).square().sum())
        pe.append([sample.grad_sq_norm, sample.trace_cov])
    pe_t = torch.tensor(pe, dtype=torch.float64)  # (steps, 2)
    assert (ddp[:, 2] == b).all() and (ddp[:, 3] == b * world).all()
    w = (1 - beta) * beta ** torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    w = w / w.sum()  # the bias-corrected EMA's weights
    g_pe, tr_pe = (w[:, None] * pe_t).sum(0)
    b_pe = float(tr_pe / g_pe)
    b_ddp = ranks[0]["b_simple"]
    assert b_ddp == pytest.approx(float((w * ddp[:, 1]).sum() / (w * ddp[:, 0]).sum()), rel=1e-9)
    assert ranks[1]["b_simple"] == pytest.approx(b_ddp, rel=1e-12)  # every rank holds the same record
    e = (ddp[:, 1] - pe_t[:, 1]) / g_pe - tr_pe * (ddp[:, 0] - pe_t[:, 0]) / g_pe**2  # linearised B difference
    se = float(torch.sqrt((w**2 * e**2).sum()))
    print(f"B_simple: strategy {b_ddp:.3f}, per-example {b_pe:.3f}, SE {se:.3f}")
    assert abs(b_ddp - b_pe) <= 4 * se, (b_ddp, b_pe, se)
    assert se < 0.25 * b_pe  # the check is informative: the tolerance is a fraction of B itself

    # Power: with the local batch size misreported as b / 2 the same data give a B outside the tolerance.
    small = ddp[:, 0] + ddp[:, 1] / b  # mean local |g_b|², recovered from the sample
    big = ddp[:, 0] + ddp[:, 1] / (b * world)  # |g_B|²
    wrong = [two_batch_estimate(float(s), b / 2, float(B), b * world) for s, B in zip(small, big)]
    b_wrong = float(sum(wi * s.trace_cov for wi, s in zip(w, wrong))
                    / sum(wi * s.grad_sq_norm for wi, s in zip(w, wrong)))
    print(f"B_simple with local batch misreported: {b_wrong:.3f}")
    assert abs(b_wrong - b_pe) > 4 * se, (b_wrong, b_pe, se)


def test_plugins_and_measurement_callbacks_run_under_the_strategy(tmp_path) -> None:
    """One fit with ghost BN (ghost size 4 of per-device 8), EMA weights, GradientNoiseScale, GradientDiversity,
    CurvatureSpectrum and DeepBootstrap under GradStatsDDPStrategy: the record still equals hand-computed norms
    (ghost-BN forward on a copy of the network, fp32: rtol 1e-5) and every callback measured, rank-consistently."""
    steps = 4
    ranks = run_ddp("tests.ddp_entries_grad_stats:plugins_and_callbacks", tmp_path, steps=steps)
    for r in ranks:
        assert r["ghost"]
        assert len(r["steps"]) == steps
    for t in range(steps):
        grads = [torch.tensor(r["local"][t], dtype=torch.float64) for r in ranks]
        for r in ranks:
            assert_record_matches(r["steps"][t], t, grads)
    assert ranks[0]["final_weights"] == ranks[1]["final_weights"]  # EMA weights, copied in at the end of fit
    assert ranks[0]["gns_measured"] == ranks[1]["gns_measured"] == steps
    assert ranks[0]["gns_b_simple"] == ranks[1]["gns_b_simple"]
    assert 0.0 < ranks[0]["diversity"]["diversity/value"] <= 1.0
    assert len(ranks[0]["curvature"]) == 3 and ranks[0]["curvature"] == ranks[1]["curvature"]
    assert [h["step"] for h in ranks[0]["bootstrap"]] == [0.0, 2.0, 4.0]


def test_per_rank_norms_are_logged(by_hand: list[dict], tmp_path_factory: pytest.TempPathFactory) -> None:
    """``ddp/local_grad_norm_rank{r}`` and ``ddp/global_grad_norm`` reach the logger: √ of the record, every step."""
    import csv

    path = next(tmp_path_factory.getbasetemp().glob("by_hand*/plain/version_0/metrics.csv"))
    rows = [row for row in csv.DictReader(path.open()) if row.get("ddp/global_grad_norm")]
    assert [int(row["step"]) for row in rows] == [0, 1]
    for row, record in zip(rows, by_hand[0]["plain"]["steps"]):
        for r in range(2):
            assert float(row[f"ddp/local_grad_norm_rank{r}"]) == pytest.approx(record["local_sq_norms"][r] ** 0.5,
                                                                               rel=1e-6)
        assert float(row["ddp/global_grad_norm"]) == pytest.approx(record["global_sq_norm"] ** 0.5, rel=1e-6)
        assert float(row["ddp/local_grad_norm_max"]) == pytest.approx(max(record["local_sq_norms"]) ** 0.5, rel=1e-6)


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path) -> None:
    """2 nodes × 1 process: scripts/two_node_loopback.sh starts two torchrun agents (node ranks 0 and 1) on
    127.0.0.1; each node's rank publishes both ranks' norms, equal to the hand-computed ones (fp32: rtol 1e-5)."""
    import os
    import socket
    import subprocess
    import sys

    from tests.ddp import REPO_ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MASTER_PORT": str(port), "WANDB_MODE": "offline"}
    cmd = ["bash", str(REPO_ROOT / "scripts" / "two_node_loopback.sh"), sys.executable, "-m", "tests.ddp",
           "tests.ddp_entries_grad_stats:two_nodes", str(tmp_path), "{}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["environment"] == "TorchElasticEnvironment" for r in ranks)
    for t in range(2):
        grads = [torch.tensor(r["micro"][t], dtype=torch.float64) for r in ranks]
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r["steps"][t]["local_sq_norms"], dtype=torch.float64),
                                       torch.stack([g @ g for g in grads]), rtol=1e-5, atol=0)
            reduced = torch.tensor(r["steps"][t]["reduced_grad"], dtype=torch.float64)
            torch.testing.assert_close(reduced, (grads[0] + grads[1]) / 2, rtol=1e-5, atol=1e-7)
