"""Per-example gradient norms: our layer hooks, our vmap engine and our default against Opacus and BackPACK.

Each method computes, from one batch, every example's squared gradient norm |∇ℓ_i|² and the batch gradient (what a
training step needs anyway). Its time is divided by that of a plain forward+backward of the same batch, side by side
(benchmarks/_harness.py: one torch thread, rotated rounds, per-round ratios, medians, spread):

- ``hooks``: :class:`lightning_sgd.per_example_hooks.PerExampleNormHooks` on the training backward;
- ``vmap``: :func:`lightning_sgd.per_example.per_example_gradient_stats` (a forward+backward per example under vmap);
- ``default``: whichever of the two :func:`lightning_sgd.per_example_hooks.choose_engine` picks on this batch (the
  choice is printed); what ``GradientNoiseScale(engine="auto")`` should run;
- ``opacus_ghost``: Opacus's ``GradSampleModuleFastGradientClipping`` (ghost clipping's norm pass, one backward);
- ``opacus_gsm``: Opacus's ``GradSampleModule`` (materialized per-example gradients, then their norms);
- ``backpack``: BackPACK's ``BatchL2Grad``.

Before any timing every method runs in float64 on 4 examples and is compared with brute force (one autograd call
per example); a method that cannot run a model, or disagrees, is reported with the reason and not timed. Opacus and
BackPACK are benchmark-only dependencies (``pip install --no-deps opacus backpack-for-pytorch einops unfoldNd``).

Models: the MNIST-1D CNN (B=128), ResNet-8 without BN (B=64, 32×32), a Transformer LM with an untied output layer
(B=64 sequences of 32 tokens; recipes' TransformerLM blocks at d_model 128, 4 heads, d_ff 512, 2 layers,
vocabulary 2048, no dropout), and ResNet-8 with BatchNorm in eval mode (B=64).

    python benchmarks/per_example_norms.py                      # all models, ~10 min on one busy core
    python benchmarks/per_example_norms.py --models resnet8 --rounds 5
    python benchmarks/per_example_norms.py --quick              # 8 examples, one round: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_sgd.per_example import per_example_gradient_stats
from lightning_sgd.per_example_hooks import PerExampleNormHooks, choose_engine
from lightning_sgd.recipes import MNIST1DCNN
from lightning_sgd.recipes.language import TransformerLM
from lightning_sgd.recipes.vision import CifarResNet, resnet8

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import add_output_options, compare, save_results, summary_row  # noqa: E402

warnings.filterwarnings("ignore")
METHODS = ("plain", "hooks", "vmap", "default", "opacus_ghost", "opacus_gsm", "backpack")


class UntiedTransformerLM(TransformerLM):
    """The recipes' TransformerLM with its own output layer instead of the tied ``x @ embed.weight.T``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head = nn.Linear(self.d_model, self.vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, V)
        t = tokens.shape[-1]
        x = self.drop(self.embed(tokens) * math.sqrt(self.d_model) + self.positions[:t])
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Task(nn.Module):
    """A network and its mean cross-entropy loss, in the split_batch/forward/loss protocol of ModuleLoss."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def split_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch[0], batch[1]

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy(outputs, targets)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean over examples (and tokens: the same number per example), logits (B, C) or (B, T, C)."""
    if outputs.dim() == 3:
        return F.cross_entropy(outputs.transpose(1, 2), targets)  # (B, C, T): BackPACK's layout too
    return F.cross_entropy(outputs, targets)


