"""The ``lightning-sgd`` command: LightningCLI's ``fit``/``validate``/``test`` plus project subcommands.

``fit``, ``validate`` and ``test`` are LightningCLI with ``subclass_mode`` for both model and data, so any recipe
(or user) LightningModule / LightningDataModule is named by ``class_path`` in YAML or on the command line
(:mod:`lightning_sgd.fit_cli`). Other subcommands (``report``, ``sweep``, ``nqm``, ...) are registered in
:data:`EXTRA_COMMANDS` as ``module:function`` entries that take the remaining arguments.

This module imports nothing heavy: ``lightning-sgd --help``, ``--version`` and ``recipes`` answer at once, and a
command imports what it needs when it runs.

Two things happen to the arguments of ``fit``/``validate``/``test`` before LightningCLI sees them:

- ``--config NAME`` with a packaged recipe's name (``mnist1d``, ``resnet32_cifar10``; see ``lightning-sgd recipes``)
  and no such file is that recipe's YAML;
- configs compose without losing callbacks: a later ``--config``'s ``trainer.callbacks`` is *merged* into those of
  the earlier ones (:func:`merge_callbacks`: a new class is appended, a class already there is updated in place),
  where LightningCLI alone would replace the whole list. When the parsed configuration lacks a callback some config
  asked for (a later ``callbacks: []``, or ``--trainer.callbacks=[]``), the run warns.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: name -> (``module:function`` taking ``argv``, one-line help). Add new subcommands here.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "report": ("lightning_sgd.report:main", "an offline HTML report of a run, with a batch-size recommendation"),
    "sweep": ("lightning_sgd.sweep.cli:main", "steps-to-target vs batch size with tuned learning rates (Optuna)"),
    "nqm": ("lightning_sgd.nqm.cli:main", "noisy quadratic model predictions and the paper's figures"),
    "recipes": ("lightning_sgd.cli:list_recipes", "list the packaged recipes (use a name as --config NAME)"),
}

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a recipe (add --test_after_fit=true to test the final model too)",
    "validate": "run one evaluation epoch on the validation set",
    "test": "run one evaluation epoch on the test set",
}

#: Names this module re-exports from :mod:`lightning_sgd.fit_cli` (imported on first use).
_FIT_CLI_NAMES = ("LightningSGDCLI", "LightningSGDLightningCLI", "LightningSGDCLIMixin", "model_package",
                  "default_loggers", "DEFAULT_LOGGERS", "print_run_summary", "SaveRunConfig",
                  "LightningSaveRunConfig")


def __getattr__(name: str) -> Any:
    if name in _FIT_CLI_NAMES:
        return getattr(importlib.import_module("lightning_sgd.fit_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def version() -> str:
    from lightning_sgd import __version__

    return __version__


# ----------------------------------------------------------------------------------------------------- recipes
def recipes_dir() -> Path:
    """The folder of the packaged recipe YAMLs (``lightning_sgd/recipes``, or ``recipes/`` in a checkout)."""
    spec = importlib.util.find_spec("lightning_sgd.recipes")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def list_recipes(argv: Sequence[str] = ()) -> list[str]:
    """``lightning-sgd recipes``: each packaged recipe's name and the first line of its header."""
    if argv:
        raise SystemExit("lightning-sgd recipes takes no arguments.")
    names = recipe_names()
    width = max(map(len, names))
    sweeps = [n for n in names if n.endswith("_sweep")]
    for title, group in (("recipes (lightning-sgd fit --config NAME):", [n for n in names if n not in sweeps]),
                         ("sweeps (lightning-sgd sweep --sweep <recipes folder>/NAME.yaml):", sweeps)):
        if group:
            print(title)
        for name in group:
            text = _first_comment(recipes_dir() / f"{name}.yaml")
            text = text if len(text) <= 90 else text[:87].rstrip() + "..."
            print(f"  {name:<{width}s}  {text}")
    print(f"\nfolder: {recipes_dir()}")
    return names


def resolve_config(value: str) -> str:
    """A ``--config`` value: an existing file as is, else a packaged recipe's name (with or without ``.yaml``)."""
    if os.path.exists(value) or "\n" in value or value.lstrip().startswith("{"):
        return value  # a file, or a config given as YAML text
    name = value.removeprefix("recipes/").removesuffix(".yaml")
    candidate = recipes_dir() / f"{name}.yaml"
    if "/" not in name and candidate.is_file():  # also `recipes/mnist1d.yaml` outside a checkout
        return str(candidate)
    return value  # LightningCLI reports the missing file


# ------------------------------------------------------------------------------------------ config composition
def _class_path_of(item: Any) -> str | None:
    if isinstance(item, dict) and isinstance(item.get("class_path"), str):
        return item["class_path"]
    return item if isinstance(item, str) else None


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def merge_callbacks(earlier: list[Any], later: list[Any]) -> list[Any]:
    """``earlier`` with ``later`` merged in: a later callback of a class already configured replaces the first such
    entry not yet replaced (in place: a config re-declares a callback to change its arguments), any other is
    appended.

    >>> merge_callbacks([{"class_path": "a.A", "init_args": {"k": 5}}, "b.B"], [{"class_path": "a.A"}, "c.C"])
    [{'class_path': 'a.A'}, 'b.B', 'c.C']
    """
    merged, replaced = list(earlier), set()
    for item in later:
        path = _class_path_of(item)
        index = next((i for i, old in enumerate(earlier) if i not in replaced and path is not None
                      and _class_path_of(old) == path), None)
        if index is None:
            merged.append(item)
        else:
            merged[index] = item
            replaced.add(index)
    return merged


