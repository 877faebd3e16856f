"""ExplanationMonitor: the pieces (batches, registry, overlays, isolation) and short fits on a tiny project.

The tiny project (a 4-class "bright quadrant" task with human maps on the quadrant) lives in this file: the
callback must work for any Lightning project, so nothing comes from ``align`` or ``datamodules``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from explain.attributions.saliency import Saliency, input_gradients
from explain.attributions.sobol import Sobol
from explain.base import Explainer
from explain.callbacks import ExplanationMonitor
from explain.callbacks.batches import collect_class_samples, draw_monitor_set, to_contract
from explain.callbacks.isolation import frozen, preserved_rng
from explain.callbacks.overlays import explanation_panel, grid, overlay
from explain.callbacks.registry import resolve_explainers, resolve_metrics
from explain.metrics import HumanAlignment
from explain.metrics.functional.alignment import per_image_spearman

SIZE = 16
FAST = ["saliency", {"sobol": {"nb_design": 4, "grid_size": 4}}]


# ---------------------------------------------------------------------------- a tiny project
class Quadrants(Dataset):
    """The class is the bright quadrant (0..3); the human map marks it on every ``annotate_every``-th image (0:
    none; ``has_heatmap`` says which). ``spurious=True`` adds the data contract's ``spurious_mask``: a 3x3 corner.

    Shared with ``test_callbacks_ddp_worker.py``.
    """

    def __init__(self, n: int, seed: int = 0, size: int = SIZE, annotate_every: int = 2, spurious: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.3
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.heatmaps = torch.zeros(n, size, size)
        half = size // 2
        for i, label in enumerate(self.labels.tolist()):
            row, col = divmod(label, 2)
            self.images[i, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 0.6
            self.heatmaps[i, row * half : (row + 1) * half, col * half : (col + 1) * half] = 1.0
        self.annotate_every = annotate_every
        self.mask = torch.zeros(size, size, dtype=torch.bool)
        self.mask[:3, :3] = True
        self.spurious = spurious

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        sample = {
            "image": self.images[i],
            "label": self.labels[i],
            "heatmap": self.heatmaps[i],
            "has_heatmap": torch.tensor(self.annotate_every > 0 and i % self.annotate_every == 0),
        }
        if self.spurious:
            sample["spurious_mask"] = self.mask
        return sample


def tiny_network(dropout: float = 0.2) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


class TinyModule(L.LightningModule):
    def __init__(self, dropout: float = 0.2, lr: float = 0.1) -> None:
        super().__init__()
        self.model = tiny_network(dropout)
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch["image"]), batch["label"]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.cross_entropy(self(batch["image"]), batch["label"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyData(L.LightningDataModule):
    def __init__(self, shuffle: bool = True, n_val: int = 24, **data) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.n_val = n_val
        self.data = data  # Quadrants options of every split

    def train_dataloader(self):
        return DataLoader(Quadrants(48, **self.data), batch_size=16, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(Quadrants(self.n_val, seed=1, **self.data), batch_size=8)

    def test_dataloader(self):
        return DataLoader(Quadrants(16, seed=2, **self.data), batch_size=8)


class Recorder(Logger):
    """Keeps every logged scalar: [(step, {key: value})]."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def values(self, key: str) -> list[float]:
        return [row[key] for _, row in self.rows if key in row]


def fit(tmp_path, callbacks, epochs=2, logger=None, module=None, data=None, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = (module or TinyModule)()  # built after seeding: same initial weights in every fit
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data if data is not None else TinyData(), ckpt_path=ckpt_path)
    return trainer, module


def monitor(**kwargs) -> ExplanationMonitor:
    options = {
        "explainers": FAST,
        "metrics": ["alignment", "deletion"],
        "model_attr": "model",
        "num_samples": 6,
        "max_images": 8,
        "every_n_epochs": 1,
    }
    return ExplanationMonitor(**{**options, **kwargs})


