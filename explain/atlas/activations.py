"""Stage 1 of the atlas: the activations at the chosen layer and the logits of every image, on Lightning's
``Trainer.predict`` (so DDP over GPUs and nodes runs as training does: ``torchrun``, SLURM).

:class:`LatentPredictor` computes ``a = input_to_latent(x)`` and ``logits = latent_to_logit(a)``;
:class:`ActivationWriter` (a ``BasePredictionWriter``) keeps, on each rank, the first ``max_images`` images of
each predicted class that rank sees, and writes them batch by batch to ``stage1/rank<r>/shard_<b>.npy``
(float16 [n, c, h, w]), then, atomically, ``batch_<b>.json`` (one row per kept image: dataset index, predicted
class, its logit, shard, row), and at the end ``stage1/rank<r>/index.json`` (all the rows). Memory holds one
batch. Rank 0 writes ``stage1/done.json`` once every rank has finished.

Resume after a kill (:func:`resume_batches`): with the same number of processes and batch size, the batches that
every rank finished are read back from their ``batch_<b>.json`` (with the per-class counts of kept images) and the
data loader starts after them, so each rank sees the batches it would have seen; otherwise the stage starts again.

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

from explain.atlas.storage import write_json, write_npy

DONE = "done.json"
RUN = "run.json"  # the setting of the rank's run (stage1_setting)
BATCH = "batch_{:06d}.json"  # the rows of one finished batch


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
    """Writes each rank's kept activations (module docstring) under ``root`` (the atlas's ``stage1`` folder).

    ``start_batch`` (set by the caller from :func:`resume_batches`, before ``Trainer.predict`` on the data from
    dataset index ``start_batch x batch_size x world_size`` on): the batches each rank finished in an interrupted
    run, whose rows are read back instead of recomputed.
    """

    def __init__(self, root: str | Path, max_images: int) -> None:
        super().__init__(write_interval="batch")
        self.root, self.max_images = Path(root), max_images
        self.start_batch = 0
        self.setting: dict[str, int] = {}
        self._rows: list[dict[str, Any]] = []
        self._kept: Counter[int] = Counter()
        self._unreadable: list[int] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        return self.root / f"rank{trainer.global_rank}"

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("atlas-stage1-resume")  # every rank has read the resume point before files change
        folder = self._folder(trainer)
        self._rows, self._kept, self._unreadable = [], Counter(), []
        if self.start_batch == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a fresh start, or a run of another setting
            folder.mkdir(parents=True)
            write_json(folder / RUN, self.setting)
        else:  # resume: the first start_batch batches are read back, later (unfinished) ones removed
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.name == "index.json" or (
                        path.name.startswith(("batch_", "shard_")) and _batch_number(path) >= self.start_batch):
                    path.unlink()
            for batch in range(self.start_batch):
                data = json.loads((folder / BATCH.format(batch)).read_text())
                self._rows += data["rows"]
                self._unreadable += data["unreadable"]
            self._kept.update(row["class"] for row in self._rows)
        if trainer.is_global_zero:
            (self.root / DONE).unlink(missing_ok=True)
            for stale in self.root.glob("rank*"):  # ranks of an earlier run with more processes
                if stale.is_dir() and int(stale.name[4:]) >= trainer.world_size:
                    shutil.rmtree(stale, ignore_errors=True)

    @override
    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Tensor],
        batch_indices: Sequence[int] | None, batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        number = self.start_batch + batch_idx
        logits = prediction["logits"].float()
        predicted = logits.argmax(1).tolist()
        indices, ok = prediction["index"].tolist(), prediction["ok"].tolist()
        keep, unreadable = [], []
        for row, (index, label, readable) in enumerate(zip(indices, predicted, ok)):
            if not readable:
                unreadable.append(index)
            elif self._kept[label] < self.max_images:
                self._kept[label] += 1
                keep.append(row)
        name = f"shard_{number:06d}.npy"
        if keep:
            write_npy(self._folder(trainer) / name, prediction["latent"][keep].to(torch.float16).cpu().numpy())
        rows = [{"index": indices[row], "class": predicted[row], "logit": float(logits[row, predicted[row]]),
                 "shard": name, "row": position} for position, row in enumerate(keep)]
        # written last and atomically: the batch is finished, a resumed run reads it back
        write_json(self._folder(trainer) / BATCH.format(number), {"rows": rows, "unreadable": unreadable})
        self._rows += rows
        self._unreadable += unreadable

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        write_json(self._folder(trainer) / "index.json", {"rows": self._rows, "unreadable": self._unreadable})
        trainer.strategy.barrier("atlas-stage1")
        if trainer.is_global_zero:
            write_json(self.root / DONE, {"world_size": trainer.world_size, "max_images": self.max_images})
        trainer.strategy.barrier("atlas-stage1-done")


def _batch_number(path: Path) -> int:
    return int(path.stem.split("_")[1])


def stage1_setting(world_size: int, batch_size: int, n_images: int, max_images: int) -> dict[str, int]:
    """What a stage-1 run must share with an interrupted one to resume it batch by batch."""
    return {"world_size": world_size, "batch_size": batch_size, "n_images": n_images, "max_images": max_images}


def resume_batches(root: str | Path, setting: dict[str, int]) -> int:
    """The batches ``k`` that every rank of an interrupted stage-1 run of the same ``setting`` finished: rank ``r``'s
    batch ``b`` holds positions ``b B .. (b + 1) B - 1`` of its share ``r, r + W, r + 2W, ...`` of the data (Lightning's
    ``UnrepeatedDistributedSampler``, no shuffle), so the first ``k B W`` images are done, and the run goes on from
    there with the same batches on the same ranks. 0 when there is nothing to resume (or a setting differs).
    At least one batch is left to do."""
    root, world, size, n = Path(root), setting["world_size"], setting["batch_size"], setting["n_images"]
    finished = []
    for rank in range(world):
        folder = root / f"rank{rank}"
        try:
            if json.loads((folder / RUN).read_text()) != setting:
                return 0
        except (OSError, ValueError):
            return 0
        count = 0
        while (folder / BATCH.format(count)).is_file():
            count += 1
        finished.append(count)
    done = min(finished)
    while done > 0 and done * size * world >= n:
        done -= 1
    return done


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