def compose_configs(args: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """Resolve recipe names in ``--config`` values and merge ``trainer.callbacks`` across the config files.

    LightningCLI alone lets a later config's ``trainer.callbacks`` replace the earlier list, so a config adding one
    callback silently drops the recipe's measurement callbacks. Here a later list is merged in
    (:func:`merge_callbacks`: new classes appended, re-declared classes updated in place) and the config is passed
    on as YAML text with the merged list; ``callbacks: []`` or ``callbacks: null`` in a later config clears the list
    (and the run warns, naming what is gone).

    Returns the new argument list, the class paths of the callbacks the configs ask for (those a later config
    cleared included, so that the run warns about them), and the first config's recipe name (its file stem; it names
    the W&B run).
    """
    import yaml

    out: list[str] = []
    expected: list[str] = []
    cleared: list[str] = []
    merged: list[Any] | None = None  # the callbacks of the configs so far; None until one sets them
    recipe: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key != "--config":
            out.append(arg)
            i += 1
            continue
        if not eq:
            i += 1
            value = args[i] if i < len(args) else ""
        value = resolve_config(value)
        config = None
        if os.path.isfile(value):
            try:
                config = yaml.safe_load(Path(value).read_text())
                recipe = recipe or Path(value).stem
            except (OSError, yaml.YAMLError):
                config = None  # LightningCLI reports it
        trainer = config.get("trainer") if isinstance(config, dict) else None
        if isinstance(trainer, dict) and ("callbacks" in trainer or "callbacks+" in trainer):
            given = "callbacks" in trainer
            plain, appended = _as_list(trainer.get("callbacks")), _as_list(trainer.get("callbacks+"))
            if merged is None:  # the first config with callbacks: as it is
                merged = plain + appended
            else:
                if given and not plain:  # callbacks: [] or null in a later config clears the list
                    cleared += [p for p in map(_class_path_of, merged) if p]
                    merged = appended
                else:
                    merged = merge_callbacks(merged, plain + appended)
                trainer.pop("callbacks+", None)
                trainer["callbacks"] = merged
                value = yaml.safe_dump(config, sort_keys=False)  # LightningCLI takes a config as YAML text too
        out += ["--config", value]
        i += 1
    expected = [p for p in map(_class_path_of, merged or []) if p] + cleared
    return out, expected, recipe


# --------------------------------------------------------------------------------------------------------- main
def _help_text() -> str:
    lines = [
        "usage: lightning-sgd <command> [options]",
        "",
        "Measure and act on gradient noise, curvature and batch size in PyTorch Lightning training.",
        "",
        "commands:",
    ]
    commands = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in EXTRA_COMMANDS.items()}}
    lines += [f"  {name:<10s}{text}" for name, text in commands.items()]
    lines += [
        "",
        "options:",
        "  --version         print the version and exit",
        "  -h, --help        this message; `lightning-sgd <command> --help` for a command's options",
        "",
        "examples:",
        "  lightning-sgd fit --config mnist1d                 (a packaged recipe by name; `lightning-sgd recipes`)",
        "  lightning-sgd fit --config mnist1d --threads 1     (one intra-op thread: fastest on a busy machine)",
        "  lightning-sgd fit --config mnist1d --config growth.yaml   (growth.yaml's callbacks are merged in)",
        "  lightning-sgd fit --config mnist1d --print_config  (the resolved configuration)",
        "  lightning-sgd report runs/                         (report.html of the newest run)",
    ]
    return "\n".join(lines)


def _run_extra(name: str, argv: Sequence[str]) -> Any:
    target, _ = EXTRA_COMMANDS[name]
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise SystemExit(f"lightning-sgd {name}: this installation lacks {module_name} ({err}).") from err
    return getattr(module, function_name)(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-sgd`` console script (returns nothing: a return value becomes the exit code).

    A configuration refused before training (``fit_cli.ConfigError``) is printed as one line on stderr, exit code 2,
    like the argument parser's own errors; anything else keeps its traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        run(args)
    except ValueError as err:
        fit_cli = sys.modules.get("lightning_sgd.fit_cli")  # imported by the command that raised it, if any
        if fit_cli is None or not isinstance(err, fit_cli.ConfigError):
            raise
        print(f"lightning-sgd {args[0] if args else ''}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: Sequence[str]) -> Any:
    """Run a ``lightning-sgd`` command; return the LightningCLI object (fit/validate/test) or the command's result."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_help_text())
        return None
    if args[0] in ("-V", "--version"):
        print(f"lightning-sgd {version()}")
        return None
    if args[0] in EXTRA_COMMANDS:
        return _run_extra(args[0], args[1:])
    if args[0] not in LIGHTNING_COMMANDS:
        raise SystemExit(f"lightning-sgd: unknown command {args[0]!r}.\n\n{_help_text()}")
    composed, expected, recipe = compose_configs(args[1:])
    from lightning_sgd.console import quiet_console
    from lightning_sgd.fit_cli import run_lightning

    cli_args = None if [args[0], *composed] == sys.argv[1:] else [args[0], *composed]  # LightningCLI warns when
    with quiet_console():                                                             # given sys.argv's own
        return run_lightning(composed, cli_args, recipe, expected)


if __name__ == "__main__":
    main()
