"""The human-alignment benchmark of any network (Fel et al. 2022, "Harmonizing the object recognition strategies of
deep neural networks with humans", the headline figure): accuracy against alignment with ClickMe maps.

    python -m align.human_alignment --shards 'clickme/val-*.tfrecords' --num-classes 1000 \\
        --model timm:resnet50:weights/resnet50.safetensors --model torchvision:vit_b_16:weights/vit_b_16.pth \\
        --model harmonized=ckpt:runs/harmonized_resnet50/v0/checkpoints/last.ckpt --out results/alignment
    python -m align.human_alignment --folder my_clickme_folder --model ckpt:last.ckpt --explainer sobol --devices 2

Each model is scored on the ClickMe-format validation data (TFRecord shards, ``--shards``, or a ClickMe folder's
``val.csv``, ``--folder``) as the reference's ``evaluate_clickme``:

* the explainer (default the reference's: ``Saliency``, ``|gradient|`` max over channels, not blurred; or any
  explainer of the project by name, ``--explainer sobol``) explains the LABEL of each image;
* per image, the Spearman rho of the map with the human map, and the Dice and IoU of the pixels strictly above
  each map's 90th percentile (:class:`explain.metrics.HumanAlignment`); images without a human map are skipped;
* ``alignment = mean(rho) / ceiling``; the ceiling comes from the data when two halves of the human maps of each
  image are given (``--halves FILE.npz`` with arrays ``half_a`` and ``half_b`` [N,H,W]: the split-half Spearman
  correlation, Spearman-Brown corrected, :func:`split_half_ceiling`), else it is ``--ceiling`` (0.65753, the ClickMe
  inter-rater ceiling of the paper); the CSV says which (``ceiling_source``).

It runs through Lightning's ``Trainer.test`` (``--devices N`` on N GPUs works as in training: the metrics are
torchmetrics and sync across processes; only rank 0 writes) and writes ``alignment.csv`` and ``alignment.png``
(accuracy against alignment, one labelled point per model: the paper's figure) under ``--out``.

Models (``--model``, repeated; ``LABEL=`` in front names the point, else the file's or the architecture's name):

* ``ckpt:PATH``: a checkpoint of this project's ``HarmonizedClassifier`` (its ``backbone``; inputs as the
  datamodules give them, [0, 1]);
* ``timm:ARCH:WEIGHTS`` / ``torchvision:ARCH:WEIGHTS``: an architecture with ``--num-classes`` outputs and a local
  weights file (``.safetensors`` or a torch state dict; nothing is downloaded) that must fit it entirely; inputs
  normalised with the ImageNet mean and std first (``--normalize none`` to skip).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from align.losses.harmonization import input_gradient
from align.models.pretrained import load_matching, read_state_dict
from explain.attributions.saliency import Saliency, reduce_channels
from explain.base import eval_mode
from explain.callbacks.registry import resolve_explainers
from explain.metrics import HumanAlignment
from explain.metrics.functional.alignment import CLICKME_CEILING, rowwise_spearman

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("ckpt", "timm", "torchvision")


# ------------------------------------------------------------------------------------------------ the ceiling
def split_half_ceiling(half_a: Tensor, half_b: Tensor) -> float:
    """The human ceiling of a data set from two halves of its participants' maps [N,H,W]: the mean over images
    of the Spearman rho between the two halves' maps, ``r``, Spearman-Brown corrected to the full group,
    ``2 r / (1 + r)`` (the split-half reliability of the ClickMe papers).

    Raises:
        ValueError: halves not both [N, H, W] of one shape, or a mean correlation that is not positive (no
            ceiling to divide by).
    """
    if half_a.ndim != 3 or half_a.shape != half_b.shape:
        raise ValueError(f"the halves must both be [N, H, W] of one shape, got {tuple(half_a.shape)} and "
                         f"{tuple(half_b.shape)}")
    r = float(rowwise_spearman(half_a.flatten(1).double(), half_b.flatten(1).double()).mean())
    if not r > 0:
        raise ValueError(f"the two halves' maps do not agree (mean Spearman {r:.4f} <= 0): no ceiling from them")
    return 2 * r / (1 + r)


def read_halves(path: str | Path) -> tuple[Tensor, Tensor]:
    """``half_a`` and ``half_b`` of an ``.npz`` file.

    Raises:
        FileNotFoundError: no such file. ValueError: a file without both arrays (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--halves: no such file {path}")
    with np.load(path) as arrays:
        missing = sorted({"half_a", "half_b"} - set(arrays.files))
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing} (it holds {arrays.files}): save the two halves of "
                             "the human maps as half_a and half_b, [N, H, W] each")
        return torch.from_numpy(arrays["half_a"]), torch.from_numpy(arrays["half_b"])