# ---------------------------------------------------------------------------- batches
def test_to_contract_reads_dicts_pairs_and_adapters():
    image, label = torch.rand(2, 3, 4, 4), torch.tensor([1, 0])
    pair = to_contract((image, label))
    assert pair.keys() == {"image", "label"} and pair["label"].dtype == torch.int64
    data = to_contract({"image": image, "label": label, "heatmap": torch.rand(2, 1, 4, 4)})
    assert data["heatmap"].shape == (2, 4, 4)  # [B,1,H,W] squeezed
    assert data["has_heatmap"].tolist() == [True, True]  # a heatmap without has_heatmap: all True
    adapted = to_contract([image, label, "path"], adapter=lambda b: {"image": b[0], "label": b[1]})
    assert torch.equal(adapted["image"], image)


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ((torch.rand(2, 3, 4, 4), torch.tensor([1, 0]), torch.rand(2)), TypeError, "batch_adapter"),
        ({"image": torch.rand(2, 3, 4, 4)}, KeyError, "label"),
        ((torch.rand(2, 3, 4, 4), torch.eye(2)), ValueError, "one-hot"),
        ((torch.rand(3, 4, 4), torch.tensor([1])), ValueError, r"\[B, C, H, W\]"),
        (
            {"image": torch.rand(2, 3, 4, 4), "label": torch.tensor([1, 0]), "heatmap": torch.rand(2, 5, 5)},
            ValueError,
            "heatmap",
        ),
        ((torch.rand(2, 3, 4, 4), torch.tensor([1, 0, 1])), ValueError, "B=2"),
    ],
)
def test_to_contract_errors_say_what_to_pass(batch, error, match):
    with pytest.raises(error, match=match):
        to_contract(batch)


def test_monitor_set_is_seeded_indexes_the_dataset_and_keeps_the_global_rng():
    dataset = Quadrants(40, seed=3)
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with preserved_rng():
        first = draw_monitor_set(loader, 5, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG did not move
    again = draw_monitor_set(loader, 5, seed=7)
    other = draw_monitor_set(loader, 5, seed=8)
    assert torch.equal(first["ids"], again["ids"]) and not torch.equal(first["ids"], other["ids"])
    assert len(set(first["ids"].tolist())) == 5
    for row, index in enumerate(first["ids"].tolist()):  # the samples are the dataset's items at those ids
        assert torch.equal(first["image"][row], dataset[index]["image"])
        assert first["label"][row] == dataset[index]["label"]


def test_monitor_set_of_an_iterable_dataset_takes_the_first_samples():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(10):
                yield torch.full((3, 4, 4), float(i)), i % 3

    data = draw_monitor_set(DataLoader(Stream(), batch_size=4), 6, seed=0)
    assert data["ids"].tolist() == list(range(6))
    assert data["image"][:, 0, 0, 0].tolist() == list(range(6))


def test_collect_class_samples_gets_only_the_asked_classes():
    dataset = Quadrants(40)
    found = collect_class_samples(DataLoader(dataset, batch_size=8), [1, 3], per_class=3, seed=0)
    assert set(found) == {1, 3}
    for label, data in found.items():
        assert data["label"].tolist() == [label] * 3
        for row, index in enumerate(data["ids"].tolist()):
            assert torch.equal(data["image"][row], dataset[index]["image"])


# ---------------------------------------------------------------------------- registry
def test_registry_resolves_names_options_classes_factories_and_class_paths():
    specs = resolve_explainers(
        [
            "saliency",
            {"sobol": {"nb_design": 4}},
            {"fast_sobol": functools.partial(Sobol, nb_design=2)},
            {"class_path": "explain.attributions.saliency.SmoothGrad", "init_args": {"nb_samples": 3}},
        ]
    )
    assert [spec.name for spec in specs] == ["saliency", "sobol", "fast_sobol", "smoothgrad"]
    model = tiny_network()
    built = [spec.build(model) for spec in specs]
    assert [type(e).__name__ for e in built] == ["Saliency", "Sobol", "Sobol", "SmoothGrad"]
    assert built[1].nb_design == 4 and built[2].nb_design == 2 and built[3].nb_samples == 3
    assert all(e.model is model for e in built)


def test_registry_names_captum_factories_after_the_method():
    pytest.importorskip("captum")
    from explain.attributions.captum import from_captum

    (spec,) = resolve_explainers([from_captum("IntegratedGradients")])
    assert spec.name == "integratedgradients"
    maps = spec.build(tiny_network().eval())(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    assert maps.shape == (2, 8, 8)


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match="registered names are"):
        resolve_explainers("gradcam_typo")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nb_desing'\]"):
        resolve_explainers({"sobol": {"nb_desing": 4}})
    with pytest.raises(ValueError, match="two explainers are named"):
        resolve_explainers(["saliency", Saliency])
    with pytest.raises(TypeError, match="not an explain.Explainer"):
        resolve_explainers([nn.Linear])
    bound = Saliency(tiny_network())
    (spec,) = resolve_explainers([bound])
    with pytest.raises(ValueError, match="already bound"):
        spec.build(tiny_network())
    assert spec.build(bound.model) is bound
    with pytest.raises(TypeError, match="ExplanationMetric"):
        resolve_metrics([torch.nn.MSELoss()])
    assert list(resolve_metrics(["alignment", {"sharp": HumanAlignment(top_fraction=0.05)}])) == ["alignment", "sharp"]


def test_monitor_validates_arguments():
    for kwargs, match in [
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"num_samples": 0}, "num_samples"),
        ({"on_error": "ignore"}, "on_error"),
        ({"max_images": -1}, "max_images"),
        ({"target": "logit"}, "target"),
        ({"batch_adapter": "not callable"}, "batch_adapter"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            ExplanationMonitor(["saliency"], **kwargs)


# ---------------------------------------------------------------------------- overlays and isolation
def test_overlay_is_the_alpha_blend_and_panels_have_the_expected_layout():
    image = torch.rand(3, 8, 8)
    heatmap = torch.zeros(8, 8)
    heatmap[0, 0] = 1.0
    blended = overlay(image, heatmap, alpha=0.25, cmap="gray")  # gray colormap: colour = scaled map
    assert torch.allclose(blended[:, 0, 0], 0.75 * image[:, 0, 0] + 0.25)
    assert torch.allclose(blended[:, 1, 1], 0.75 * image[:, 1, 1])
    two = explanation_panel(image, heatmap, min_size=32)
    three = explanation_panel(image, heatmap, human=heatmap, min_size=32)
    assert two.shape == (32, 64, 3) and three.shape == (32, 96, 3) and two.dtype == np.uint8
    assert grid([two, three], nrow=2, padding=2).shape == (32 + 4, 2 * (96 + 2) + 2, 3)
    # same-size pictures: the layout of torchvision's make_grid
    from torchvision.utils import make_grid

    pictures = [np.random.randint(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(5)]
    stacked = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in pictures])
    expected = make_grid(stacked, nrow=3, padding=2, pad_value=255)
    assert np.array_equal(grid(pictures, nrow=3, padding=2), expected.permute(1, 2, 0).numpy())


