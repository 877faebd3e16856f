"""Standalone script for ``test_callbacks_ddp.py``: one fit with ExplanationMonitor on 1 process or 2 (DDP, gloo).

``python test_callbacks_ddp_worker.py OUT.json DEVICES ROOT`` writes the ``explain/*`` metrics of rank 0 to
OUT.json. Lightning's ``ddp`` strategy on CPU launches the second process by re-running this script, which is
why it is a file of its own. Importing it (pytest collects it) runs nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from explain.callbacks import ExplanationMonitor

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
from test_callbacks import Quadrants  # noqa: E402  (the tiny data set of the single-process tests)


class Module(L.LightningModule):
    """No BatchNorm and lr=0: the weights are the same on 1 or 2 processes, so the metrics must match."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)
        )

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch["image"]), batch["label"]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main(out: str, devices: int, root: str) -> None:
    L.seed_everything(0, verbose=False)
    callback = ExplanationMonitor(
        explainers=["saliency", {"sobol": {"nb_design": 4, "grid_size": 4}}],
        metrics=["alignment", "deletion"],
        model_attr="model",
        num_samples=4,
        every_n_epochs=1,
        max_images=None,  # every validation image, each process its own shard
    )
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[callback],
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    train = DataLoader(Quadrants(16, seed=0, annotate_every=1), batch_size=8)
    val = DataLoader(Quadrants(24, seed=1, annotate_every=1), batch_size=4)  # every image has a human map
    trainer.fit(Module(), train, val)
    # every rank: how many validation images it explained for the dataset-level metrics (its shard)
    with open(f"{out}.rank{trainer.global_rank}", "w") as handle:
        json.dump({"images_explained": callback._seen}, handle)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("explain/")}
        metrics["world_size"] = trainer.world_size
        with open(out, "w") as handle:
            json.dump(metrics, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