# ------------------------------------------------------------------------------------------------ the models
@dataclass
class ModelSpec:
    """One ``--model``: ``[LABEL=]ckpt:PATH`` or ``[LABEL=]timm|torchvision:ARCH:WEIGHTS``."""

    label: str
    kind: str
    arch: str | None
    path: Path

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        label, sep, rest = text.partition("=")
        if not sep or ":" in label:  # no LABEL= in front (a path may hold an "=")
            label, rest = "", text
        kind, _, tail = rest.partition(":")
        if kind not in KINDS:
            raise ValueError(f"--model {text!r}: expected [LABEL=]ckpt:PATH or [LABEL=]timm|torchvision:ARCH:WEIGHTS")
        if kind == "ckpt":
            arch, path = None, tail
        else:
            arch, _, path = tail.partition(":")
            if not arch or not path:
                raise ValueError(f"--model {text!r}: {kind} needs an architecture and a weights file, "
                                 f"{kind}:ARCH:WEIGHTS (nothing is downloaded)")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--model {text!r}: no such file {path}")
        return cls(label or (arch if kind != "ckpt" else path.stem), kind, arch, path)


class Normalized(nn.Sequential):
    """``model((x - mean) / std)``: the ImageNet input normalisation timm and torchvision weights expect."""

    def __init__(self, model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean) / self.std)


def build_model(spec: ModelSpec, num_classes: int, normalize: bool = True) -> nn.Module:
    """The network of a :class:`ModelSpec` with ``num_classes`` outputs, in eval mode.

    Raises:
        ValueError: a weights file that fits nothing or not all of the architecture (names the file and the model;
            a head of another size means the classes do not match), or a model whose outputs are not
            ``num_classes`` (names the model).
    """
    if spec.kind == "ckpt":
        from align.module import HarmonizedClassifier

        try:
            module = HarmonizedClassifier.load_from_checkpoint(spec.path, map_location="cpu")
        except Exception as error:
            raise ValueError(f"model {spec.label!r}: cannot load the checkpoint {spec.path}: {error}") from error
        model, outputs = module.backbone, module.num_classes
    else:
        if spec.kind == "timm":
            import timm

            model = timm.create_model(spec.arch, num_classes=num_classes)
        else:
            import torchvision

            model = torchvision.models.get_model(spec.arch, num_classes=num_classes)
        try:
            report = load_matching(model, read_state_dict(spec.path))
        except ValueError as error:
            raise ValueError(f"model {spec.label!r} ({spec.kind} {spec.arch}): the weights file {spec.path} fits "
                             f"nothing of it: {error}") from error
        if report.mismatched or report.missing:
            heads = {n: s for n, s in report.mismatched.items() if s[0][:1] != s[1][:1]}
            why = (f"its classes do not match the data's {num_classes}: {heads}" if heads else
                   f"missing {report.missing[:4]}, other shapes {list(report.mismatched)[:4]}")
            raise ValueError(f"model {spec.label!r} ({spec.kind} {spec.arch}): the weights file {spec.path} does not "
                             f"fit it entirely: {why}")
        model = Normalized(model) if normalize else model
        outputs = num_classes
    model.eval()
    if outputs != num_classes:
        raise ValueError(f"model {spec.label!r} ({spec.path}) has {outputs} classes, the data {num_classes}: the "
                         "classes do not match (pass --num-classes, or a model trained on these classes)")
    return model


# ------------------------------------------------------------------------------------------------ the test loop
class AlignmentBenchmark(L.LightningModule):
    """``Trainer.test`` of one network: accuracy and :class:`~explain.metrics.HumanAlignment` of its explanations
    of the labels, synced across processes; :attr:`scores` holds them after the test epoch."""

    def __init__(self, model: nn.Module, num_classes: int, explainer: Any = "saliency",
                 ceiling: float = CLICKME_CEILING, label: str = "model") -> None:
        super().__init__()
        self.model, self.label = model, label
        self.explainer_spec = resolve_explainers(explainer)[0]
        self.explainer = None
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.alignment = HumanAlignment(ceiling=ceiling)
        self.scores: dict[str, float] = {}

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not isinstance(batch, dict) or "heatmap" not in batch:
            raise ValueError(f"model {self.label!r}: the batches carry no 'heatmap': the data hold no human maps")
        images, labels = batch["image"], batch["label"]
        if self.explainer_spec.name == "saliency" and self.explainer_spec.factory is Saliency:
            # the reference map from the forward pass that gives the accuracy (one forward instead of two)
            with eval_mode(self.model):
                logits, gradient = input_gradient(self.model, images, labels, create_graph=False)
            logits, maps = logits.detach(), reduce_channels(gradient, "absmax")
        else:
            with torch.no_grad():
                logits = self.model(images)
            if self.explainer is None:
                self.explainer = self.explainer_spec.build(self.model)
            maps = self.explainer(images, labels)
        self.accuracy.update(logits, labels)
        self.alignment.update(maps, batch["heatmap"], batch.get("has_heatmap"))

    def on_test_epoch_end(self) -> None:
        if self._total_maps() == 0:
            raise ValueError(f"model {self.label!r}: no image of the data has a human map (has_heatmap is False "
                             "everywhere): nothing to align with")
        self.scores = {"accuracy": float(self.accuracy.compute()),
                       **{key: float(value) for key, value in self.alignment.compute_all().items()},
                       "maps": self._total_maps()}

    def _total_maps(self) -> int:
        count = self.alignment.count.clone()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return int(count)


