"""``ExplanationMonitor``: explain a fixed set of validation images during training and watch the explanations.

Every ``every_n_epochs`` epochs, for each explainer:

* **drift** on a fixed monitor set of ``num_samples`` validation images drawn once (seeded): the per-image
  Spearman rank correlation of today's map with the map of the previous evaluation and of the first one
  (``explain/<explainer>/drift_vs_previous``, ``.../drift_vs_first``; 1 = unchanged ranking of the pixels,
  :mod:`explain.metrics.functional.drift`), with image overlays and a per-image table;
* **dataset-level metrics** (human alignment, fidelity, ...) over the first ``max_images`` validation images
  of each process (``explain/<explainer>/<metric>``); every process explains its own shard and torchmetrics
  syncs the states in ``compute()``.

It never changes the training it watches: it runs inside the validation loop (Lightning's default
``inference_mode`` is fine, the explainers take grad themselves), restores the model's train/eval flags and
the global RNGs, writes no ``.grad`` and no BatchNorm statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from explain.base import Explainer, eval_mode, model_device
from explain.callbacks.base import MonitorCallback, OnError
from explain.callbacks.batches import (
    BatchAdapter,
    draw_monitor_set,
    first_dataloader,
    slice_contract,
    to_contract,
)
from explain.callbacks.isolation import isolated
from explain.callbacks.logging import log_images, log_table
from explain.callbacks.overlays import explanation_panel
from explain.callbacks.registry import ExplainerSpec, resolve_explainers, resolve_metrics
from explain.metrics.base import ExplanationMetric
from explain.metrics.functional.alignment import per_image_spearman
from explain.metrics.functional.drift import merge_references, reference_spearman

#: Sobol options of the default monitor: N = 8 designs on the 8x8 grid, 8 * (64 + 1) = 520 forward passes per
#: image (a quarter of the paper's N = 32). The design is seeded, so the same model gives the same map and the
#: drift measures the model's change, not the estimator's noise.
DEFAULT_SOBOL = {"nb_design": 8}

ExplainerFactory = Callable[[nn.Module], Explainer]
ExplainerItem = Union[str, dict[str, Any], ExplainerFactory]
MetricItem = Union[str, dict[str, Any], ExplanationMetric]


def default_explainers(model: nn.Module) -> list[Any]:
    """Saliency and Sobol, plus EVA for a 1-Lipschitz network (``lipschitz_body = True``)."""
    explainers: list[Any] = ["saliency", {"sobol": dict(DEFAULT_SOBOL)}]
    if getattr(model, "lipschitz_body", False):
        explainers.append("eva")
    return explainers


def default_metrics(has_human_maps: bool) -> list[str]:
    """Deletion (fidelity), and human alignment when the data has human maps."""
    return ["alignment", "deletion"] if has_human_maps else ["deletion"]


class ExplanationMonitor(MonitorCallback):
    """Explain a fixed monitor set and the validation data every ``every_n_epochs`` epochs; log metrics,
    drift, overlays and a per-image table.

    The defaults (every 5 epochs, 8 monitor images, 8 metric images per process, Sobol with N = 8) keep the
    demo fit (``make demo``, 2 CPU cores) within 10% of its time without the monitor (``bench_callbacks.py``);
    on a GPU, or with epochs longer than the demo's minute, raise them.

    Args:
        explainers: names (``"saliency"``, ``"smoothgrad"``, ``"gradient_input"``, ``"sobol"``, ``"eva"``),
            ``{name: {options}}``, Explainer classes, callables ``model -> Explainer`` (``class_path`` /
            ``init_args`` in YAML), or a list of those. None: Saliency + Sobol (``nb_design=8``), + EVA when
            the network has ``lipschitz_body = True``.
        metrics: names (``"alignment"``, ``"deletion"``, ``"insertion"``, ``"mufidelity"``, ``"stability"``),
            ``{name: {options}}``, :class:`~explain.metrics.ExplanationMetric` instances or a list of those;
            ``[]`` for none. None: ``deletion``, and ``alignment`` when the data has human maps.
        every_n_epochs: evaluate in epochs 0, n, 2n, ...
        num_samples: size of the monitor set (drift, overlays, table).
        log_images: log overlays (map over image, human map beside it when there is one).
        batch_adapter: ``batch -> dict(image, label[, heatmap, has_heatmap])`` for another project's batches.
        on_error: ``"raise"`` or ``"warn"`` (skip a failing explainer or metric this time, keep training).
        seed: seed of the monitor set's draw.
        max_images: validation images per process fed to the dataset-level metrics at each evaluation
            (None: the whole validation set); the cost knob of the metrics.
        target: explain the ``"label"`` or the model's ``"prediction"``.
        model_attr: attribute of the LightningModule holding the network to explain (None: the module itself).
    """

    def __init__(
        self,
        explainers: Union[Sequence[ExplainerItem], ExplainerItem, None] = None,
        metrics: Union[Sequence[MetricItem], MetricItem, None] = None,
        every_n_epochs: int = 5,
        num_samples: int = 8,
        log_images: bool = True,
        batch_adapter: BatchAdapter | None = None,
        on_error: OnError = "raise",
        seed: int = 0,
        max_images: int | None = 8,
        target: Literal["label", "prediction"] = "label",
        model_attr: str | None = None,
    ) -> None:
        super().__init__(every_n_epochs, on_error, model_attr, batch_adapter, seed)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"ExplanationMonitor: num_samples must be a positive int, got {num_samples!r}")
        if max_images is not None and (not isinstance(max_images, int) or max_images < 0):
            raise ValueError(
                f"ExplanationMonitor: max_images must be an int >= 0 (0: no dataset-level metrics) or None (the "
                f"whole validation set), got {max_images!r}"
            )
        if target not in ("label", "prediction"):
            raise ValueError(f"ExplanationMonitor: target must be 'label' or 'prediction', got {target!r}")
        self.num_samples = num_samples
        self.log_images = bool(log_images)
        self.max_images = max_images
        self.target = target
        self._explainer_request = explainers
        self._specs: list[ExplainerSpec] | None = None if explainers is None else resolve_explainers(explainers)
        self._metric_templates = None if metrics is None else resolve_metrics(metrics)
        # state that survives a checkpoint
        self._monitor: dict[str, Tensor] | None = None
        self._first: dict[str, tuple[Tensor, Tensor]] = {}
        self._previous: dict[str, tuple[Tensor, Tensor]] = {}
        self._evaluations = 0
        # per-evaluation working state
        self._active = False
        self._explainers: dict[str, Explainer] = {}
        self._metrics: dict[str, dict[str, Any]] = {}
        self._failed: set[str] = set()
        self._seen = 0

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        # from the arguments, not from setup (the default explainers depend on the model): stable across a resume
        names = "default" if self._explainer_request is None else ",".join(s.name for s in self._specs or [])
        return self._generate_state_key(
            explainers=names, every_n_epochs=self.every_n_epochs, num_samples=self.num_samples, seed=self.seed
        )

    @property
    def explainer_names(self) -> list[str]:
        """Logging keys of the explainers (known after ``setup`` when the defaults are used)."""
        return [] if self._specs is None else [spec.name for spec in self._specs]

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self._monitor,
            "first": dict(self._first),
            "previous": dict(self._previous),
            "evaluations": self._evaluations,
            "last_epoch": self._last_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._monitor = state_dict["monitor"]
        self._first = dict(state_dict["first"])
        self._previous = dict(state_dict["previous"])
        self._evaluations = int(state_dict["evaluations"])
        self._last_epoch = int(state_dict["last_epoch"])

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        model = self.explained_model(pl_module)
        if self._specs is None:
            self._specs = resolve_explainers(default_explainers(model))
        for spec in self._specs:  # a factory that cannot build on this model fails now
            self.attempt(f"building explainer {spec.name!r}", spec.build, model)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = self.is_due(trainer)
        if not self._active:
            return
        model = self.explained_model(pl_module)
        device = model_device(model, default=pl_module.device)
        self._failed, self._seen, self._explainers = set(), 0, {}
        with isolated(model, device):
            if self._monitor is None:
                dataloader = first_dataloader(trainer.val_dataloaders)
                if dataloader is None:
                    raise RuntimeError("ExplanationMonitor needs a validation dataloader to draw its monitor set")
                self._monitor = draw_monitor_set(dataloader, self.num_samples, self.seed, self.batch_adapter)
            self._prepare_metrics(device)
            for spec in self._specs or []:
                ok, explainer = self.attempt(f"building explainer {spec.name!r}", spec.build, model)
                if ok:
                    self._explainers[spec.name] = explainer
                else:
                    self._failed.add(spec.name)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0 or not self._metric_templates:
            return
        room = None if self.max_images is None else self.max_images - self._seen
        if room is not None and room <= 0:
            return
        model = self.explained_model(pl_module)
        device = model_device(model, default=pl_module.device)
        with isolated(model, device):
            data = to_contract(batch, self.batch_adapter)
            if room is not None:
                data = slice_contract(data, room)
            data = {key: value.to(device) for key, value in data.items()}
            self._seen += data["label"].shape[0]
            targets = self._targets(model, data)
            for name, explainer in self._explainers.items():
                if name in self._failed:
                    continue
                what = f"explainer {name!r} (with its metrics) on validation batch {batch_idx}"
                ok, _ = self.attempt(what, self._update_metrics, name, explainer, model, data, targets)
                if not ok:
                    self._failed.add(name)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        model = self.explained_model(pl_module)
        device = model_device(model, default=pl_module.device)
        names = [spec.name for spec in self._specs or []]
        with isolated(model, device):
            monitor = {key: value.to(device) for key, value in self._monitor.items()}
            targets = self._targets(model, monitor)
            with torch.no_grad(), eval_mode(model):
                predictions = model(monitor["image"]).argmax(1)
            maps: dict[str, Tensor] = {}
            for name, explainer in self._explainers.items():
                what = f"explainer {name!r} on the monitor set"
                ok, result = self.attempt(what, explainer, monitor["image"], targets)
                if ok:
                    maps[name] = result
            # every rank must take the same branches around the collectives (metric sync, self.log sync)
            failed = self.agree(trainer, [name in self._failed for name in names], pl_module.device)
            missing = self.agree(trainer, [name not in maps for name in names], pl_module.device)
            for name, skip in zip(names, failed):
                if not skip:
                    self._log_metrics(pl_module, name)
            rows: list[list[Any]] = []
            for name, skip in zip(names, missing):
                if not skip:
                    rows += self._log_drift(trainer, pl_module, name, maps[name].float(), monitor, targets, predictions)
            columns = ["epoch", "step", "id", "label", "prediction", "explainer"]
            columns += ["drift_vs_previous", "drift_vs_first", "human_spearman"]
            columns += ["overlay"] if self.log_images else []
            log_table(trainer, "explain/per_image", columns, rows, self._out_dir)
            for metrics in self._metrics.values():
                for metric in metrics.values():
                    metric.reset()
        self._explainers = {}
        self._last_epoch = trainer.current_epoch
        self._evaluations += 1

    # ------------------------------------------------------------------ pieces
    def _targets(self, model: nn.Module, data: Mapping[str, Tensor]) -> Tensor:
        if self.target == "label":
            return data["label"]
        with torch.no_grad(), eval_mode(model):
            return model(data["image"]).argmax(1)

    def _prepare_metrics(self, device: torch.device) -> None:
        has_human = "heatmap" in self._monitor
        if self._metric_templates is None:
            self._metric_templates = resolve_metrics(default_metrics(has_human))
        for metric_name, metric in self._metric_templates.items():
            if "ids" in metric.requires:
                raise ValueError(
                    f"ExplanationMonitor: metric {metric_name!r} needs sample ids, which validation batches do not "
                    "carry; the monitor logs drift itself (explain/<explainer>/drift_vs_previous, drift_vs_first)"
                )
            if "human" in metric.requires and not has_human:
                raise ValueError(
                    f"ExplanationMonitor: metric {metric_name!r} needs human maps but the validation batches have no "
                    "'heatmap'; remove the metric or give heatmaps through batch_adapter"
                )
        if not self._metrics:
            self._metrics = {
                spec.name: {key: metric.clone() for key, metric in self._metric_templates.items()}
                for spec in self._specs or []
            }
        for metrics in self._metrics.values():
            for metric in metrics.values():
                metric.to(device)
                metric.reset()

    def _update_metrics(
        self, name: str, explainer: Explainer, model: nn.Module, data: Mapping[str, Tensor], targets: Tensor
    ) -> None:
        maps = explainer(data["image"], targets)
        available = {
            "maps": maps,
            "images": data["image"],
            "targets": targets,
            "human": data.get("heatmap"),
            "has_heatmap": data.get("has_heatmap"),
            "model": model,
            "explainer": explainer,
        }
        for metric in self._metrics[name].values():
            metric.update(**{key: available[key] for key in metric.requires})

    def _log_metrics(self, pl_module: LightningModule, name: str) -> None:
        for metric_name, metric in self._metrics.get(name, {}).items():
            ok, value = self.attempt(f"metric {metric_name!r} of explainer {name!r}", metric.compute)
            if not ok:
                continue
            values = value if isinstance(value, Mapping) else {None: value}
            for key, scalar in values.items():
                suffix = metric_name if key is None else f"{metric_name}/{key}"
                pl_module.log(f"explain/{name}/{suffix}", float(scalar), sync_dist=True)

    def _log_drift(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        name: str,
        maps: Tensor,
        monitor: Mapping[str, Tensor],
        targets: Tensor,
        predictions: Tensor,
    ) -> list[list[Any]]:
        """Log the mean drift of one explainer, its overlays; update its references; return its table rows."""
        ids = monitor["ids"]
        vs_previous = reference_spearman(ids, maps, *self._previous.get(name, (None, None)))
        vs_first = reference_spearman(ids, maps, *self._first.get(name, (None, None)))
        for key, rho in (("drift_vs_previous", vs_previous), ("drift_vs_first", vs_first)):
            if not rho.isnan().all():
                pl_module.log(f"explain/{name}/{key}", float(rho.nanmean()), sync_dist=True)
        human = monitor.get("heatmap")
        has_human = monitor.get("has_heatmap")
        alignment = torch.full_like(vs_first, math.nan)
        if human is not None and has_human.any():
            alignment[has_human] = per_image_spearman(maps[has_human], human[has_human].float()).to(alignment.dtype)
        cpu_maps = maps.detach().cpu()
        self._previous[name] = merge_references(*self._previous.get(name, (None, None)), ids.cpu(), cpu_maps, True)
        self._first[name] = merge_references(*self._first.get(name, (None, None)), ids.cpu(), cpu_maps, False)

        epoch, step = trainer.current_epoch, trainer.global_step
        panels, captions, rows = [], [], []
        for i in range(ids.shape[0]):
            show_human = human is not None and bool(has_human[i])
            values = [float(vs_previous[i]), float(vs_first[i]), float(alignment[i])]
            row = [epoch, step, int(ids[i]), int(monitor["label"][i]), int(predictions[i]), name, *values]
            if self.log_images and trainer.is_global_zero:
                panel = explanation_panel(monitor["image"][i], maps[i], human[i] if show_human else None)
                panels.append(panel)
                captions.append(
                    f"id {int(ids[i])} | label {int(monitor['label'][i])} | pred {int(predictions[i])} | target "
                    f"{int(targets[i])} | rho prev {values[0]:.2f} | rho first {values[1]:.2f}"
                )
                row.append(panel)
            rows.append(row)
        if self.log_images:
            log_images(trainer, f"explain/{name}/overlays", panels, captions, self._out_dir, f"epoch={epoch:04d}")
        return rows
