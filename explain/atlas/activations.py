"""Stage 1 of the atlas: the activations at the chosen layer and the logits of every image, on Lightning's
``Trainer.predict`` (so DDP over GPUs and nodes runs as training does: ``torchrun``, SLURM).

:class:`LatentPredictor` computes ``a = input_to_latent(x)`` and ``logits = latent_to_logit(a)``;
:class:`ActivationWriter` (a ``BasePredictionWriter``) keeps, on each rank, the first ``max_images`` images of
each predicted class that rank sees, and writes them batch by batch to ``stage1/rank<r>/shard_<k>.npy``
(float16 [n, c, h, w]) plus, at the end, ``stage1/rank<r>/index.json`` (one row per kept image: dataset index,
predicted class, its logit, shard, row). Memory holds one batch. Rank 0 writes ``stage1/done.json`` once every
rank has finished: without it the stage is redone from scratch.

Why the union of the ranks' kept rows holds the first ``max_images`` images of each class in dataset order, for
any number of ranks: each rank sees a subsequence of the data, and the images of the global first
``max_images`` of a class that fall on one rank are a prefix of that rank's images of the class, so that rank
keeps them. :func:`class_rows` takes the first ``max_images`` of the union (duplicates of the padded
``DistributedSampler`` removed), hence the same images on 1 process or 8.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn
from typing_extensions import override

from explain.atlas.storage import write_json

DONE = "done.json"


class LatentPredictor(L.LightningModule):
    """``predict_step``: ``{"latent" [B, c, h, w], "logits" [B, K], "index" [B], "ok" [B]}``."""

    def __init__(self, input_to_latent: nn.Module, latent_to_logit: nn.Module) -> None:
        super().__init__()
        self.input_to_latent, self.latent_to_logit = input_to_latent, latent_to_logit

    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        latent = self.input_to_latent(batch["image"])
        if latent.ndim != 4:
            raise ValueError(
                f"the layer gives activations of shape {tuple(latent.shape)}: an atlas needs a spatial layer "
                "[B, c, h, w] (choose a layer before global pooling)"
            )
        if float(latent.min()) < 0:
            raise ValueError(
                f"the layer gives negative activations (min {float(latent.min()):.3g}): the concept dictionary "
                "needs activations >= 0. Choose a layer after a ReLU, or set sign_split=true (signed activations, "
                "e.g. vision transformers and GroupSort 1-Lipschitz networks)"
            )
        return {"latent": latent, "logits": self.latent_to_logit(latent), "index": batch["index"], "ok": batch["ok"]}


class ActivationWriter(BasePredictionWriter):
    """Writes each rank's kept activations (module docstring) under ``root`` (the atlas's ``stage1`` folder)."""

    def __init__(self, root: str | Path, max_images: int) -> None:
        super().__init__(write_interval="batch")
        self.root, self.max_images = Path(root), max_images
        self._rows: list[dict[str, Any]] = []
        self._kept: Counter[int] = Counter()
        self._unreadable: list[int] = []
        self._shards = 0

    def _folder(self, trainer: L.Trainer) -> Path:
        return self.root / f"rank{trainer.global_rank}"

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        shutil.rmtree(folder, ignore_errors=True)  # a run killed in stage 1 starts it again
        folder.mkdir(parents=True)
        if trainer.is_global_zero:
            (self.root / DONE).unlink(missing_ok=True)
            for stale in self.root.glob("rank*"):  # ranks of an earlier run with more processes
                if stale.is_dir() and int(stale.name[4:]) >= trainer.world_size:
                    shutil.rmtree(stale, ignore_errors=True)
        self._rows, self._kept, self._unreadable, self._shards = [], Counter(), [], 0

    @override
    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Tensor],
        batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        logits = prediction["logits"].float()
        predicted = logits.argmax(1).tolist()
        indices, ok = prediction["index"].tolist(), prediction["ok"].tolist()
        keep = []
        for row, (index, label, readable) in enumerate(zip(indices, predicted, ok)):
            if not readable:
                self._unreadable.append(index)
            elif self._kept[label] < self.max_images:
                self._kept[label] += 1
                keep.append(row)
        if not keep:
            return
        name = f"shard_{self._shards:06d}.npy"
        latent = prediction["latent"][keep].to(torch.float16).cpu().numpy()
        np.save(self._folder(trainer) / name, latent)
        self._shards += 1
        for position, row in enumerate(keep):
            self._rows.append({"index": indices[row], "class": predicted[row], "logit": float(logits[row, predicted[row]]),
                               "shard": name, "row": position})

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_json(self._folder(trainer) / "index.json", {"rows": self._rows, "unreadable": self._unreadable})
        trainer.strategy.barrier("atlas-stage1")
        if trainer.is_global_zero:
            write_json(self.root / DONE, {"world_size": trainer.world_size, "max_images": self.max_images})
        trainer.strategy.barrier("atlas-stage1-done")


def stage1_done(root: str | Path) -> bool:
    return (Path(root) / DONE).is_file()


def read_index(root: str | Path) -> tuple[dict[int, list[dict[str, Any]]], list[int]]:
    """Every rank's kept rows grouped by predicted class (each list in dataset order, duplicates removed, with
    the rank folder in ``"rank"``), and the indices of the unreadable images."""
    root = Path(root)
    by_class: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    unreadable: set[int] = set()
    for folder in sorted(root.glob("rank*")):
        data = json.loads((folder / "index.json").read_text())
        unreadable.update(data["unreadable"])
        for row in data["rows"]:
            by_class[row["class"]].setdefault(row["index"], {**row, "rank": folder.name})
    return {c: [rows[i] for i in sorted(rows)] for c, rows in sorted(by_class.items())}, sorted(unreadable)


def class_rows(rows: list[dict[str, Any]], max_images: int) -> list[dict[str, Any]]:
    """The first ``max_images`` rows in dataset order (module docstring)."""
    return sorted(rows, key=lambda row: row["index"])[:max_images]


def load_latents(root: str | Path, rows: list[dict[str, Any]]) -> Tensor:
    """Float32 activations [n, c, h, w] of ``rows``, read from the memory-mapped shards (only those rows)."""
    root, shards, out = Path(root), {}, []
    for row in rows:
        key = (row["rank"], row["shard"])
        if key not in shards:
            shards[key] = np.load(root / row["rank"] / row["shard"], mmap_mode="r")
        out.append(torch.from_numpy(np.array(shards[key][row["row"]], dtype=np.float32)))
    return torch.stack(out)
