"""The callbacks in an UNRELATED Lightning project: its own LightningModule around a torchvision resnet18 (no
weights), torchvision FakeData, batches that are not the data contract (read through a batch_adapter).

Nothing here comes from ``align`` or ``datamodules``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import FakeData
from torchvision.models import resnet18
from torchvision.transforms import v2

import explain
from explain.callbacks import ExplanationMonitor


class Indexed(Dataset):
    """FakeData samples as (image, label, index) triples: not an (image, label) pair, so an adapter is needed."""

    def __init__(self, size: int, seed: int) -> None:
        transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.data = FakeData(size=size, image_size=(3, 16, 16), num_classes=10, transform=transform, random_offset=seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        image, label = self.data[i]
        return image, label, i


class ResNetClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = resnet18(weights=None, num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels, _ = batch
        return nn.functional.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def adapter(batch):
    images, labels, _ = batch
    return {"image": images, "label": labels}


def test_monitor_runs_on_a_resnet18_project_through_a_batch_adapter(tmp_path, quiet_trainer):
    L.seed_everything(0, verbose=False)
    callback = ExplanationMonitor(
        explainers=["saliency", {"sobol": {"nb_design": 2, "grid_size": 4}}],
        metrics=["deletion"],
        num_samples=4,
        max_images=4,
        every_n_epochs=1,
        batch_adapter=adapter,
    )  # model_attr=None: the LightningModule itself is explained (its forward returns logits)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, callbacks=[callback], logger=logger
    )
    trainer.fit(
        ResNetClassifier(),
        DataLoader(Indexed(8, seed=0), batch_size=4),
        DataLoader(Indexed(8, seed=100), batch_size=4),
    )
    metrics = trainer.callback_metrics
    for key in ("explain/saliency/deletion", "explain/sobol/deletion", "explain/sobol/drift_vs_first"):
        assert key in metrics and torch.isfinite(metrics[key])
    # no human maps in this data: panels are [image | map over image], logged as PNG grids
    out = tmp_path / "lightning_logs" / "version_0" / "explanations"
    assert (out / "epoch=0001" / "explain.saliency.overlays.png").is_file()


def test_without_adapter_a_triple_batch_is_a_clear_error(tmp_path, quiet_trainer):
    import pytest

    callback = ExplanationMonitor(explainers=["saliency"], metrics=[], num_samples=2)
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=1, callbacks=[callback], logger=False
    )
    with pytest.raises(TypeError, match="batch_adapter"):
        train, val = DataLoader(Indexed(4, seed=0), batch_size=2), DataLoader(Indexed(4, seed=1), batch_size=2)
        trainer.fit(ResNetClassifier(), train, val)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_explain_callbacks_import_nothing_from_align_or_datamodules():
    """Follow every ``explain.*`` import from explain/callbacks (transitively): none reaches align/datamodules."""
    root = Path(explain.__file__).parent.parent
    todo = [p for p in (root / "explain" / "callbacks").glob("*.py")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_modules(path):
            assert name.split(".")[0] not in ("align", "datamodules"), f"{path} imports {name}"
            if name.split(".")[0] == "explain":
                candidate = root.joinpath(*name.split("."))
                for module in (candidate.with_suffix(".py"), candidate / "__init__.py"):
                    if module.is_file():
                        todo.append(module)
    assert len(seen) > 5
