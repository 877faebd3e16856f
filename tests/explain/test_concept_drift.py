"""ConceptMonitor's concept drift: 1.0 for an unchanged model, lower when the layer moves, kept across a resume."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from explain.callbacks import ConceptMonitor

sys.path.insert(0, str(Path(__file__).parent))  # pytest's importlib mode does not put this folder on the path
from test_callbacks_concepts import Blobs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Frozen(L.LightningModule):
    """lr = 0: the network never changes, unless ``Perturb`` moves its first layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(8, 4))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Perturb(L.Callback):
    """Adds seeded noise of size ``scale`` to the first convolution at the start of every epoch after the first."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            generator = torch.Generator().manual_seed(trainer.current_epoch)
            weight = pl_module.model[0].weight
            with torch.no_grad():
                weight += self.scale * torch.randn(weight.shape, generator=generator)


def run(tmp_path, epochs, scale=0.0, ckpt_path=None, save=None, craft_options=None):
    monitor = ConceptMonitor(classes=[1], every_n_epochs=1, num_images=6, n_concepts=3, nb_design=4, top_k=2,
                             model_attr="model", craft_options=craft_options)
    logger = CSVLogger(tmp_path, name="run", version=0 if ckpt_path is None else 1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=1, logger=logger,
                        callbacks=[monitor, Perturb(scale)], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(Frozen(), DataLoader(Blobs(8, seed=0), batch_size=8), DataLoader(Blobs(24, seed=1), batch_size=8),
                ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {int(r["epoch"]): {k: float(v) for k, v in r.items() if k.startswith("concepts/") and v} for r in rows}


def test_drift_is_one_for_an_unchanged_model_and_falls_when_the_layer_moves(tmp_path):
    still = run(tmp_path / "still", epochs=2)
    assert still[1]["concepts/class_1/drift_previous"] == pytest.approx(1.0, abs=1e-5)
    assert still[1]["concepts/class_1/drift_first"] == pytest.approx(1.0, abs=1e-5)
    assert still[1]["concepts/class_1/born"] == 0 and still[1]["concepts/class_1/importance_shift"] < 1e-5
    assert 0 < still[0]["concepts/class_1/r2_per_dimension"] <= 1
    assert 0 < still[0]["concepts/class_1/concentration"] <= 1
    moved = run(tmp_path / "moved", epochs=3, scale=0.5)
    assert moved[1]["concepts/class_1/drift_previous"] < 0.98
    assert moved[2]["concepts/class_1/drift_first"] < 0.98


def test_resume_keeps_the_drift(tmp_path):
    straight = run(tmp_path / "straight", epochs=3, scale=0.3)
    run(tmp_path / "resumed", epochs=2, scale=0.3, save=tmp_path / "epoch2.ckpt")
    resumed = run(tmp_path / "resumed", epochs=3, scale=0.3, ckpt_path=tmp_path / "epoch2.ckpt")
    for key in ("drift_previous", "drift_first", "importance_shift", "r2_global"):
        assert resumed[2][f"concepts/class_1/{key}"] == pytest.approx(straight[2][f"concepts/class_1/{key}"],
                                                                      abs=1e-5), key


def test_monitor_with_a_sparse_autoencoder(tmp_path):
    logged = run(tmp_path, epochs=2, craft_options={
        "dictionary": "topk_sae", "dictionary_options": {"epochs": 2, "progress": False, "top_k": 1}})
    assert logged[1]["concepts/class_1/drift_previous"] == pytest.approx(1.0, abs=1e-5)
    assert logged[0]["concepts/class_1/l0"] == pytest.approx(1 / 3)  # one active code of three
