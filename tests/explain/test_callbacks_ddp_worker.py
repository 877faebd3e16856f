"""Standalone script for ``test_callbacks_ddp.py``: one fit with ExplanationMonitor on 1 process or 2 (DDP, gloo).

``python test_callbacks_ddp_worker.py OUT.json DEVICES ROOT`` writes the ``explain/*`` metrics of rank 0 to
OUT.json. Lightning's ``ddp`` strategy on CPU launches the second process by re-running this script, which is
why it is a file of its own. Importing it (pytest collects it) runs nothing.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from explain.callbacks import ExplanationMonitor


class Quadrants(Dataset):
    """Class = the bright quadrant, human map = that quadrant (every image has one)."""

    def __init__(self, n: int, seed: int, size: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.3
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.heatmaps = torch.zeros(n, size, size)
        half = size // 2
        for i, label in enumerate(self.labels.tolist()):
            row, col = divmod(label, 2)
            self.images[i, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 0.6
            self.heatmaps[i, row * half : (row + 1) * half, col * half : (col + 1) * half] = 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "heatmap": self.heatmaps[i]}


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
    train, val = DataLoader(Quadrants(16, seed=0), batch_size=8), DataLoader(Quadrants(24, seed=1), batch_size=4)
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
