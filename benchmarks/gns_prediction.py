"""Does the gradient noise scale predict the critical batch size? Three sweeps, one table.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training": B_crit, the batch size where steps and
examples to a target trade off evenly, is predicted by the noise scale B_noise = tr(HΣ)/(GᵀHG), itself approximated
by B_simple = tr Σ/|G|². ``lightning-sgd sweep`` measures both in every trial; this script runs the three
workloads' sweeps (or reads their results when they already ran) and prints the table: workload, the B_crit of the
S(B) fit with its bootstrap interval, B_simple and B_noise at the step the target is reached, and their ratios.

Workloads (all offline, CPU):

- MNIST-1D CNN (``recipes/mnist1d_sweep.yaml``) and MNIST-1D MLP (``recipes/mnist1d_mlp_sweep.yaml``);
- a small Transformer language model on generated text (``recipes/markov_lm_sweep.yaml``): an order-2 Markov chain
  over 32 words whose transition rows are drawn from a sparse Dirichlet, written as PTB-style files by
  :func:`write_markov_corpus` (so the recipe is the PTB one with another folder); its exact per-token entropy is
  known, which fixes the target loss (entropy + a margin).

    python benchmarks/gns_prediction.py [--out runs/gns_prediction] [--only mnist1d mnist1d_mlp markov_lm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "mnist1d": ("MNIST-1D CNN", "recipes/mnist1d_sweep.yaml"),
    "mnist1d_mlp": ("MNIST-1D MLP", "recipes/mnist1d_mlp_sweep.yaml"),
    "markov_lm": ("Transformer LM, Markov text", "recipes/markov_lm_sweep.yaml"),
}
CORPUS = ".data/markov_text"


def write_markov_corpus(root: str | Path, vocab: int = 32, concentration: float = 0.1, end_prob: float = 0.05,
                        tokens: tuple[int, int, int] = (200_000, 20_000, 20_000), seed: int = 0) -> dict[str, float]:
    """Write ``ptb.{train,valid,test}.txt`` sampled from an order-2 Markov chain; return each split's exact mean
    negative log-likelihood per token under the chain (nats; ``<eos>`` included), the loss of a perfect model.

    Words are ``w0``..``w{vocab-1}``; every position ends the sentence with probability ``end_prob`` (the PTB loader
    appends ``<eos>``); a sentence starts from the context (start, start). Transition rows: Dirichlet(concentration)
    over the words, so most contexts have a few likely successors."""
    rng = np.random.default_rng(seed)
    start = vocab  # the context index of "sentence start"
    rows = rng.dirichlet(np.full(vocab, concentration), size=(vocab + 1, vocab + 1))  # (prev2, prev1) -> next
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    nll = {}
    for split, n in zip(("train", "valid", "test"), tokens):
        lines, words, total, count = [], [], 0.0, 0
        a = b = start
        while count < n:
            if words and rng.random() < end_prob:  # <eos>: its probability is end_prob
                lines.append(" ".join(words))
                total -= math.log(end_prob)
                count += 1
                words, a, b = [], start, start
                continue
            p = rows[a, b]
            w = int(rng.choice(vocab, p=p))
            total -= math.log((1.0 - end_prob) if words else 1.0) + math.log(p[w])
            count += 1
            words.append(f"w{w}")
            a, b = b, w
        if words:
            lines.append(" ".join(words))
        (root / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
        nll[split] = total / count
    return nll


def table(results: dict[str, dict]) -> str:
    head = (f"{'workload':30s} {'B_crit (fit)':>12s} {'95% interval':>18s} {'B_simple':>9s} {'B_noise':>9s} "
            f"{'Bs/Bcrit':>8s} {'Bn/Bcrit':>8s}")
    lines = [head]
    for name, summary in results.items():
        fit, gns = summary["fit"], summary["gns"]
        boot = fit.get("bootstrap") or {}
        crit = f"{fit['b_crit']:.0f}" if fit.get("ok") else "no fit"
        interval = f"[{boot['low']:.0f}, {boot['high']:.0f}]" if boot.get("ok") else "-"

        def num(key: str, fmt: str = ".0f", gns: dict = gns) -> str:
            value = gns.get(key)
            return "-" if value is None else f"{value:{fmt}}"

        lines.append(f"{WORKLOADS[name][0]:30s} {crit:>12s} {interval:>18s} {num('b_simple_at_target'):>9s} "
                     f"{num('b_noise_at_target'):>9s} {num('ratio_b_simple_at_target', '.2f'):>8s} "
                     f"{num('ratio_b_noise_at_target', '.2f'):>8s}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gns_prediction", help="one sweep folder per workload under this")
    parser.add_argument("--only", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    from lightning_sgd.cli import run as cli_run

    if "markov_lm" in args.only:
        nll = write_markov_corpus(CORPUS)
        print(f"Markov text in {CORPUS}: exact loss of the true chain, nats/token: "
              + ", ".join(f"{k} {v:.4f}" for k, v in nll.items()), flush=True)
    results = {}
    for name in args.only:
        out = os.path.join(args.out, name)
        summary = cli_run(["sweep", "--sweep", str(REPO / WORKLOADS[name][1]), f"--sweep.output_dir={out}",
                           "--no_progress=true"])
        results[name] = summary
    print(table(results))
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({k: {"fit": v["fit"], "gns": v["gns"]} for k, v in results.items()}, f, indent=2)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
