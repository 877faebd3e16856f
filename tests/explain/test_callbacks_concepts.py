"""ConceptMonitor (CRAFT) and FeatureVizMonitor (MACO): what they log equals CRAFT / MACO run by hand."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from explain.callbacks import ConceptMonitor, FeatureVizMonitor
from explain.callbacks.batches import collect_class_samples, draw_monitor_set
from explain.callbacks.featureviz_monitor import maco_panel


class Blobs(Dataset):
    """Class c: a bright square in quadrant c on noise, 16 x 16."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 0.3
        self.labels = torch.arange(n) % 4
        for i, label in enumerate(self.labels.tolist()):
            row, col = divmod(label, 2)
            self.images[i, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] += 0.6

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(quiet_trainer, tmp_path, callback, epochs=1):
    L.seed_everything(0, verbose=False)
    module = Net()
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback], logger=logger)
    val = DataLoader(Blobs(24, seed=1), batch_size=8)
    trainer.fit(module, DataLoader(Blobs(32, seed=0), batch_size=8), val)
    return module, val, logger.log_dir + "/explanations"


def test_concept_monitor_logs_the_gallery_and_the_importance_of_craft(tmp_path, quiet_trainer):
    from explain.concepts import Craft, split_model

    callback = ConceptMonitor(classes=[1, 2], num_images=6, n_concepts=3, nb_design=8, top_k=3, model_attr="model")
    module, val, out = fit(quiet_trainer, tmp_path, callback)
    for class_id in (1, 2):
        picture = np.asarray(Image.open(f"{out}/epoch=0000/concepts.class_{class_id}.gallery.png"))
        assert picture.ndim == 3 and picture.shape[2] == 3 and picture.std() > 0
    with open(f"{out}/concepts.importance.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["class"]), int(r["concept"])) for r in rows] == [(c, k) for c in (1, 2) for k in range(3)]
    # the same CRAFT by hand, on the same images of class 2 and the trained network
    images = collect_class_samples(val, [2], per_class=6, seed=0)[2]["image"]
    craft = Craft(*split_model(module.model), n_concepts=3).fit(images, class_id=2)
    expected = craft.importance(images, nb_design=8, seed=0)
    logged = [float(r["importance"]) for r in rows if r["class"] == "2"]
    assert logged == pytest.approx(expected.tolist(), abs=1e-5)


def test_concept_monitor_validates_and_warns(tmp_path, quiet_trainer):
    with pytest.raises(ValueError, match="classes"):
        ConceptMonitor(classes=[])
    with pytest.raises(ValueError, match="craft_options"):
        ConceptMonitor(classes=[0], craft_options={"n_concepts": 3})
    callback = ConceptMonitor(classes=[7], num_images=4, n_concepts=2, model_attr="model", on_error="warn")
    with pytest.warns(UserWarning, match="class 7"):
        fit(quiet_trainer, tmp_path, callback)


def test_featureviz_monitor_logs_maco_of_each_class(tmp_path, quiet_trainer):
    from explain.featureviz import logit, maco, magnitude_spectrum

    callback = FeatureVizMonitor(classes=[0, 3], steps=3, crops_per_step=2, spectrum_images=8, model_attr="model")
    module, val, out = fit(quiet_trainer, tmp_path, callback)
    grid = np.asarray(Image.open(f"{out}/epoch=0000/featureviz.maco.png"))
    # MACO by hand with the same magnitude (the seeded draw of 8 validation images) and seed
    magnitude = magnitude_spectrum(draw_monitor_set(val, 8, seed=0)["image"], image_size=16)
    image, alpha = maco(logit(module.model, 3), 16, steps=3, magnitude=magnitude, crops_per_step=2, seed=0,
                        input_size=(16, 16))
    panel = maco_panel(image, alpha)
    # the grid holds [class 0 | class 3] with 4 pixels of padding
    height, width = panel.shape[:2]
    assert np.array_equal(grid[4 : 4 + height, 4 + width + 4 : 4 + 2 * width + 4], panel)


def test_featureviz_monitor_rejects_unknown_maco_options():
    with pytest.raises(ValueError, match="unknown maco_options"):
        FeatureVizMonitor(classes=[0], maco_options={"learning_rate": 1.0})


def test_rank_zero_monitors_keep_their_state_keys_common_options_and_checks():
    from jsonargparse import ArgumentParser

    concept = ConceptMonitor(classes=[1], n_concepts=3, model_attr="model", on_error="warn", seed=4)
    # Lightning's state key format: qualified class name + repr of the identifying options, in this order
    assert concept.state_key == "ConceptMonitor{'classes': [1], 'at': None, 'n_concepts': 3}"
    assert (concept.model_attr, concept.on_error, concept.seed, concept.every_n_epochs) == ("model", "warn", 4, 5)
    featureviz = FeatureVizMonitor(classes=2, image_size=8, steps=3)
    assert featureviz.state_key == "FeatureVizMonitor{'classes': [2], 'image_size': 8, 'steps': 3}"
    with pytest.raises(ValueError, match="FeatureVizMonitor: image_size must be a positive int or None, got True"):
        FeatureVizMonitor(classes=[0], image_size=True)
    with pytest.raises(ValueError, match="ConceptMonitor: top_k must be a positive int, got 0"):
        ConceptMonitor(classes=[0], top_k=0)
    with pytest.raises(TypeError, match="model_atr"):
        ConceptMonitor(classes=[0], model_atr="model")
    # LightningCLI (jsonargparse) sees the options every monitor takes through **monitor_options
    for cls in (ConceptMonitor, FeatureVizMonitor):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "monitor")
        options = set(vars(parser.get_defaults().monitor))
        assert {"model_attr", "batch_adapter", "on_error", "seed", "every_n_epochs"} <= options
