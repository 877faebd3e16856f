"""``HarmonizedClassifier``: a classifier trained with a task loss plus the harmonization loss (Fel et al. 2022).

``loss = task_loss(f(x), y) + harmonization_weight * harmonization_loss(saliency(f, x, y), human, has_heatmap)``

or, with ``alignment_loss="rrr"``, the right-reasons term of Ross et al. 2017 in its place
(:mod:`align.losses.rrr`: ``||mask * d(sum_k log p_k)/dx||^2``, the mask being the batch's ``spurious_mask`` or
where the human map is below ``rrr_threshold``), weighted by the same ``harmonization_weight``.

The harmonization term needs the input gradient with ``create_graph=True`` (double backprop); it is computed only
on batches that carry human maps, and never when ``harmonization_weight == 0`` (the baseline then costs one plain
forward/backward). Batches are the dicts of the data contract (``image``, ``label``, ``heatmap``, ``has_heatmap``);
``(image, label)`` tuples work too, without the harmonization term.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from align.batch_statistics import (
    batch_norm_layers,
    frozen_statistics_input_gradient,
    pooled_running_statistics,
    synchronised_batch_norms,
)
from align.certification import certified_correct, last_linear, margin_lipschitz
from align.losses.harmonization import HarmonizationLoss, Reduce, check_reduce, input_gradient
from align.losses.rrr import RRRLoss
from align.losses.task import TASK_LOSSES, TaskLoss
from align.models.lipschitz import orthogonal_kernels_once
from align.optim import weight_decay_groups
from explain.attributions.saliency import reduce_channels
from explain.metrics import HumanAlignment
from explain.metrics.functional.alignment import CLICKME_CEILING
from explain.validation import in_interval, one_of


def batch_coupled(model: nn.Module) -> bool:
    """True when a BatchNorm layer of ``model`` normalises with batch statistics (training mode, or no running
    statistics): its outputs then depend on the other images of the batch, and splitting a batch changes them."""
    return bool(batch_norm_layers(model))


class HarmonizedClassifier(LightningModule):
    """Image classifier with the harmonization loss.

    Logs ``train/{loss,task_loss,harmonization_loss,acc}``, ``val/...`` the same plus ``val/alignment`` (the
    reference evaluation: Spearman rho between |input gradient| max over channels and the human map, divided by
    ``alignment_ceiling``; not logged, with a warning, when no image of the epoch has a human map) and, for
    1-Lipschitz backbones, ``val/certified_acc``; ``test/<split>/...`` per test split named by
    ``datamodule.test_split_names`` (e.g. ``test/iid/acc``, ``test/flipped/acc``). A non-finite loss term or
    non-finite weights stop training with a ``FloatingPointError`` naming the step and the term.

    Args:
        backbone: the network, images [B,C,H,W] -> logits [B,K]; in YAML a ``class_path``/``init_args`` pair,
            e.g. ``align.models.lip_vgg`` or ``align.models.resnet50``. Networks carrying ``lipschitz_body =
            True`` (the 1-Lipschitz zoo) also get certified accuracy.
        num_classes: K; by default read from the backbone's last ``nn.Linear``.
        task_loss: ``"ce"`` (label smoothing 0.1), ``"hkr"``, ``"softhkr"`` or ``"tau_ce"`` (deel-torchlip).
        task_loss_options: options of the task loss, overriding its defaults (``align.losses.TASK_LOSSES``).
        harmonization_weight: lambda of the alignment term (the harmonization loss, or RRR with
            ``alignment_loss="rrr"``); 0 trains the baseline (no double backprop).
        levels: pyramid levels of the harmonization loss (5 in the reference).
        reduce: channel reduction of the training saliency, a name of
            :func:`explain.attributions.saliency.reduce_channels`: ``"mean"`` (signed, reference), ``"absmean"``,
            ``"absmax"``, ...; ``"abs"`` and ``"max_abs"`` are aliases of ``"absmean"`` and ``"absmax"``.
        weight_decay: L2 weight decay, 1e-5 in the reference, on every trainable parameter (biases included)
            except those of normalization layers, embeddings and the class token, as the reference
            (:func:`align.optim.weight_decay_groups`). It is set per parameter group, so it overrides the optimizer's
            own ``weight_decay``.
        optimizer: optimizer factory, called with the parameter groups (LightningCLI ``OptimizerCallable``).
        lr_scheduler: optional scheduler factory (``LRSchedulerCallable``); ``ReduceLROnPlateau`` monitors
            ``val/loss``.
        scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        certify_radius: L2 radius of the logged certified accuracy (Lipschitz backbones only).
        alignment_ceiling: human inter-rater ceiling dividing the mean Spearman rho (ClickMe: 0.65753).
        alignment_loss: the alignment term: ``"harmonization"`` (Fel et al. 2022, logged as
            ``*/harmonization_loss``) or ``"rrr"`` ("Right for the Right Reasons", Ross et al. 2017, logged as
            ``*/rrr_loss``; :class:`align.losses.rrr.RRRLoss`).
        rrr_threshold: with ``"rrr"`` and no ``spurious_mask`` in the batch, the pixels whose human map is below
            this value are where the model should not look.
        split_annotated: in a training batch where only some images have a human map, take the double backprop
            on those only and a plain forward on the others (exact, see :meth:`harmonized_forward`; networks
            with BatchNorm in training mode use the whole batch unless ``batch_statistics`` says otherwise). False:
            always the whole batch.
        batch_statistics: how BatchNorm networks in training mode take the split step (:mod:`align.batch_statistics`;
            docs/speed.md gives the measured difference of each from ``"full"``):

            * ``"full"`` (default): no split; the exact full-batch step, as the reference;
            * ``"frozen"``: one plain forward of the whole batch (task loss, batch statistics and running
              statistics exactly as a plain step), then the double backprop on the annotated images with those
              statistics held constant; the saliency misses the paths through the statistics;
            * ``"ghost"``: ghost batch normalisation (Hoffer et al. 2017): the annotated images and the others
              are two ghost batches, each normalised with its own statistics, the annotated one through the exact
              double backprop; the running statistics get one update per step, as in a plain step, with the
              pooled statistics of both ghost batches.

            Under DDP with synchronised BatchNorm (``Trainer(sync_batchnorm=True)``) only ``"frozen"`` works:
            PyTorch cannot differentiate ``SyncBatchNorm``'s backward, and fitting stops with an error otherwise
            (:meth:`check_double_backprop_layers`).
        channels_last: keep the backbone's weights and the images in ``torch.channels_last`` memory format
            (faster convolutions with ``bf16-mixed`` on tensor-core GPUs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        task_loss: Literal["ce", "hkr", "softhkr", "tau_ce"] = "ce",
        task_loss_options: dict[str, Any] | None = None,
        harmonization_weight: float = 1.0,
        levels: int = 5,
        reduce: Reduce = "mean",
        weight_decay: float = 1e-5,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        certify_radius: float = 36 / 255,
        alignment_ceiling: float = CLICKME_CEILING,
        alignment_loss: Literal["harmonization", "rrr"] = "harmonization",
        rrr_threshold: float = 0.1,
        split_annotated: bool = True,
        channels_last: bool = False,
        batch_statistics: Literal["full", "frozen", "ghost"] = "full",
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if task_loss not in TASK_LOSSES:
            raise ValueError(f"task_loss must be one of {sorted(TASK_LOSSES)}, got {task_loss!r}")
        in_interval("harmonization_weight", harmonization_weight, 0)  # NaN and inf refused too
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        # Under LightningCLI the backbone and the optimizer are stored as their class_path/init_args config, so
        # load_from_checkpoint can rebuild them; objects built in Python are not hyperparameters (the weights are
        # in the state_dict, and classes would not load with torch.load(weights_only=True)). Lightning has no
        # public way to tell the two cases apart: its CLI passes the config through this (private) context var.
        # num_classes=None (read from the backbone) is not logged: Lightning refuses to log a model and a
        # datamodule whose hyperparameters of the same name differ.
        ignore = [] if _given_hyperparameters.get() is not None else ["backbone", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=ignore + (["num_classes"] if num_classes is None else []))
        self.backbone = backbone.to(memory_format=torch.channels_last) if channels_last else backbone
        self.split_annotated, self.channels_last = bool(split_annotated), bool(channels_last)
        self.batch_statistics = one_of("batch_statistics", batch_statistics, ("full", "frozen", "ghost"))
        self.num_classes = self._infer_num_classes(backbone, num_classes)
        self.lipschitz = bool(getattr(backbone, "lipschitz_body", False))
        self.task_loss = TaskLoss(task_loss, **(task_loss_options or {}))
        self.harmonization = HarmonizationLoss(levels)
        self.alignment_loss = one_of("alignment_loss", alignment_loss, ("harmonization", "rrr"))
        self.rrr = RRRLoss(rrr_threshold)
        self.harmonization_weight = float(harmonization_weight)
        self.reduce = check_reduce(reduce)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_metrics = self._eval_metrics()
        self.test_metrics = nn.ModuleDict()  # one collection per test split, created on first use
        self._alignment_to_log: dict[str, str] = {}  # prefix -> metric collection, filled by the evaluation steps
        self._warned_no_maps: set[str] = set()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _infer_num_classes(backbone: nn.Module, num_classes: int | None) -> int:
        try:
            out_features = last_linear(backbone).out_features
        except ValueError:
            out_features = None
        if num_classes is None:
            if out_features is None:
                raise ValueError("cannot read the number of classes from the backbone: pass num_classes")
            return out_features
        if out_features is not None and out_features != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the backbone's last linear layer has {out_features} outputs"
            )
        return num_classes

    def _eval_metrics(self) -> MetricCollection:
        metrics: dict[str, Any] = {
            "acc": MulticlassAccuracy(self.num_classes, average="micro"),
            "alignment": HumanAlignment(ceiling=self.hparams.alignment_ceiling),
        }
        if self.lipschitz:
            metrics["certified_acc"] = MeanMetric()
        return MetricCollection(metrics, compute_groups=False)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        expected = getattr(datamodule, "num_classes", None)
        if expected is not None and expected != self.num_classes:
            raise ValueError(
                f"the datamodule has {expected} classes but the backbone outputs {self.num_classes}: set "
                f"model.init_args.backbone.init_args.num_classes={expected}"
            )

    # ------------------------------------------------------------------ steps
    @override
    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        if isinstance(batch, dict):
            if "image" not in batch or "label" not in batch:
                raise KeyError(f"a batch dict needs 'image' and 'label' keys, got {sorted(batch)}")
            human, has_heatmap = batch.get("heatmap"), batch.get("has_heatmap")
            if human is not None and has_heatmap is None:
                has_heatmap = torch.ones(human.shape[0], dtype=torch.bool, device=human.device)
            return batch["image"], batch["label"], human, has_heatmap
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1], None, None
        raise TypeError(
            "a batch must be a dict with 'image', 'label' (and optionally 'heatmap', 'has_heatmap') or an "
            f"(image, label) pair, got {type(batch).__name__}"
        )

    def _alignment_term(
        self, batch: Any, images: Tensor, labels: Tensor, human: Tensor | None, has_heatmap: Tensor | None,
        create_graph: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits and the ``alignment_loss`` term of the batch (None when the batch gives nothing to align with:
        no human map, or for RRR no pixel to ignore; then no double backprop)."""
        if self.alignment_loss == "rrr":
            spurious = batch.get("spurious_mask") if isinstance(batch, dict) else None
            return self.rrr(self.backbone, images, human, has_heatmap, spurious, create_graph=create_graph)
        if human is None or not bool(has_heatmap.any()):
            return self.backbone(images), None
        if create_graph:
            return self.harmonized_forward(images, labels, human, has_heatmap)
        logits, gradient = input_gradient(self.backbone, images, labels, create_graph=False)
        return logits, self.harmonization(reduce_channels(gradient, self.reduce), human, has_heatmap)

    def harmonized_forward(
        self, images: Tensor, labels: Tensor, human: Tensor, has_heatmap: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Logits [B,K] in batch order and the harmonization loss, with the double backprop only where it is needed.

        Only the images with a human map need the input gradient with ``create_graph=True``; the others need a
        plain forward. Splitting the batch is exact when the images do not interact inside the network (the
        1-Lipschitz zoo, LayerNorm ViTs, BatchNorm in eval mode). The loss keeps the reference's normalisation:
        :func:`~align.losses.harmonization.harmonization_loss` averages over the WHOLE batch (images without a map
        count as zeros), so the mean over the ``A`` annotated images is scaled by ``A / B``.

        BatchNorm in training mode couples the images through the batch statistics: there the whole batch goes
        through one forward with the double backprop, exactly as the reference (its statistics, and so every
        logit and gradient, are those of the full batch); see :func:`batch_coupled`. ``batch_statistics``
        ``"frozen"`` and ``"ghost"`` split such networks too (see the class docstring).
        """
        annotated = has_heatmap.reshape(-1).to(torch.bool)
        coupled = batch_coupled(self.backbone)
        every_image = bool(annotated.all())
        # frozen statistics split even a batch of annotated images when its BatchNorm is synchronised: the full-batch
        # double backprop cannot go through SyncBatchNorm (see check_double_backprop_layers)
        frozen = coupled and self.batch_statistics == "frozen" and self.split_annotated and (
            not every_image or bool(synchronised_batch_norms(self.backbone)))
        if not frozen and (every_image or not self.split_annotated or (coupled and self.batch_statistics != "ghost")):
            logits, gradient = input_gradient(self.backbone, images, labels, create_graph=True)
            return logits, self.harmonization(reduce_channels(gradient, self.reduce), human, has_heatmap)
        with_map = annotated.nonzero().flatten()
        scale = with_map.numel() / images.shape[0]  # the reference's mean over the whole batch
        if frozen:
            with orthogonal_kernels_once(self.backbone):
                logits, gradient = frozen_statistics_input_gradient(self.backbone, images, labels, with_map)
            return logits, self.harmonization(reduce_channels(gradient, self.reduce), human[with_map]) * scale
        without_map = (~annotated).nonzero().flatten()
        # the orthogonal kernels of the Lipschitz zoo computed once for both passes (see orthogonal_kernels_once for
        # why not parametrize.cached()): one step then costs, and advances the power iteration, as one full pass.
        # Ghost batches (coupled networks): the two passes are the two ghost batches, and the running statistics
        # get one update with their pooled statistics.
        pooled = pooled_running_statistics(self.backbone) if coupled else nullcontext()
        with orthogonal_kernels_once(self.backbone), pooled:
            logits_map, gradient = input_gradient(self.backbone, images[with_map], labels[with_map], create_graph=True)
            logits_plain = self.backbone(images[without_map])
        logits = logits_map.new_empty(images.shape[0], logits_map.shape[1])
        logits = logits.index_copy(0, with_map, logits_map).index_copy(0, without_map, logits_plain.to(logits_map))
        return logits, self.harmonization(reduce_channels(gradient, self.reduce), human[with_map]) * scale

    def _images(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels, human, has_heatmap = self._unpack(batch)
        images = self._images(images)
        size = images.shape[0]
        if self.harmonization_weight > 0:
            logits, alignment = self._alignment_term(batch, images, labels, human, has_heatmap)
        else:
            logits, alignment = self.backbone(images), None
        task = self.task_loss(logits, labels)
        loss = task + self.harmonization_weight * alignment if alignment is not None else task
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/task_loss", task, batch_size=size)
        if alignment is not None:
            self.log(f"train/{self.alignment_loss}_loss", alignment, batch_size=size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        self._check_finite_loss(**{"task": task, self.alignment_loss: alignment})
        return loss

    # ------------------------------------------------------------ finite checks
    def _check_finite_loss(self, **terms: Tensor | None) -> None:
        """Stop training with an error naming the step and each non-finite loss term (``task``,
        ``harmonization`` or ``rrr``): an optimizer step on a NaN loss would turn every weight into NaN, and the run
        would go on to exit 0 with a "best" checkpoint."""
        given = {name: value.detach() for name, value in terms.items() if value is not None}
        if bool(torch.isfinite(torch.stack(list(given.values()))).all()):  # one device sync per step
            return
        bad = {name: value.item() for name, value in given.items() if not torch.isfinite(value)}
        if bad:
            found = ", ".join(f"{name} loss = {value}" for name, value in bad.items())
            raise FloatingPointError(
                f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step}: {found}; training "
                "stopped (check the learning rate, the harmonization_weight, the data, and the weights it started from)"
            )

    @override
    def on_fit_start(self) -> None:
        """Refuse, before the first step, a double backprop through synchronised BatchNorm (``Trainer(sync_batchnorm=
        True)`` under DDP): PyTorch cannot differentiate its backward (see
        :func:`~align.batch_statistics.synchronised_batch_norms`), and would fail at the first annotated batch with
        "derivative for batch_norm_backward_elemt is not implemented"."""
        self.check_double_backprop_layers()

    def check_double_backprop_layers(self) -> None:
        """Raises ``RuntimeError`` when the alignment term would take a double backprop through a synchronised
        ``SyncBatchNorm`` layer: always with ``alignment_loss="rrr"``, and with the harmonization loss unless
        ``batch_statistics="frozen"`` (whose double-backprop pass normalises with the synchronised statistics held
        constant, without synchronising)."""
        if self.harmonization_weight == 0 or (self.alignment_loss == "harmonization" and self.split_annotated
                                              and self.batch_statistics == "frozen"):
            return
        synchronised = synchronised_batch_norms(self.backbone)
        if not synchronised:
            return
        remedy = ("train without synchronised BatchNorm (Trainer(sync_batchnorm=False): each process normalises with "
                  "its own batch)")
        if self.alignment_loss == "harmonization":
            remedy = ("use batch_statistics='frozen' with split_annotated=True (the double backprop then normalises "
                      "with the synchronised statistics held constant) or " + remedy)
        raise RuntimeError(
            f"{len(synchronised)} SyncBatchNorm layer(s) synchronise batch statistics across processes (e.g. "
            f"{synchronised[0]}), and the {self.alignment_loss} loss with batch_statistics={self.batch_statistics!r} "
            "takes a double backprop through them, which PyTorch cannot differentiate (pytorch/pytorch#61222); "
            + remedy
        )

    @override
    def on_train_start(self) -> None:
        """Refuse to train from non-finite weights (e.g. a ``--ckpt_path`` checkpoint holding NaN)."""
        bad = [name for name, parameter in self.named_parameters() if not torch.isfinite(parameter).all()]
        if bad:
            listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise FloatingPointError(
                f"the weights hold NaN or inf at epoch {self.current_epoch}, step {self.global_step}, before any "
                f"training step: {listed} (a corrupt checkpoint?)"
            )

    def _evaluate(self, batch: Any, prefix: str, attribute: str) -> None:
        """Losses, accuracy, alignment (|gradient| max over channels vs human maps) and certified accuracy,
        logged as ``<prefix>/<name>``; ``attribute`` names the MetricCollection that accumulates them."""
        metrics = self.get_submodule(attribute)
        images, labels, human, has_heatmap = self._unpack(batch)
        images = self._images(images)
        size = images.shape[0]
        with_maps = human is not None and bool(has_heatmap.any())
        if with_maps:  # Lightning evaluates under inference_mode: input_gradient re-enables grad on a clone
            logits, gradient = input_gradient(self.backbone, images, labels, create_graph=False)
            logits = logits.detach()
            harmonization = self.harmonization(reduce_channels(gradient, self.reduce), human, has_heatmap)
            # the model map of the reference evaluation: |gradient| max over channels
            maps = reduce_channels(gradient, "absmax")
            metrics["alignment"].update(maps=maps, human=human, has_heatmap=has_heatmap)
        else:
            logits = self.backbone(images)
            harmonization = logits.new_zeros(())  # what the loss gives a batch without maps (the mean runs over it)
        task = self.task_loss(logits, labels)
        options = {"batch_size": size, "sync_dist": True, "add_dataloader_idx": False}
        if self.alignment_loss == "rrr":  # logged on every batch (zero without a pixel to ignore), as below
            _, rrr = self._alignment_term(batch, images, labels, human, has_heatmap, create_graph=False)
            rrr = logits.new_zeros(()) if rrr is None else rrr.detach()
            self.log(f"{prefix}/rrr_loss", rrr, **options)
            loss = task + self.harmonization_weight * rrr
        else:
            loss = task + self.harmonization_weight * harmonization
        if human is not None:
            # logged on every batch of a dataset with maps, even one without any: with sync_dist, a key logged by
            # some DDP processes only would make them wait for each other at the end of the epoch
            self.log(f"{prefix}/harmonization_loss", harmonization, **options)
            self._alignment_to_log[prefix] = attribute  # logged at the epoch's end, when an image supports it
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", **options)
        self.log(f"{prefix}/task_loss", task, **options)
        metrics["acc"].update(logits, labels)
        self._log_metric(f"{prefix}/acc", metrics, attribute, "acc", prog_bar=prefix == "val")
        if self.lipschitz:
            lipschitz = margin_lipschitz(last_linear(self.backbone))
            certified = certified_correct(logits, labels, lipschitz, self.hparams.certify_radius)
            metrics["certified_acc"].update(certified.float())
            self._log_metric(f"{prefix}/certified_acc", metrics, attribute, "certified_acc")

    def _log_metric(self, name: str, metrics: MetricCollection, attribute: str, key: str, **options: Any) -> None:
        # the attribute is given because test metrics are created on the fly (one collection per test split)
        self.log(name, metrics[key], metric_attribute=f"{attribute}.{key}", add_dataloader_idx=False, **options)

    def _log_alignment(self, stage: str) -> None:
        """Log ``<prefix>/alignment`` of each evaluated set of this ``stage`` ("val" or "test") that had at least
        one human map (counted over every process); warn once, and log nothing, for a set with none: a score of 0.0
        that no image supports would read as a real one."""
        for prefix, attribute in list(self._alignment_to_log.items()):
            if prefix.split("/")[0] != stage:
                continue
            del self._alignment_to_log[prefix]
            metric = self.get_submodule(attribute)["alignment"]
            count = self.trainer.strategy.reduce(metric.count.clone(), reduce_op="sum")
            if count > 0:
                self.log(f"{prefix}/alignment", metric.compute(), add_dataloader_idx=False)
            elif prefix not in self._warned_no_maps:
                self._warned_no_maps.add(prefix)
                rank_zero_warn(
                    f"{prefix}: no image of this epoch has a human map (has_heatmap is False everywhere), so "
                    f"{prefix}/alignment is not logged"
                )
            metric.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_alignment("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_alignment("test")

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", "val_metrics")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self._test_split_name(dataloader_idx)
        key = split or "test"
        if key not in self.test_metrics:
            self.test_metrics[key] = self._eval_metrics().to(self.device)
        self._evaluate(batch, f"test/{split}" if split else "test", f"test_metrics.{key}")

    def _test_split_name(self, dataloader_idx: int) -> str:
        """``trainer.datamodule.test_split_names[dataloader_idx]`` when the datamodule names its test splits
        (e.g. ``("iid", "flipped")``), else ``""`` for a single test loader and ``"<index>"`` for several."""
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "test_split_names", None)
        if names is not None and dataloader_idx < len(names):
            return str(names[dataloader_idx])
        loaders = self.trainer.test_dataloaders
        several = isinstance(loaders, (list, tuple, dict)) and len(loaders) > 1
        return str(dataloader_idx) if several or dataloader_idx > 0 else ""

    # -------------------------------------------------------------- optimizers
    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(weight_decay_groups(self, self.hparams.weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
