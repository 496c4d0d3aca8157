"""Top-10 Hessian eigenvalues: lightning_sgd.curvature (hessian-eigenthings Lanczos) vs PyHessian, side by side.

For each workload, on the same probe batch, eval mode, same threads:

- ours: ``top_eigenvalues(make_operator(module, [batch]), k=10, max_iter=m, which="LM")`` — one Lanczos run,
  ``m`` Hessian-vector products (the library's HessianOperator: forward + double backward per product);
- PyHessian: ``hessian(model, criterion, data=batch).eigenvalues(top_n=10, maxIter=100, tol=1e-3)`` — deflated
  power iteration, one eigenvalue at a time (it reuses one gradient graph, so each of its products is cheaper);
- accuracy of both against a reference (Lanczos, 100 steps, untimed): max relative eigenvalue error over the 10
  and the max relative residual ‖Hv − λv‖/|λ| of the returned vectors.

Workloads: the MNIST-1D CNN (lightning_sgd.recipes.MNIST1DCNN, briefly trained on generated MNIST-1D) and a
ResNet-8 with batch norm for 32×32×3 inputs (lightning_sgd.recipes.CifarResNet, briefly trained on synthetic
CIFAR-shaped data: no download is possible here; the timing depends on shapes, not pixel values).

    python benchmarks/curvature_topk.py            # both workloads (a few minutes on 2 free CPU cores)
    python benchmarks/curvature_topk.py --workloads mnist1d_cnn --lanczos-steps 40
    python benchmarks/curvature_topk.py --quick    # smoke test: the CNN, k=3, short runs, results to a temp dir

Timing: benchmarks/_harness.py, ``--rounds`` rotated rounds of one run each, the speed-up taken per round and its
median reported (wall time with several threads, process CPU time with ``--threads 1``). Writes
benchmarks/results/curvature_topk.json.

Needs PyHessian (``pip install --no-deps pyhessian``: it requires only numpy and torch, any version).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_sgd.curvature import make_operator, top_eigenvalues
from lightning_sgd.recipes.classification import ClassificationModule

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, compare, save_results, summary_row  # noqa: E402


def _train(module: ClassificationModule, x: Tensor, y: Tensor, steps: int, lr: float, batch: int) -> None:
    """A few Adam steps so the spectrum is that of a network in training, not of its initialization."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    module.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        opt.zero_grad()
        module.loss(module(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    module.eval()


def mnist1d_workload(probe: int = 512) -> tuple[ClassificationModule, tuple[Tensor, Tensor]]:
    from lightning_sgd.data.mnist1d import generate_mnist1d
    from lightning_sgd.recipes.mnist_1d import MNIST1DCNN

    torch.manual_seed(0)
    x, y = generate_mnist1d(3000, seed=0)
    x = (x - x.mean()) / x.std()
    module = ClassificationModule(MNIST1DCNN(), num_classes=10)
    _train(module, x[probe:], y[probe:], steps=150, lr=1e-2, batch=100)
    return module, (x[:probe], y[:probe])


def cifar_resnet_workload(probe: int = 32) -> tuple[ClassificationModule, tuple[Tensor, Tensor]]:
    from lightning_sgd.recipes.vision import CifarResNet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 512 + probe
    y = torch.randint(0, 10, (n,), generator=g)
    means = torch.randn(10, 3, 1, 1, generator=g)  # class-dependent colour: learnable, CIFAR-shaped
    x = means[y] + torch.randn(n, 3, 32, 32, generator=g)
    module = ClassificationModule(CifarResNet(depth=8, batch_norm=True, num_classes=10), num_classes=10)
    _train(module, x[probe:], y[probe:], steps=15, lr=1e-2, batch=64)
    return module, (x[:probe], y[:probe])


WORKLOADS: dict[str, Callable[[], tuple[ClassificationModule, tuple[Tensor, Tensor]]]] = {
    "mnist1d_cnn": mnist1d_workload,
    "cifar_resnet8_bn": cifar_resnet_workload,
}


def _accuracy(op, values: Tensor, vectors: Tensor, reference: Tensor) -> tuple[float, float]:
    """Max relative eigenvalue error vs the reference (both sorted by magnitude) and max relative residual."""
    order = values.abs().argsort(descending=True)
    values, vectors = values[order], vectors[order]
    err = float(((values - reference) / reference).abs().max())
    res = max(float((op.matvec(v / v.norm()) - lam * v / v.norm()).norm() / abs(lam))
              for lam, v in zip(values.tolist(), vectors))
    return err, res


def run_ours(module: ClassificationModule, batch, k: int, steps: int):
    op = make_operator(module, [batch], "hessian")
    values, vectors, _, _, iterations = top_eigenvalues(op, k, max_iter=steps, which="LM", seed=0)
    return values, vectors, iterations


def run_pyhessian(module: ClassificationModule, batch, k: int, max_iter: int, tol: float):
    import importlib

    ph = importlib.import_module("pyhessian.hessian")  # the module (pyhessian.hessian is also the class's name)

    calls = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        h = ph.hessian(module.network, nn.CrossEntropyLoss(), data=batch, cuda=False)
        values, vectors = h.eigenvalues(top_n=k, maxIter=max_iter, tol=tol)
    finally:
        ph.hessian_vector_product = original
        for p in module.parameters():
            p.grad = None  # PyHessian leaves a create_graph gradient in .grad
    flat = torch.stack([torch.cat([t.flatten() for t in v]) for v in vectors])
    return torch.tensor(values), flat, calls["n"]


def time_both(module: ClassificationModule, batch, args: argparse.Namespace, clock: str):
    """The harness's figures for (ours, PyHessian) and each method's last eigenpairs and HVP count (every run is
    deterministic)."""
    outputs = {}
    configs = {
        "ours": lambda: outputs.__setitem__("ours", run_ours(module, batch, args.k, args.lanczos_steps)),
        "PyHessian": lambda: outputs.__setitem__("PyHessian", run_pyhessian(
            module, batch, args.k, args.pyhessian_max_iter, args.pyhessian_tol)),
    }
    return compare(configs, "PyHessian", rounds=args.rounds, repeats=1, warmup=0, clock=clock), outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--lanczos-steps", type=int, default=30, help="Krylov dimension of our Lanczos run")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--pyhessian-max-iter", type=int, default=100)
    parser.add_argument("--pyhessian-tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rotated rounds of (ours, PyHessian), one run each")
    add_output_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.k, args.lanczos_steps, args.reference_steps = ["mnist1d_cnn"], 3, 10, 20
        args.pyhessian_max_iter, args.rounds = 10, 1
    torch.set_num_threads(args.threads)
    clock = "cpu" if args.threads == 1 else "wall"  # CPU time of several threads counts their spinning

    print(f"# top-{args.k} Hessian eigenvalues, torch {torch.__version__}, {args.threads} threads, {args.rounds} "
          f"rotated rounds, {clock} clock")
    header = ("workload", "params", "probe", "method", "HVPs", "seconds", "max rel eig err", "max rel residual")
    rows, summary, figures = [], [], {"config": vars(args), "clock": clock}
    for name in args.workloads:
        module, batch = WORKLOADS[name]()
        module.eval()
        params = sum(p.numel() for p in module.parameters())
        op = make_operator(module, [batch], "hessian")
        ref_values, _, _, _, _ = top_eigenvalues(op, args.k, max_iter=args.reference_steps, which="LM", seed=1)
        reference = ref_values[ref_values.abs().argsort(descending=True)]
        timing, outputs = time_both(module, batch, args, clock)
        ours, theirs = (_accuracy(op, *outputs[m][:2], reference) for m in ("ours", "PyHessian"))
        t_ours, t_ph = timing["ours"][clock + "_s"], timing["PyHessian"][clock + "_s"]
        speedups = [1 / r for r in timing["ours"]["ratios"]]
        speedup = 1 / timing["ours"]["ratio"]
        rows.append((name, params, len(batch[1]), "lightning_sgd (Lanczos)", outputs["ours"][2], t_ours, *ours))
        rows.append((name, params, len(batch[1]), "PyHessian (power it.)", outputs["PyHessian"][2], t_ph, *theirs))
        print(f"{name}: reference top-{args.k}: {[round(v, 4) for v in reference.tolist()]}")
        print(f"{name}: speed-up {speedup:.1f}x per-round {' '.join(f'{x:.1f}' for x in speedups)} (PyHessian "
              f"{t_ph:.2f}s / ours {t_ours:.2f}s); max rel eig error ours {ours[0]:.1e} vs PyHessian {theirs[0]:.1e}",
              flush=True)
        figures[name] = {"params": params, "probe": len(batch[1]), "reference": reference.tolist(),
                         "ours": {"hvps": outputs["ours"][2], "max_rel_eig_err": ours[0], "max_rel_residual": ours[1]},
                         "pyhessian": {"hvps": outputs["PyHessian"][2], "max_rel_eig_err": theirs[0],
                                       "max_rel_residual": theirs[1]},
                         "speedup": speedup, "timing": timing}
        summary.append(summary_row(
            f"top-{args.k} Hessian eigenvalues, {name} ({params} params, probe {len(batch[1])}); speed-up "
            "(anchor time / ours)", f"Lanczos, {t_ours:.3g} s, max rel. error {ours[0]:.1e}",
            f"PyHessian, {t_ph:.3g} s, max rel. error {theirs[0]:.1e}", speedup, "≥ 2×",
            spread=[min(speedups), max(speedups)]))

    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        name, params, probe, method, hvps, seconds, err, res = row
        print(f"| {name} | {params} | {probe} | {method} | {hvps} | {seconds:.2f} | {err:.1e} | {res:.1e} |")
    path = save_results("curvature_topk", figures, args, summary=summary, packages=("pyhessian",))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
