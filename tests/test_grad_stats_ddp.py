"""GradStatsDDPStrategy: norms from the comm hook against gradients computed by hand on each rank (2-process gloo)."""

from __future__ import annotations

import pytest
import torch

from tests.ddp import run_ddp

CONFIGS = ["plain", "accumulate", "bf16", "fp16_hook", "powersgd"]


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One DDP job, five short fits (2 optimizer steps each, per-device batch 8)."""
    return run_ddp("tests.ddp_entries_grad_stats:norms_by_hand", tmp_path_factory.mktemp("by_hand"), configs=CONFIGS,
                   steps=2, batch_size=8)


def _local_grads(ranks: list[dict], config: str, step: int, micro: int) -> list[torch.Tensor]:
    """Each rank's mean-loss gradient of optimizer step ``step``: the mean of its micro-batch gradients (Lightning
    divides the loss by accumulate_grad_batches, so the accumulated .grad is that mean)."""
    return [torch.tensor(r[config]["micro"][step * micro:(step + 1) * micro], dtype=torch.float64).mean(0)
            for r in ranks]


# Tolerances: fp32 gradients of a 139-parameter MLP, norms summed bucket by bucket in a different order than the
# hand dot product: relative error ~1e-7, so 1e-5 fails on any real mistake (a missing bucket, a factor W, a
# norm taken after averaging) while passing rounding. bf16: the hand gradient runs the same autocast ops but
# bf16 matmuls may accumulate in a different order: 1e-3 (bf16 itself changes the norms by ~1%, see below).
@pytest.mark.parametrize("config", CONFIGS)
def test_local_and_global_norms_match_hand_gradients(by_hand: list[dict], config: str) -> None:
    micro = 2 if config == "accumulate" else 1
    rtol = 1e-3 if config == "bf16" else 1e-5
    for step in range(2):
        grads = _local_grads(by_hand, config, step, micro)  # [(P,), (P,)]
        expected_local = torch.stack([g @ g for g in grads])  # (W,)
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


def test_bf16_autocast_changes_norms_only_by_rounding(by_hand: list[dict]) -> None:
    """Same data and init as "plain": bf16 autocast on CPU has no loss scaler, norms differ by bf16 rounding only."""
    plain = torch.tensor(by_hand[0]["plain"]["steps"][0]["local_sq_norms"])
    bf16 = torch.tensor(by_hand[0]["bf16"]["steps"][0]["local_sq_norms"])
    torch.testing.assert_close(bf16, plain, rtol=3e-2, atol=0)  # bf16 has 8 mantissa bits: ~0.4% per op


def test_warnings_only_for_hooks_that_change_the_gradient(by_hand: list[dict]) -> None:
    for config in ["plain", "accumulate", "bf16", "fp16_hook"]:
        assert by_hand[0][config]["warnings"] == []
    assert any("compressed" in w and "powerSGD_hook" in w for w in by_hand[0]["powersgd"]["warnings"])


def test_strategy_validates_arguments() -> None:
    from lightning_sgd.plugins import GradStatsDDPStrategy

    with pytest.raises(ValueError, match="max_logged_ranks"):
        GradStatsDDPStrategy(max_logged_ranks=-1)
    assert GradStatsDDPStrategy().latest_grad_stats is None
