"""Less console noise in ``lightning-sgd`` runs: Lightning's "tip" adverts, W&B's start/finish banners and a known
PyTorch deprecation warning raised inside Lightning. Measurements, warnings about the run and errors stay."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

#: The loggers Lightning's ``rank_zero_info`` writes the "💡 Tip: ..." adverts to: a filter on the logger that
#: creates a record drops it before any handler (Lightning's own, the root's, a test harness's) sees it.
_LIGHTNING_LOGGERS = tuple(f"{package}.utilities.rank_zero" for package in
                           ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"))


class DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Within: no Lightning adverts, W&B silent (the run summary prints the W&B folder and the ``wandb sync``
    command), no ``LeafSpec`` deprecation warning from Lightning's pytree helper, and no LightningCLI warning about
    being given arguments (lightning-sgd gives it the arguments after resolving recipe names)."""
    advert_filter = DropAdverts()
    targets = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for target in targets:
        target.addFilter(advert_filter)
    silent = os.environ.get("WANDB_SILENT")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            # lightning-sgd passes LightningCLI the arguments it composed (recipe names resolved), on purpose
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            yield
    finally:
        for target in targets:
            target.removeFilter(advert_filter)
        if silent is None:
            os.environ.pop("WANDB_SILENT", None)
