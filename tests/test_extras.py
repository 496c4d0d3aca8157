"""``pip install lightning-sgd`` without extras gives working callbacks and plugins; a feature whose extra is missing
says which extra to install. Simulated in a subprocess that cannot import any extra's packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from lightning_sgd._extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]

# Top-level names and distribution names (lower case, dist-info prefixes) that a no-extras install lacks.
BLOCKED = sorted(EXTRAS) + ["mpl_toolkits", "pillow", "pytorch_optimizer", "optuna", "mnist1d", "matplotlib"]


def _site_without_extras(tmp_path: Path) -> Path:
    """A site directory holding every installed package except the extras' (symlinks into this venv's)."""
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    site = tmp_path / "site"
    site.mkdir()
    blocked = tuple(name.lower() for name in BLOCKED)
    for entry in site_packages.iterdir():
        name = entry.name.lower().replace("-", "_")
        if not name.startswith(blocked):
            (site / entry.name).symlink_to(entry)
    return site


def run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    site = _site_without_extras(tmp_path)
    script = f"import site, sys; site.addsitedir({str(site)!r}); BLOCKED = {BLOCKED!r}\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                             "WANDB_MODE": "disabled", "HOME": str(tmp_path)})


def test_core_dependencies_hold_no_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {Requirement(d).name for d in project["dependencies"]}
    extras = {dist for dist, _ in EXTRAS.values()}
    assert not core & extras, core & extras
    for dist, extra in EXTRAS.values():
        assert any(Requirement(d).name == dist for d in project["optional-dependencies"][extra]), (dist, extra)


def test_callbacks_and_plugins_train_without_any_extra(tmp_path):
    result = run_blocked("""
        import torch
        import pytorch_lightning as pl
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from lightning_sgd.callbacks import CurvatureSpectrum, GradientDiversity, GradientNoiseScale
        from lightning_sgd.plugins import EMAWeights, LRWarmupScaling

        class Boring(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = nn.Linear(8, 2)
            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self.layer(x), y)
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        torch.manual_seed(0)
        data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), batch_size=16)
        gns = GradientNoiseScale(schedule=1)
        callbacks = [gns, GradientDiversity(schedule=2, probe_size=16), CurvatureSpectrum(schedule=3, k=1),
                     EMAWeights(decay=0.9), LRWarmupScaling(warmup_steps=2)]
        trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, callbacks=callbacks)
        trainer.fit(Boring(), data)
        assert gns.measured > 0, gns.skipped
        import importlib.util
        assert all(importlib.util.find_spec(name) is None for name in ("optuna", "matplotlib", "mnist1d", "PIL"))
        print("OK", gns.measured)
    """, tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_a_missing_extra_names_it(tmp_path):
    result = run_blocked("""
        for module, extra in [("lightning_sgd.plugins.optimizers", "optimizers"), ("lightning_sgd.data.mnist1d",
                              "recipes"), ("lightning_sgd.data.imagenet", "recipes"), ("lightning_sgd.sweep", "sweep")]:
            try:
                __import__(module)
            except ImportError as error:
                assert f"lightning-sgd[{extra}]" in str(error), (module, str(error))
            else:
                raise AssertionError(module + " imported without its extra")
        from lightning_sgd.bootstrap import plot_bootstrap
        try:
            plot_bootstrap({"a": [{"step": 1, "bootstrap/real_test_loss": 1.0}]}, "x.png")
        except ImportError as error:
            assert "lightning-sgd[plots]" in str(error), str(error)
        else:
            raise AssertionError("plotted without matplotlib")
        from lightning_sgd import report
        from lightning_sgd.nqm import figures
        for draw in (report._figure, figures._plt):
            try:
                draw()
            except ImportError as error:
                assert "lightning-sgd[plots]" in str(error), str(error)
            else:
                raise AssertionError(f"{draw} drew without matplotlib")
        print("OK")
    """, tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_one_version_string():
    import lightning_sgd

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_sgd.__version__"}
    assert lightning_sgd.__version__ in (ROOT / "CHANGELOG.md").read_text()
