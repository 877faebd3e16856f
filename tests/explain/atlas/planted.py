"""Planted ground truth for the atlas tests: images with one coloured square per class on grey noise, and a tiny
network whose layer has one channel per colour (plus one for the grey background) and whose head reads class
``k`` mostly from channel ``k``. The atlas must find, for each class, a concept whose atom is channel ``k``
(cosine > 0.9) and rank it first; the grey background concept is second.

``python planted.py FOLDER`` writes the images; ``planted.planted_model`` is the model (``--model planted.planted_model``
with this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

COLOURS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
SIZE, SQUARE = 32, 12


def planted_model(num_classes: int = 3) -> nn.Sequential:
    """conv 1x1 (red, green, blue, grey detectors), ReLU, 4x4 average pooling, global pooling, linear head."""
    conv = nn.Conv2d(3, 4, 1)
    head = nn.Linear(4, num_classes)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]], dtype=torch.float32)[..., None, None])
        conv.bias.copy_(torch.tensor([0, 0, 0, -1.2]))
        weight = torch.zeros(num_classes, 4)
        weight[:, 3] = 1.0
        for k in range(min(num_classes, 3)):
            weight[k, k] = 4.0
        head.weight.copy_(weight)
        head.bias.zero_()
    return nn.Sequential(OrderedDict(
        conv=conv, relu=nn.ReLU(), pool=nn.AvgPool2d(4), gap=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=head,
    ))


def planted_image(label: int, seed: int) -> np.ndarray:
    """uint8 [SIZE, SIZE, 3]: grey noise in [0.4, 0.6] with a square of colour ``label`` at a random place."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.4, 0.6, size=(SIZE, SIZE, 3))
    y, x = rng.integers(0, SIZE - SQUARE + 1, size=2)
    image[y:y + SQUARE, x:x + SQUARE] = COLOURS[label]
    return (image * 255).round().astype(np.uint8)


def write_planted(folder: str | Path, per_class: int = 8, classes: int = 3) -> Path:
    folder = Path(folder)
    for label in range(classes):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(planted_image(label, seed=100 * label + i)).save(folder / f"c{label}" / f"{i:02d}.png")
    return folder



class PlantedModule(L.LightningModule):
    """A LightningModule holding the planted network as ``backbone``, as the project's checkpoints do."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = planted_model(num_classes)

    def forward(self, x):
        return self.backbone(x)



class PlantedDataModule(L.LightningDataModule):
    """The planted images as a datamodule whose validation batches are dicts (the project's data contract)."""

    def __init__(self, per_class: int = 6, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.per_class = per_class
        self.class_names = class_names or ["red", "green", "blue"]

    def val_dataloader(self):
        samples = [
            {"image": torch.from_numpy(planted_image(label, seed=100 * label + i)).permute(2, 0, 1).float() / 255,
             "label": label}
            for i in range(self.per_class) for label in range(3)
        ]
        return torch.utils.data.DataLoader(samples, batch_size=4)


if __name__ == "__main__":
    write_planted(sys.argv[1])