def make_model(name: str, batch: int, dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """(network, (inputs, targets)) with random data of the model's shapes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mnist1d_cnn":
        net, x, y = MNIST1DCNN(), torch.randn(batch, 40, generator=g), torch.randint(0, 10, (batch,), generator=g)
    elif name in ("resnet8", "resnet8_bn_eval"):
        net = resnet8() if name == "resnet8" else CifarResNet(depth=8, batch_norm=True)
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        if name == "resnet8_bn_eval":
            with torch.no_grad():  # running statistics as after some training, then eval mode
                for m in net.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.2, 0.2, generator=g)
                        m.running_var.uniform_(0.5, 2.0, generator=g)
                        m.weight.uniform_(0.5, 1.5, generator=g)
                        m.eval()
    elif name == "transformer_lm":
        net = UntiedTransformerLM(vocab_size=2048, d_model=128, num_heads=4, d_ff=512, num_layers=2, dropout=0.0,
                                  max_len=32)
        x = torch.randint(0, 2048, (batch, 32), generator=g)
        y = x.roll(-1, 1)
    else:
        raise ValueError(f"unknown model {name!r}")
    return net.to(dtype), (x.to(dtype) if x.is_floating_point() else x, y)


def _loss(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return cross_entropy(net(batch[0]), batch[1])


def _zero(net: nn.Module) -> None:
    for p in net.parameters():
        p.grad = None


# ------------------------------------------------------------------------------------------------- methods
# Each builder takes (network, batch) and returns a zero-argument callable computing the batch gradient (.grad) and
# returning the (B,) squared norms |∇ℓ_i|², or raises with the reason the method cannot run the model.
def build_plain(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor | None]:
    def run() -> None:
        _zero(net)
        _loss(net, batch).backward()

    return run


def build_hooks(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    hooks = PerExampleNormHooks(net)
    n = len(batch[1])

    def run() -> Tensor:
        _zero(net)
        hooks.arm(n)
        _loss(net, batch).backward()
        sq, _, problem = hooks.collect()
        if problem is not None:
            raise RuntimeError(problem)
        return sq * n**2  # contributions to a mean over n examples -> per-example gradients

    return run


def build_vmap(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    task = Task(net)

    def run() -> Tensor:
        return per_example_gradient_stats(task, batch).sq_norms

    return run


def build_default(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    choice = choose_engine(Task(net), batch)
    run = (build_hooks if choice == "hooks" else build_vmap)(net, batch)
    run.choice = choice  # type: ignore[attr-defined]
    return run


def build_opacus_ghost(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = GradSampleModuleFastGradientClipping(net, batch_first=True, loss_reduction="mean",
                                                 use_ghost_clipping=True)

    def run() -> Tensor:
        _zero(net)
        _loss(model, batch).backward()
        return model.get_norm_sample().square()  # norms of the per-example gradients (loss_reduction="mean")

    run.cleanup = model._close  # type: ignore[attr-defined]
    return run


def build_opacus_gsm(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    from opacus import GradSampleModule

    model = GradSampleModule(net, batch_first=True, loss_reduction="mean")
    params = [p for p in net.parameters() if p.requires_grad]

    def run() -> Tensor:
        for p in params:
            p.grad, p.grad_sample = None, None
        _loss(model, batch).backward()
        return sum(p.grad_sample.flatten(1).square().sum(1) for p in params)  # per-example gradients

    run.cleanup = model._close  # type: ignore[attr-defined]
    return run


def build_backpack(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Callable[[], Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(net)
    loss_fn = extend(nn.CrossEntropyLoss())
    n = len(batch[1])
    params = [p for p in net.parameters() if p.requires_grad]

    def run() -> Tensor:
        _zero(net)
        out = model(batch[0])
        loss = loss_fn(out.transpose(1, 2), batch[1]) if out.dim() == 3 else loss_fn(out, batch[1])
        with backpack(BatchL2Grad()):
            loss.backward()
        missing = [p for p in params if not hasattr(p, "batch_l2")]
        if missing:
            names = [name for name, p in net.named_parameters() if any(p is m for m in missing)]
            run.skipped = names  # type: ignore[attr-defined]
        return sum(p.batch_l2 for p in params if hasattr(p, "batch_l2")) * n**2  # of the mean's contributions

    run.skipped = []  # type: ignore[attr-defined]
    return run


BUILDERS = {"plain": build_plain, "hooks": build_hooks, "vmap": build_vmap, "default": build_default,
            "opacus_ghost": build_opacus_ghost, "opacus_gsm": build_opacus_gsm, "backpack": build_backpack}


def brute_force(net: nn.Module, batch: tuple[Tensor, Tensor], names: set[str] | None = None) -> Tensor:
    """(B,) |∇ℓ_i|² by one autograd call per example (over the parameters in ``names``, default all)."""
    params = [p for name, p in net.named_parameters() if p.requires_grad and (names is None or name in names)]
    out = []
    for i in range(len(batch[1])):
        one = (batch[0][i:i + 1], batch[1][i:i + 1])
        out.append(sum(g.square().sum() for g in torch.autograd.grad(_loss(net, one), params)))
    return torch.stack(out)


@contextlib.contextmanager
def built(method: str, net: nn.Module, batch: tuple[Tensor, Tensor]):
    run = BUILDERS[method](net, batch)
    try:
        yield run
    finally:
        cleanup = getattr(run, "cleanup", None)
        if cleanup is not None:
            cleanup()
        for p in net.parameters():
            for attr in ("grad_sample", "_forward_counter", "batch_l2", "_norm_sample"):
                if hasattr(p, attr):
                    with contextlib.suppress(AttributeError):
                        delattr(p, attr)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def check(model: str, methods: list[str]) -> dict[str, dict[str, Any]]:
    """float64, 4 examples: every method against brute force. -> method -> {ok, max_rel_err, note}."""
    out = {}
    for method in methods:
        if method == "plain":
            continue
        net, batch = make_model(model, 4, torch.float64)
        truth = brute_force(net, batch)
        try:  # float64 default: BackPACK's Embedding builds its one-hot matrix in the default dtype
            with _default_dtype(torch.float64), built(method, net, batch) as run:
                got = run()
                note = ""
                if getattr(run, "skipped", None):  # BackPACK leaves out what it does not support
                    skipped = sorted({n.rsplit(".", 1)[0] for n in run.skipped})
                    more = ", ..." if len(skipped) > 3 else ""
                    note = f"skips {len(run.skipped)} parameters ({', '.join(skipped[:3])}{more})"
                    kept = {name for name, _ in net.named_parameters()} - set(run.skipped)
                    truth = brute_force(net, batch, kept)
                if getattr(run, "choice", None):
                    note = f"choose_engine -> {run.choice}"
        except Exception as err:  # noqa: BLE001 - record why an anchor cannot run this model
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            out[method] = {"ok": False, "max_rel_err": None, "note": reason}
            continue
        err = float(((got.detach() - truth).abs() / truth.abs().max()).max())
        out[method] = {"ok": err < 1e-8, "max_rel_err": err, "note": note}
    return out


def bench(model: str, batch_size: int, methods: list[str], rounds: int, repeats: int) -> dict[str, Any]:
    verdict = check(model, methods)
    timed = ["plain"] + [m for m in methods if m != "plain" and verdict[m]["ok"]]
    net, batch = make_model(model, batch_size, torch.float32)
    with contextlib.ExitStack() as stack:
        configs = {}
        for method in timed:  # ours share one network (hooks only while armed); each anchor hooks its own copy
            own = make_model(model, batch_size, torch.float32)[0] if method.startswith(("opacus", "backpack")) else net
            configs[method] = stack.enter_context(built(method, own, batch))
        choice = getattr(configs.get("default"), "choice", None)
        figures = compare(configs, "plain", rounds=rounds, repeats=repeats)
    return {"batch_size": batch_size, "check": verdict, "default_choice": choice, "timing": figures}


MODELS = {"mnist1d_cnn": 128, "resnet8": 64, "transformer_lm": 64, "resnet8_bn_eval": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=7, help="rotated rounds of all methods")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method per round (median taken)")
    parser.add_argument("--threads", type=int, default=1)
    add_output_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 1, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), rounds {args.rounds} x repeats {args.repeats}",
          flush=True)
    results = {}
    for model in args.models:
        result = bench(model, 8 if args.quick else MODELS[model], list(args.methods), args.rounds, args.repeats)
        results[model] = result
        print(f"\n{model} (B={result['batch_size']}), default engine: {result['default_choice']}")
        for method in args.methods:
            if method == "plain":
                continue
            c, t = result["check"].get(method, {}), result["timing"].get(method)
            if t is None:
                print(f"  {method:13s} not timed: {c.get('note') or 'disagrees with brute force'} "
                      f"(max rel err {c.get('max_rel_err')})")
            else:
                print(f"  {method:13s} {t['ratio']:5.2f}x  (rounds {t['spread'][0]:.2f}-{t['spread'][1]:.2f}, wall "
                      f"{t['ratio_wall']:.2f}x, {1e3 * t['cpu_s']:.1f} ms)  check {c['max_rel_err']:.1e} {c['note']}",
                      flush=True)
        print(f"  plain fwd+bwd {1e3 * result['timing']['plain']['cpu_s']:.1f} ms cpu")
    path = save_results("per_example_norms", results, args, summary=summary_rows(results),
                        packages=("opacus", "backpack-for-pytorch"))
    print(f"\nwrote {path}")


ANCHORS = {"opacus_ghost": "Opacus ghost clipping", "opacus_gsm": "Opacus GradSampleModule",
           "backpack": "BackPACK BatchL2Grad"}


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model: the default engine against a plain forward+backward (target <= 1.5x) and against the fastest anchor
    that could run the model (speed-up, target >= 1.2x)."""
    rows = []
    for model, result in results.items():
        timing, choice = result["timing"], result["default_choice"]
        if "default" not in timing:
            continue
        ours = timing["default"]
        label = f"{model} (B={result['batch_size']})"
        rows.append(summary_row(f"{label}: per-example norms + gradient, default engine ({choice}), time / plain "
                                "forward+backward", f"{1e3 * ours['cpu_s']:.1f} ms",
                                f"plain forward+backward, {1e3 * timing['plain']['cpu_s']:.1f} ms", ours["ratio"],
                                "≤ 1.5×", ours["spread"]))
        anchors = {name: t for name, t in timing.items() if name in ANCHORS}
        if anchors:
            best = min(anchors, key=lambda name: anchors[name]["ratio"])
            rows.append(summary_row(f"{label}: speed-up of the default engine over the fastest anchor (anchor time / "
                                    "ours)", f"{ours['ratio']:.2f}× a plain step",
                                    f"{ANCHORS[best]}, {anchors[best]['ratio']:.2f}× a plain step",
                                    anchors[best]["ratio"] / ours["ratio"], "≥ 1.2×"))
    return rows


if __name__ == "__main__":
    main()