def test_isolation_restores_rngs_and_requires_grad():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(5)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    model = tiny_network()
    model[0].weight.requires_grad_(False)
    with frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad


# ---------------------------------------------------------------------------- fits
def test_fit_logs_metrics_drift_overlays_and_table_files(tmp_path):
    recorder = Recorder()
    csv_logger = CSVLogger(tmp_path)
    trainer, module = fit(tmp_path, [monitor()], epochs=3, logger=[csv_logger, recorder])
    for explainer in ("saliency", "sobol"):
        # HumanAlignment logs every score of compute_all(), its main one (alignment) under the metric's name
        for metric in ("alignment", "alignment/spearman", "alignment/dice", "alignment/iou", "deletion"):
            assert len(recorder.values(f"explain/{explainer}/{metric}")) == 3
        assert not recorder.values(f"explain/{explainer}/alignment/alignment")
        # no reference at the first evaluation, then one value per evaluation
        assert len(recorder.values(f"explain/{explainer}/drift_vs_previous")) == 2
        first = recorder.values(f"explain/{explainer}/drift_vs_first")
        assert len(first) == 2 and all(-1 <= v <= 1 for v in first)
    # CSV/None logger: PNG grids under the run directory, the per-image table as CSV
    out = Path(csv_logger.log_dir) / "explanations"
    assert sorted(p.name for p in out.glob("epoch=*")) == ["epoch=0000", "epoch=0001", "epoch=0002"]
    assert (out / "epoch=0002" / "explain.sobol.overlays.png").is_file()
    with open(out / "explain.per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 * 6  # evaluations x explainers x monitor images
    columns = {"epoch", "id", "label", "explainer", "drift_vs_previous", "drift_vs_first", "human_spearman"}
    assert columns <= set(rows[0])


def test_dataset_metrics_equal_a_direct_computation(tmp_path):
    """explain/saliency/alignment[/...] is HumanAlignment fed by hand with Saliency maps of the validation data."""
    recorder = Recorder()
    callback = monitor(explainers=["saliency"], metrics=["alignment"], max_images=None)
    trainer, module = fit(tmp_path, [callback], epochs=1, logger=recorder)
    metric = HumanAlignment()
    for batch in trainer.datamodule.val_dataloader():
        maps = Saliency(module.model)(batch["image"], batch["label"])
        metric.update(maps=maps, human=batch["heatmap"], has_heatmap=batch["has_heatmap"])
    # the recorded value is the one of epoch 0, taken before training went on: compare with the model then
    assert recorder.values("explain/saliency/alignment")[-1] == pytest.approx(float(metric.compute()), abs=1e-6)
    for key, value in metric.compute_all().items():
        logged = "explain/saliency/alignment" + ("" if key == "alignment" else f"/{key}")
        assert recorder.values(logged)[-1] == pytest.approx(float(value), abs=1e-6), key


def test_defaults_follow_the_issue():
    """ExplanationMonitor(explainers, metrics, every_n_epochs=1, num_samples=16, log_images=True,
    batch_adapter=None, on_error="raise", seed=0): the configs pick cheaper schedules, not the class."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(ExplanationMonitor).parameters.items()}
    expected = {"every_n_epochs": 1, "num_samples": 16, "log_images": True, "batch_adapter": None}
    assert {k: defaults[k] for k in expected} == expected
    assert defaults["on_error"] == "raise" and defaults["seed"] == 0
    callback = ExplanationMonitor()
    assert callback.every_n_epochs == 1 and callback.num_samples == 16


def test_drift_values_are_spearman_of_the_monitor_maps(tmp_path):
    """Explain the monitor set after each epoch by hand: the logged drift is the mean Spearman rho."""

    class Snapshots(Callback):
        def __init__(self):
            self.maps = []

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                data = callback._monitor
                with torch.inference_mode(False):
                    self.maps.append(Saliency(pl_module.model)(data["image"].clone(), data["label"].clone()))

    recorder, snapshots = Recorder(), Snapshots()
    callback = monitor(explainers=["saliency"], metrics=[])
    fit(tmp_path, [callback, snapshots], epochs=3, logger=recorder)
    m0, m1, m2 = snapshots.maps
    assert recorder.values("explain/saliency/drift_vs_previous") == pytest.approx(
        [float(per_image_spearman(m1, m0).mean()), float(per_image_spearman(m2, m1).mean())], abs=1e-5
    )
    assert recorder.values("explain/saliency/drift_vs_first")[-1] == pytest.approx(
        float(per_image_spearman(m2, m0).mean()), abs=1e-5
    )


def test_default_monitor_explains_a_lipschitz_network_with_eva_too(tmp_path):
    """No explainers given: Saliency + Sobol, and EVA because the network says ``lipschitz_body = True``."""
    from align.models import lip_vgg  # tests may use the project's zoo; explain itself never does

    class LipModule(TinyModule):
        def __init__(self):
            super().__init__()
            self.model = lip_vgg(4, widths=(4, 8), depth=1)

    recorder = Recorder()
    callback = ExplanationMonitor(model_attr="model", num_samples=2, max_images=2, every_n_epochs=1)
    fit(tmp_path, [callback], epochs=2, logger=recorder, module=LipModule)
    assert callback.explainer_names == ["saliency", "sobol", "eva"]
    for name in callback.explainer_names:
        for key in ("alignment", "deletion", "drift_vs_first"):  # default metrics: the data has human maps
            assert len(recorder.values(f"explain/{name}/{key}")) >= 1, (name, key)


def test_no_logger_writes_png_under_default_root_dir(tmp_path):
    fit(tmp_path, [monitor(metrics=[])], epochs=1)
    assert (tmp_path / "explanations" / "epoch=0000" / "explain.saliency.overlays.png").is_file()


def test_training_is_unchanged_by_the_callback(tmp_path):
    """Same seed, same weights with or without the monitor (dropout, shuffling and BatchNorm included)."""
    _, without = fit(tmp_path / "a", [], epochs=2)
    callback = monitor(explainers=[*FAST, {"smoothgrad": {"nb_samples": 3, "seed": None}}])  # global-RNG explainer
    _, with_monitor = fit(tmp_path / "b", [callback], epochs=2)
    assert callback._evaluations == 2
    for (name, a), (_, b) in zip(without.state_dict().items(), with_monitor.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in with_monitor.parameters())


class ModeProbe(Callback):
    """Records the train/eval flags and grad mode seen right after the monitor's hooks."""

    def __init__(self):
        self.flags = []
        self.inference = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.flags.append([m.training for m in pl_module.modules()])
        self.inference.append(torch.is_inference_mode_enabled())

    def on_train_epoch_end(self, trainer, pl_module):
        self.flags.append([m.training for m in pl_module.modules()])


def test_modes_are_restored_and_inference_mode_is_fine(tmp_path):
    probe_with, probe_without = ModeProbe(), ModeProbe()
    recorder = Recorder()
    trainer, module = fit(tmp_path / "a", [monitor(), probe_with], epochs=2, logger=recorder)
    fit(tmp_path / "b", [probe_without], epochs=2)
    assert probe_with.flags == probe_without.flags  # train/eval flags of every submodule, hook after hook
    # validation inside fit runs under no_grad; trainer.validate under torch.inference_mode (Lightning's default)
    trainer.validate(module, datamodule=TinyData(), verbose=False)
    assert probe_with.inference[-1] is True
    assert len(recorder.values("explain/sobol/deletion")) == 3
    assert len(recorder.values("explain/sobol/drift_vs_previous")) == 2


class CountingSaliency(Explainer):
    calls: list[tuple[int, bool]] = []

    def explain(self, images, targets):
        CountingSaliency.calls.append((images.shape[0], torch.is_grad_enabled()))
        return input_gradients(self.model, images, targets).abs().amax(1)


def test_sanity_check_is_skipped_and_every_n_epochs_is_followed(tmp_path):
    CountingSaliency.calls = []
    callback = monitor(explainers=[CountingSaliency], metrics=["deletion"], every_n_epochs=2, max_images=8)
    fit(tmp_path, [callback], epochs=3, num_sanity_val_steps=2)
    # epochs 0 and 2 only, nothing in the sanity check: per evaluation one validation batch (8 = max_images)
    # and the monitor set (6)
    assert CountingSaliency.calls == [(8, True), (6, True)] * 2
    assert callback._evaluations == 2


class Broken(Explainer):
    def explain(self, images, targets):
        raise RuntimeError("boom: this explainer is broken")


def test_on_error_warn_keeps_training_and_raise_stops(tmp_path):
    recorder = Recorder()
    callback = monitor(explainers=["saliency", Broken], on_error="warn")
    with pytest.warns(UserWarning, match=r"explainer 'broken'.*boom"):
        trainer, _ = fit(tmp_path / "warn", [callback], epochs=2, logger=recorder)
    assert trainer.current_epoch == 2 and trainer.state.finished
    assert len(recorder.values("explain/saliency/alignment")) == 2
    assert not any(key.startswith("explain/broken") for _, row in recorder.rows for key in row)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path / "raise", [monitor(explainers=["saliency", Broken])], epochs=2)


