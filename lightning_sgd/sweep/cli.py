"""``lightning-sgd sweep``: parse the sweep options, run (or resume, or join) the sweep, print the table.

Arguments are split in two: ``--config`` (the recipe YAML), ``--sweep`` (a sweep YAML) and ``--sweep.<field>`` go to
the sweep; every other argument (``--trainer.precision=...``, ``--model.init_args...``) is a recipe override applied
to every trial, as for ``lightning-sgd fit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jsonargparse import ArgumentParser

from lightning_sgd.sweep.config import SweepConfig, SweepConfigError

EXAMPLE = """examples:
  lightning-sgd sweep --sweep recipes/mnist1d_sweep.yaml
  lightning-sgd sweep --config recipes/mnist1d.yaml --sweep.batch_sizes [32,128,512] --sweep.target 0.8 \\
      --sweep.trials 8 --sweep.max_steps 2000 --model.init_args.optimizer=torch.optim.SGD
  several workers on one sweep: give them the same --sweep.storage postgresql://user@host/db and --sweep.study_name
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning-sgd sweep",
        description="Steps to a target metric vs batch size, each batch size with its own quasi-random search over "
        "learning rate (and momentum, schedule parameters), stored in Optuna so a killed sweep resumes and several "
        "workers can share one (Shallue et al. 2019). Arguments other than --config/--sweep* are recipe overrides.",
        epilog=EXAMPLE,
        exit_on_error=True,
    )
    parser.add_argument("--config", type=str | None, default=None, help="recipe YAML (as for lightning-sgd fit)")
    parser.add_class_arguments(SweepConfig, "sweep", sub_configs=True)
    parser.add_argument("--no_progress", type=bool, default=False, help="hide the progress bar over trials")
    return parser


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split into (sweep arguments, recipe overrides)."""
    ours, recipe = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        name = token.split("=", 1)[0]
        mine = name in ("--config", "-h", "--help", "--no_progress", "--print_config") or name == "--sweep" or \
            name.startswith("--sweep.")
        target = ours if mine else recipe
        target.append(token)
        takes_value = token.startswith("--") and "=" not in token and name not in ("-h", "--help")
        if takes_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            target.append(args[i + 1])
            i += 1
        i += 1
    return ours, recipe


def parse(argv: Sequence[str]) -> tuple[SweepConfig, dict[str, Any]]:
    ours, recipe_overrides = split_args(argv)
    parser = build_parser()
    namespace = parser.parse_args(ours)
    init = parser.instantiate_classes(namespace)
    cfg: SweepConfig = init.sweep
    if namespace.config:
        cfg.recipe = namespace.config
    cfg.overrides = [*cfg.overrides, *recipe_overrides]
    return cfg, {"progress": not namespace.no_progress}


def main(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``lightning-sgd sweep`` with ``argv`` (the arguments after ``sweep``); return the results summary."""
    from lightning_sgd.sweep.runner import run_sweep

    cfg, options = parse(argv)
    try:
        return run_sweep(cfg, progress=options["progress"])
    except SweepConfigError as err:
        raise SystemExit(f"lightning-sgd sweep: {err}") from err
