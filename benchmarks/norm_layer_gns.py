"""How well the noise scale of the normalization layers alone tracks the whole model's, along training.

Gray et al. 2024, "Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in
Transformers": the per-example gradient norms of the LayerNorm parameters are nearly free to compute (hooks on
those layers only) and their B_simple tracks the full model's. Here: the recipes' Transformer LM
(:class:`lightning_sgd.recipes.language.TransformerLM` in :class:`lightning_sgd.recipes.LanguageModelModule`, tied
output layer, small size) trained with Adam on tokens from a random sparse bigram process (each token has 4 likely
successors, so the loss falls well below log V). Every ``--every`` steps, on the training batch:

- full: per-example norms of every parameter (:func:`lightning_sgd.per_example.per_example_gradient_stats`, exact);
- norm: :func:`lightning_sgd.per_example_hooks.hook_gradient_stats` with ``layers="norm"`` (LayerNorm parameters
  only, one hooked backward), |ḡ|² over the same parameters;

each turned into (|G|², tr Σ) samples by the per-example estimator and smoothed by its own
:class:`lightning_sgd.noise_scale.NoiseScaleEMA`. Printed: both B_simple along training and their ratio
(norm / full), plus the cost of one norm-mode measurement relative to a plain forward+backward.

    python benchmarks/norm_layer_gns.py                 # 300 steps, ~5 min on one busy core
    python benchmarks/norm_layer_gns.py --quick         # 20 tiny steps: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from lightning_sgd.noise_scale import NoiseScaleEMA, per_example_estimate
from lightning_sgd.per_example import per_example_gradient_stats
from lightning_sgd.per_example_hooks import PerExampleNormHooks, hook_gradient_stats
from lightning_sgd.recipes import LanguageModelModule
from lightning_sgd.recipes.language import TransformerLM

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, save_results, summary_row  # noqa: E402

warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap over CPU attention: slow, exact


def bigram_tokens(vocab: int, n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) token ids from a random bigram chain: 4 likely successors per token (90% of the mass)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((vocab, vocab), 0.1 / vocab)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    probs.scatter_add_(1, successors, torch.full((vocab, 4), 0.9 / 4))
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=g).squeeze(1)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5, help="measure every this many steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.9, help="EMA decay per measurement")
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.batch, args.seq = 20, 2, 8, 8
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TransformerLM(vocab_size=args.vocab, d_model=args.d_model, num_heads=4, d_ff=4 * args.d_model,
                        num_layers=2, dropout=0.0, max_len=args.seq)
    module = LanguageModelModule(net)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    data = bigram_tokens(args.vocab, args.steps * args.batch, args.seq + 1, seed=1)
    hooks = PerExampleNormHooks(module, layers="norm")
    names = hooks.selected_parameter_names()
    params = dict(module.named_parameters())
    print(f"norm-layer parameters: {len(names)} tensors, {sum(params[n].numel() for n in names)} of "
          f"{sum(p.numel() for p in params.values())} weights", flush=True)
    ema = {"full": NoiseScaleEMA(args.beta), "norm": NoiseScaleEMA(args.beta)}
    rows, costs, agreement = [], [], []
    for step in range(args.steps):
        chunk = data[step * args.batch:(step + 1) * args.batch]
        batch = (chunk[:, :-1], chunk[:, 1:])
        if step % args.every == 0:
            full = per_example_gradient_stats(module, batch, per_layer=True)
            norm = hook_gradient_stats(module, batch, layers="norm")
            for name, stats in (("full", full), ("norm", norm)):
                g2 = sum(float(g.double().square().sum()) for g in stats.mean_grad)
                ema[name].update(per_example_estimate(stats.sq_norms, g2))
            layers = {n.rsplit(".", 1)[0] for n in names}  # the same quantity from the exact engine
            reference = sum(v for k, v in full.layer_sq_norms.items() if k in layers)
            agreement.append(float(((norm.sq_norms - reference).abs() / reference.abs().max()).max()))
            rows.append({"step": step, "b_full": ema["full"].b_simple, "b_norm": ema["norm"].b_simple,
                         "ratio": ema["norm"].b_simple / ema["full"].b_simple})
        if step % 10 == 0:  # cost of the norm mode on the training backward vs a plain one, side by side
            for mode in ("plain", "norm", "plain"):
                start = time.process_time()
                optimizer.zero_grad()
                if mode == "norm":
                    hooks.arm(args.batch)
                loss = module.loss(module(batch[0]), batch[1])
                loss.backward()
                if mode == "norm":
                    hooks.collect()
                costs.append((mode, time.process_time() - start))
        optimizer.zero_grad()
        loss = module.loss(module(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            last = rows[-1]
            print(f"step {step:4d} loss {loss.item():.3f}  B_simple full {last['b_full']:8.2f}  norm-layers "
                  f"{last['b_norm']:8.2f}  ratio {last['ratio']:.2f}", flush=True)
    plain = [c for m, c in costs if m == "plain"]
    normed = [c for m, c in costs if m == "norm"]
    cost_ratio = statistics.median(n / statistics.median(plain) for n in normed)
    second_half = [r["ratio"] for r in rows[len(rows) // 2:]]
    log_full = torch.tensor([r["b_full"] for r in rows[len(rows) // 2:]]).log()
    log_norm = torch.tensor([r["b_norm"] for r in rows[len(rows) // 2:]]).log()
    correlation = float(torch.corrcoef(torch.stack([log_full, log_norm]))[0, 1])
    summary = {"ratio_median_second_half": statistics.median(second_half),
               "log_b_correlation_second_half": correlation,
               "ratio_range_second_half": [min(second_half), max(second_half)],
               "norm_mode_cost_vs_plain_fwd_bwd": cost_ratio,
               "norm_mode_max_rel_err_vs_exact_engine": max(agreement)}
    print(f"\nratio norm/full B_simple over the second half: median {summary['ratio_median_second_half']:.2f}, "
          f"range {min(second_half):.2f}-{max(second_half):.2f}, correlation of log B_simple {correlation:.2f}; "
          f"norm-mode hooked fwd+bwd {cost_ratio:.3f}x a plain "
          f"one; norm-mode norms vs the exact engine: max rel err {max(agreement):.1e}")
    late = rows[len(rows) // 2:]
    rows_out = [summary_row("B_simple from the LayerNorm parameters only / the whole model's, recipes' Transformer LM, "
                            f"second half of training (median; correlation of log B_simple {correlation:.2f})",
                            f"{statistics.median(r['b_norm'] for r in late):.1f}",
                            f"whole model {statistics.median(r['b_full'] for r in late):.1f}",
                            summary["ratio_median_second_half"], "tracks (Gray et al. 2024)",
                            summary["ratio_range_second_half"]),
                summary_row("norm-layer hooks: hooked forward+backward / plain one, recipes' Transformer LM",
                            "layers='norm'", "plain forward+backward", cost_ratio, "near 1×")]
    path = save_results("norm_layer_gns", {"config": vars(args), "summary_figures": summary, "trajectory": rows},
                        args, summary=rows_out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