def test_metric_needing_human_maps_on_data_without_them_is_a_clear_error(tmp_path):
    callback = monitor(metrics=["alignment"], batch_adapter=lambda b: {"image": b["image"], "label": b["label"]})
    with pytest.raises(ValueError, match="needs human maps"):
        fit(tmp_path, [callback], epochs=1)


def test_a_monitor_that_never_ran_says_so(tmp_path):
    callback = monitor()
    with pytest.warns(UserWarning, match="never ran"):
        fit(tmp_path, [callback], epochs=1, limit_val_batches=0)
    assert callback._evaluations == 0


def test_wrong_model_attr_fails_at_setup(tmp_path):
    with pytest.raises(AttributeError, match="model_attr='net'"):
        fit(tmp_path, [monitor(model_attr="net")], epochs=1)


def test_resume_from_checkpoint_logs_the_same_drift(tmp_path):
    """Fit 2 epochs, resume to 4, and compare with 4 epochs straight (deterministic training)."""
    keys = [f"explain/{e}/{k}" for e in ("saliency", "sobol") for k in ("drift_vs_previous", "drift_vs_first")]
    straight = Recorder()
    deterministic = {"module": functools.partial(TinyModule, dropout=0.0), "data": TinyData(shuffle=False)}
    fit(tmp_path / "straight", [monitor(metrics=[])], epochs=4, logger=straight, **deterministic)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_half = Recorder()
    fit(tmp_path / "half", [monitor(metrics=[]), checkpoint], epochs=2, logger=first_half, **deterministic)
    resumed = Recorder()
    callbacks = [monitor(metrics=[]), ModelCheckpoint(dirpath=tmp_path / "ckpt2")]
    last = str(tmp_path / "ckpt" / "last.ckpt")
    fit(tmp_path / "resumed", callbacks, epochs=4, logger=resumed, ckpt_path=last, **deterministic)
    for key in keys:
        interrupted = first_half.values(key) + resumed.values(key)
        assert len(interrupted) == len(straight.values(key)) >= 3
        assert interrupted == pytest.approx(straight.values(key), abs=1e-6), key


