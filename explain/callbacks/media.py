"""Where the monitors' pictures and tables go: W&B, TensorBoard, or PNG/CSV files (a module named so as not
to shadow the standard library's ``logging``).

* ``WandbLogger``: ``wandb.Image`` lists with captions and ``wandb.Table`` (image cells become
  ``wandb.Image``), logged at the trainer's global step so the step slider scrubs them;
* ``TensorBoardLogger``: one image grid per key (``add_image``) and the table as markdown (``add_text``);
* any other logger, or none: ``<run dir>/explanations/<tag>/<key>.png`` grids and ``<key>.csv`` tables.

Only global rank 0 writes; the functions are no-ops elsewhere, so every rank may call them.
Scalars do not come here: the monitors log them with ``pl_module.log`` so they reach every logger.
"""

from __future__ import annotations

import csv
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from explain.callbacks.overlays import grid


def _sinks(trainer: Trainer) -> tuple[list[WandbLogger], list[TensorBoardLogger]]:
    wandb = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    tensorboard = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
    return wandb, tensorboard


def writes_files(trainer: Trainer) -> bool:
    """True when no logger takes images (no W&B, no TensorBoard): pictures go to PNG files."""
    return not any(_sinks(trainer))


def _file_name(key: str) -> str:
    return key.replace("/", ".")


def log_images(
    trainer: Trainer,
    key: str,
    images: list[np.ndarray],
    captions: list[str],
    out_dir: Path,
    tag: str,
) -> None:
    """Log uint8 RGB pictures [H,W,3] (same size) with their captions at the trainer's global step."""
    if not trainer.is_global_zero or not images:
        return
    step = trainer.global_step
    wandb_loggers, tensorboard_loggers = _sinks(trainer)
    for logger in wandb_loggers:
        logger.log_image(key=key, images=list(images), caption=list(captions), step=step)
    if tensorboard_loggers or writes_files(trainer):
        picture = grid(images) if len(images) > 1 else images[0]
        for logger in tensorboard_loggers:
            logger.experiment.add_image(key, picture, global_step=step, dataformats="HWC")
        if writes_files(trainer):
            from PIL import Image

            path = Path(out_dir) / tag / f"{_file_name(key)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(path)


def _cell(value: Any) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return f"{value:.4f}"
    return str(value)


def log_table(
    trainer: Trainer,
    key: str,
    columns: list[str],
    rows: list[list[Any]],
    out_dir: Path,
) -> None:
    """Log a table at the trainer's global step; ``np.ndarray`` cells are pictures (W&B only: TensorBoard
    and CSV files get the other columns)."""
    if not trainer.is_global_zero or not rows:
        return
    step = trainer.global_step
    wandb_loggers, tensorboard_loggers = _sinks(trainer)
    if wandb_loggers:
        import wandb

        data = [[wandb.Image(v) if isinstance(v, np.ndarray) else v for v in row] for row in rows]
        for logger in wandb_loggers:
            logger.log_table(key=key, columns=list(columns), data=data, step=step)
    keep = [i for i, value in enumerate(rows[0]) if not isinstance(value, np.ndarray)]
    header = [columns[i] for i in keep]
    plain = [[row[i] for i in keep] for row in rows]
    for logger in tensorboard_loggers:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in plain]
        logger.experiment.add_text(key, "\n".join(lines), global_step=step)
    if writes_files(trainer):
        path = Path(out_dir) / f"{_file_name(key)}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(header)
            writer.writerows(plain)