# ------------------------------------------------------------------------------------------------ data and output
def datamodule(args: argparse.Namespace) -> L.LightningDataModule:
    if args.shards:
        from datamodules.clickme_tfrecord import ClickMeTFRecordDataModule

        return ClickMeTFRecordDataModule(train_shards=args.shards, val_shards=args.shards, image_size=args.image_size,
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         num_classes=args.num_classes, augment=False)
    from datamodules.clickme_folder import ClickMeFolderDataModule

    return ClickMeFolderDataModule(args.folder, image_size=args.image_size, batch_size=args.batch_size,
                                   num_workers=args.num_workers, num_classes=args.num_classes, augment=False)


COLUMNS = ("model", "kind", "file", "explainer", "accuracy", "alignment", "spearman", "dice", "iou", "ceiling",
           "ceiling_source", "maps")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def scatter_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy (x) against alignment (y), one labelled point per model (the paper's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        axes.scatter(100 * row["accuracy"], 100 * row["alignment"], s=30)
        axes.annotate(row["model"], (100 * row["accuracy"], 100 * row["alignment"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axes.set_xlabel("accuracy (%)")
    axes.set_ylabel(f"alignment: Spearman / ceiling ({rows[0]['ceiling']:.4f}, {rows[0]['ceiling_source']}) (%)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m align.human_alignment", description=__doc__.split("\n\n")[0])
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--shards", help="ClickMe validation TFRecord shards (a glob)")
    data.add_argument("--folder", type=Path, help="a ClickMe folder (its val.csv)")
    parser.add_argument("--model", action="append", required=True, dest="models",
                        help="[LABEL=]ckpt:PATH or [LABEL=]timm|torchvision:ARCH:WEIGHTS (repeat)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--explainer", default="saliency", help="a registered explainer name (default: saliency)")
    ceiling = parser.add_mutually_exclusive_group()
    ceiling.add_argument("--ceiling", type=float, default=CLICKME_CEILING, help="the human ceiling (ClickMe's)")
    ceiling.add_argument("--halves", type=Path, help=".npz with half_a, half_b [N,H,W]: ceiling from the data")
    parser.add_argument("--normalize", choices=("imagenet", "none"), default="imagenet",
                        help="input normalisation of timm/torchvision models")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs/human_alignment"))
    args = parser.parse_args(argv)
    args.specs = [ModelSpec.parse(text) for text in args.models]
    labels = [spec.label for spec in args.specs]
    if len(set(labels)) != len(labels):
        parser.error(f"two models have the same label in {labels}: name them with LABEL=")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.halves is not None:
        ceiling, source = split_half_ceiling(*read_halves(args.halves)), f"split-half of {args.halves.name}"
    else:
        ceiling, source = args.ceiling, "given"
    if not 0 < ceiling <= 1 or math.isnan(ceiling):
        raise ValueError(f"the ceiling must be in (0, 1], got {ceiling}")
    rank_zero_info(f"ceiling {ceiling:.5f} ({source})")
    data = datamodule(args)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    trainer = L.Trainer(accelerator=args.accelerator, devices=devices, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    rows = []
    for spec in args.specs:
        model = build_model(spec, args.num_classes, normalize=args.normalize == "imagenet")
        benchmark = AlignmentBenchmark(model, args.num_classes, args.explainer, ceiling, spec.label)
        trainer.test(benchmark, dataloaders=_validation_loader(data), verbose=False)
        rows.append({"model": spec.label, "kind": spec.kind, "file": str(spec.path), "explainer": args.explainer,
                     **benchmark.scores, "ceiling": ceiling, "ceiling_source": source})
    if trainer.is_global_zero:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out / "alignment.csv")
        scatter_plot(rows, args.out / "alignment.png")
        for row in rows:
            print(f"{row['model']}: accuracy {row['accuracy']:.4f}, alignment {row['alignment']:.4f} (spearman "
                  f"{row['spearman']:.4f} / ceiling {ceiling:.4f}, {source}), dice {row['dice']:.4f}, "
                  f"iou {row['iou']:.4f}, {row['maps']} maps")
        print(f"wrote {args.out / 'alignment.csv'} and {args.out / 'alignment.png'}")
    return rows


def _validation_loader(data: L.LightningDataModule):
    data.prepare_data()
    data.setup("validate")
    return data.val_dataloader()


if __name__ == "__main__":
    main()