def test_callback_state_round_trips():
    """The monitor set and each explainer's ExplanationDrift references survive state_dict/load_state_dict."""
    callback = monitor()
    callback._monitor = {"ids": torch.arange(3), "image": torch.rand(3, 3, 4, 4), "label": torch.zeros(3).long()}
    maps = torch.rand(3, 4, 4)
    drift = callback.drift_metric("saliency")
    drift.update(maps=maps, ids=torch.arange(3))
    drift.reset()  # the first evaluation becomes the reference
    callback._evaluations, callback._last_epoch = 2, 1
    other = monitor()
    other.load_state_dict(callback.state_dict())
    assert other._evaluations == 2 and other._last_epoch == 1
    assert torch.equal(other._monitor["image"], callback._monitor["image"])
    restored = other.drift_metric("saliency")
    restored.update(maps=maps.flip(-1), ids=torch.arange(3))
    expected = per_image_spearman(maps.flip(-1), maps).mean()
    assert restored.compute()["vs_first"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert other.state_dict()["drift"].keys() == {"saliency"}


# ---------------------------------------------------------------------------- configuration
def test_lightning_cli_yaml_with_names_options_and_class_paths(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: explain.callbacks.ExplanationMonitor
      init_args:
        model_attr: model
        num_samples: 4
        every_n_epochs: 2
        explainers:
          - saliency
          - sobol: {nb_design: 4, grid_size: 4}
          - class_path: explain.attributions.saliency.SmoothGrad
            init_args: {nb_samples: 2}
        metrics:
          - alignment
          - class_path: explain.metrics.fidelity.Deletion
            init_args: {steps: 4}
"""
    )
    cli = LightningCLI(TinyModule, TinyData, run=False, args=["--config", str(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    assert callback.explainer_names == ["saliency", "sobol", "smoothgrad"]
    assert list(callback._metric_templates) == ["alignment", "deletion"]
    assert callback._metric_templates["deletion"].steps == 4
    assert callback.every_n_epochs == 2 and callback.num_samples == 4
    model = tiny_network()
    built = [spec.build(model) for spec in callback._specs]
    assert built[1].nb_design == 4 and built[2].nb_samples == 2


# ---------------------------------------------------------------------------- loggers
def test_tensorboard_logger_gets_images_and_the_table(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    fit(tmp_path, [monitor()], epochs=2, logger=logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    assert {"explain/saliency/overlays", "explain/sobol/overlays"} <= set(events.Tags()["images"])
    assert len(events.Images("explain/sobol/overlays")) == 2
    assert "explain/saliency/drift_vs_first" in events.Tags()["scalars"]
    assert any(tag.startswith("explain/per_image") for tag in events.Tags()["tensors"])  # add_text
    assert not (Path(logger.log_dir) / "explanations").exists()  # no PNG files when a logger takes images


def test_wandb_offline_run_holds_metric_keys_images_and_tables(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="callbacks-test")
    try:
        fit(tmp_path, [monitor()], epochs=2, logger=logger)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    # read the run back with wandb's own reader of offline runs (wandb leet inspect)
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    history = [json.loads(line)["history"]["item"] for line in out.stdout.splitlines() if '"type":"history"' in line]
    keys = set().union(*history)
    for key in ("explain/saliency/alignment", "explain/sobol/deletion", "explain/sobol/drift_vs_first"):
        assert key in keys
    images = [item for item in history if item.get("explain/saliency/overlays._type") == "images/separated"]
    assert len(images) == 2 and len(images[0]["explain/saliency/overlays.captions"]) == 6
    assert all((run_dir / "files" / name).is_file() for name in images[0]["explain/saliency/overlays.filenames"])
    tables = [item for item in history if item.get("explain/per_image._type") == "table-file"]
    assert len(tables) == 2
    table = json.loads((run_dir / "files" / tables[-1]["explain/per_image.path"]).read_text())
    assert {"epoch", "id", "explainer", "drift_vs_previous", "drift_vs_first", "overlay"} <= set(table["columns"])
    assert len(table["data"]) == 2 * 6


# ---------------------------------------------------------------------------- spurious mass (issue 13)
def test_spurious_mass_is_logged_when_and_only_when_batches_carry_a_mask(tmp_path):
    from explain.metrics import SpuriousMass

    recorder, csv_logger = Recorder(), CSVLogger(tmp_path)
    callback = monitor(explainers=["saliency"], metrics=["deletion"], max_images=None)
    trainer, module = fit(tmp_path, [callback], epochs=1, logger=[csv_logger, recorder], data=TinyData(spurious=True))
    # the logged value is SpuriousMass fed by hand with Saliency maps of the validation data (model of epoch 0:
    # compare after one epoch, whose validation ran after its training)
    metric = SpuriousMass()
    for batch in trainer.datamodule.val_dataloader():
        metric.update(maps=Saliency(module.model)(batch["image"], batch["label"]), spurious_mask=batch["spurious_mask"])
    (logged,) = recorder.values("explain/saliency/spurious_mass")
    assert logged == pytest.approx(float(metric.compute()), abs=1e-6) and 0 <= logged <= 1
    assert recorder.values("explain/spurious_area") == [pytest.approx(9 / SIZE**2)]  # once, not per explainer
    with open(Path(csv_logger.log_dir) / "explanations" / "explain.per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert all(0 <= float(row["spurious_mass"]) <= 1 for row in rows)
    # the same data without the mask: no key, no column
    plain = Recorder()
    fit(tmp_path / "plain", [monitor(explainers=["saliency"], metrics=["deletion"])], epochs=1, logger=plain)
    assert not [key for _, row in plain.rows for key in row if "spurious" in key]
    assert plain.values("explain/saliency/deletion")


def test_spurious_mass_can_be_turned_off_and_a_listed_metric_needs_the_mask(tmp_path):
    recorder = Recorder()
    callback = monitor(explainers=["saliency"], metrics=[], spurious_mass=False)
    fit(tmp_path, [callback], epochs=1, logger=recorder, data=TinyData(spurious=True))
    assert not [key for _, row in recorder.rows for key in row if "spurious" in key]
    with pytest.raises(ValueError, match="spurious_mask"):
        fit(tmp_path / "b", [monitor(explainers=["saliency"], metrics=["spurious"])], epochs=1)


def test_test_time_metrics_of_each_test_split(tmp_path):
    from explain.metrics import SpuriousMass

    recorder = Recorder()
    callback = monitor(explainers=["saliency"], metrics=["alignment"], max_images=None)
    trainer, module = fit(tmp_path, [callback], epochs=1, logger=recorder, data=TinyData(spurious=True))
    trainer.test(module, datamodule=trainer.datamodule, verbose=False)
    metric, alignment = SpuriousMass(), HumanAlignment()
    for batch in trainer.datamodule.test_dataloader():
        maps = Saliency(module.model)(batch["image"], batch["label"])
        metric.update(maps=maps, spurious_mask=batch["spurious_mask"])
        alignment.update(maps=maps, human=batch["heatmap"], has_heatmap=batch["has_heatmap"])
    assert recorder.values("test/explain/saliency/spurious_mass") == [pytest.approx(float(metric.compute()), abs=1e-6)]
    assert recorder.values("test/explain/saliency/alignment") == [pytest.approx(float(alignment.compute()), abs=1e-6)]
    assert recorder.values("test/explain/spurious_area") == [pytest.approx(9 / SIZE**2)]


def test_overlays_outline_the_spurious_region():
    image, heatmap = torch.rand(3, 8, 8) * 0.5, torch.rand(8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:2, :2] = True
    plain = explanation_panel(image, heatmap, min_size=8)
    outlined = explanation_panel(image, heatmap, min_size=8, spurious=mask)
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[:3, :3] = True
    ring[:2, :2] = False  # the pixels just outside the region
    for tile in range(2):  # the image and the map overlay
        crop = outlined[:, tile * 8 : (tile + 1) * 8]
        assert (crop[ring.numpy()] == 255).all()  # white outline
        assert np.array_equal(crop[~ring.numpy()], plain[:, tile * 8 : (tile + 1) * 8][~ring.numpy()])


# ---------------------------------------------------------------------------- issue 9: resume, no maps, values
def test_resume_with_another_schedule_keeps_the_monitor_set_and_the_references(tmp_path):
    """every_n_epochs 1 for two epochs, resumed with every_n_epochs 2: the epoch-2 evaluation still compares with
    the first one (the state was loaded), exactly as a run never interrupted."""
    deterministic = {"module": functools.partial(TinyModule, dropout=0.0), "data": TinyData(shuffle=False)}
    straight = Recorder()
    fit(tmp_path / "straight", [monitor(metrics=[])], epochs=3, logger=straight, **deterministic)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "half", [monitor(metrics=[]), checkpoint], epochs=2, **deterministic)
    resumed, callback = Recorder(), monitor(metrics=[], every_n_epochs=2)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    fit(tmp_path / "resumed", [callback], epochs=3, logger=resumed, ckpt_path=last, **deterministic)
    assert callback._evaluations == 3  # 2 loaded + the one of epoch 2
    for name in ("saliency", "sobol"):
        key = f"explain/{name}/drift_vs_first"
        assert resumed.values(key) == pytest.approx(straight.values(key)[-1:], abs=1e-6), key


def test_no_human_map_at_all_logs_no_alignment_and_warns_once(tmp_path):
    recorder = Recorder()
    callback = monitor(explainers=["saliency"], metrics=["alignment", "deletion"])
    with pytest.warns(UserWarning, match="no image fed to metric 'alignment' has a human map") as warned:
        fit(tmp_path, [callback], epochs=2, logger=recorder, data=TinyData(annotate_every=0))
    assert len([w for w in warned if "has a human map" in str(w.message)]) == 1
    assert not [key for _, row in recorder.rows for key in row if "alignment" in key]
    assert len(recorder.values("explain/saliency/deletion")) == 2


class Snapshots(Callback):
    """Saliency maps and predictions of the monitor set at each validation, explained by hand."""

    def __init__(self, callback: ExplanationMonitor, target: str = "label"):
        self.callback, self.target = callback, target
        self.maps, self.predictions = [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            data = self.callback._monitor
            with torch.inference_mode(False), torch.no_grad():
                images = data["image"].clone()
                predictions = pl_module.model.eval()(images).argmax(1)
                pl_module.model.train()
            targets = predictions if self.target == "prediction" else data["label"].clone()
            with torch.inference_mode(False):
                self.maps.append(Saliency(pl_module.model)(images, targets))
            self.predictions.append(predictions)


def test_per_image_table_values_are_the_drifts_and_the_human_spearman_of_each_image(tmp_path):
    csv_logger = CSVLogger(tmp_path)
    callback = monitor(explainers=["saliency"], metrics=[])
    snapshots = Snapshots(callback)
    fit(tmp_path, [callback, snapshots], epochs=3, logger=csv_logger)
    with open(Path(csv_logger.log_dir) / "explanations" / "explain.per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    data = callback._monitor
    m0, m1, m2 = snapshots.maps
    expected = {
        "drift_vs_previous": per_image_spearman(m2, m1),
        "drift_vs_first": per_image_spearman(m2, m0),
        "human_spearman": per_image_spearman(m2, data["heatmap"]),
    }
    last = [row for row in rows if row["epoch"] == "2"]
    assert [int(row["id"]) for row in last] == data["ids"].tolist()
    assert [int(row["prediction"]) for row in last] == snapshots.predictions[-1].tolist()
    for i, row in enumerate(last):
        assert float(row["drift_vs_previous"]) == pytest.approx(float(expected["drift_vs_previous"][i]), abs=1e-4)
        assert float(row["drift_vs_first"]) == pytest.approx(float(expected["drift_vs_first"][i]), abs=1e-4)
        if data["has_heatmap"][i]:
            assert float(row["human_spearman"]) == pytest.approx(float(expected["human_spearman"][i]), abs=1e-4)
        else:
            assert math.isnan(float(row["human_spearman"]))
    assert not torch.allclose(expected["drift_vs_previous"], expected["drift_vs_first"], atol=1e-3)  # can tell
    first = [row for row in rows if row["epoch"] == "0"]
    assert all(math.isnan(float(row["drift_vs_first"])) for row in first)  # no reference yet


def test_target_prediction_explains_the_predicted_class(tmp_path):
    """An untrained model (lr 0) is often wrong: explaining its prediction differs from explaining the label."""
    recorder = Recorder()
    callback = monitor(explainers=["saliency"], metrics=["alignment"], target="prediction", max_images=None)
    snapshots = Snapshots(callback, target="prediction")
    untrained = functools.partial(TinyModule, lr=0.0, dropout=0.0)
    trainer, module = fit(tmp_path, [callback, snapshots], epochs=1, logger=recorder, module=untrained)
    model = module.model.eval()
    by_prediction, by_label = HumanAlignment(), HumanAlignment()
    for batch in trainer.datamodule.val_dataloader():
        predictions = model(batch["image"]).argmax(1)
        assert (predictions != batch["label"]).any()
        for metric, targets in ((by_prediction, predictions), (by_label, batch["label"])):
            metric.update(Saliency(model)(batch["image"], targets), batch["heatmap"], batch["has_heatmap"])
    (logged,) = recorder.values("explain/saliency/alignment")
    assert logged == pytest.approx(float(by_prediction.compute()), abs=1e-6)
    assert logged != pytest.approx(float(by_label.compute()), abs=1e-3)
