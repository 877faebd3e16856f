"""A callback for the DDP ClickMe fit test: each rank writes what its training batches held (run in subprocesses)."""

import json
from pathlib import Path

import lightning as L


class BatchProbe(L.Callback):
    """Writes ``<out>.rank<r>.json``: per epoch, the labels and ``has_heatmap`` flags of every training batch, and
    the global step reached."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.epochs: list[list[dict]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs[-1].append({"label": batch["label"].tolist(), "has_heatmap": batch["has_heatmap"].tolist()})

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"epochs": self.epochs, "global_step": trainer.global_step, "world_size": trainer.world_size,
                  "num_training_batches": trainer.num_training_batches}
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(record))
