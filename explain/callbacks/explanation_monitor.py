"""``ExplanationMonitor``: explain a fixed set of validation images during training and watch the explanations.

Every ``every_n_epochs`` epochs, for each explainer:

* **drift** on a fixed monitor set of ``num_samples`` validation images drawn once (seeded): the per-image
  Spearman rank correlation of today's map with the map of the previous evaluation and of the first one
  (``explain/<explainer>/drift_vs_previous``, ``.../drift_vs_first``; 1 = unchanged ranking of the pixels),
  computed by one :class:`~explain.metrics.ExplanationDrift` per explainer (which keeps the reference maps,
  gathers them across processes and saves them in checkpoints), with image overlays and a per-image table;
* **dataset-level metrics** (human alignment, fidelity, ...) over the first ``max_images`` validation images
  of each process (``explain/<explainer>/<metric>``); every process explains its own shard and torchmetrics
  syncs the states in ``compute()``. A metric with a ``compute_all()`` (``HumanAlignment``: alignment,
  spearman, dice, iou) logs each of its scores, ``explain/<explainer>/<metric>/<score>``, its main score
  (``main_score``) under ``explain/<explainer>/<metric>``.

It never changes the training it watches: it runs inside the validation loop (Lightning's default
``inference_mode`` is fine, the explainers take grad themselves), restores the model's train/eval flags and
the global RNGs, writes no ``.grad`` and no BatchNorm statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
from explain.callbacks.registry import ExplainerItem, ExplainerSpec, MetricItem, resolve_explainers, resolve_metrics
from explain.metrics.drift import ExplanationDrift
from explain.metrics.functional.alignment import per_image_spearman

#: Sobol options of the default monitor: N = 8 designs on the 8x8 grid, 8 * (64 + 1) = 520 forward passes per
#: image (a quarter of the paper's N = 32). The design is seeded, so the same model gives the same map and the
#: drift measures the model's change, not the estimator's noise.
DEFAULT_SOBOL = {"nb_design": 8}



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

    Its cost is set by ``every_n_epochs``, ``num_samples``, ``max_images`` and the explainers' options (Sobol's
    ``nb_design``); the configs choose them per experiment (``configs/callbacks/*.yaml``: the demo's monitor
    costs under 10% of its fit on 2 CPU cores, ``benchmarks/bench_callbacks.py``).

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
        every_n_epochs: int = 1,
        num_samples: int = 16,
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
        # state that survives a checkpoint: the monitor set, and each explainer's drift metric (its references)
        self._monitor: dict[str, Tensor] | None = None
        self._drift: dict[str, ExplanationDrift] = {}
        self._drift_states: dict[str, dict[str, Any]] = {}  # loaded before the drift metrics exist
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
        drift = {**self._drift_states, **{name: metric.state_dict() for name, metric in self._drift.items()}}
        return {
            "monitor": self._monitor,
            "drift": drift,
            "evaluations": self._evaluations,
            "last_epoch": self._last_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._monitor = state_dict["monitor"]
        self._drift_states = dict(state_dict["drift"])
        self._drift = {}  # rebuilt from the loaded states at the next evaluation
        self._evaluations = int(state_dict["evaluations"])
        self._last_epoch = int(state_dict["last_epoch"])

    def drift_metric(self, name: str) -> ExplanationDrift:
        """The :class:`~explain.metrics.ExplanationDrift` of explainer ``name`` (created on first use, with the
        references of a loaded checkpoint)."""
        if name not in self._drift:
            metric = ExplanationDrift()
            if name in self._drift_states:
                metric.load_state_dict(self._drift_states.pop(name))
            self._drift[name] = metric
        return self._drift[name]

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
                    rows += self._log_drift(trainer, pl_module, name, maps[name], monitor, targets, predictions)
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
            # compute_all (synced like compute) gives every score of a metric such as HumanAlignment
            compute = getattr(metric, "compute_all", None) or metric.compute
            ok, value = self.attempt(f"metric {metric_name!r} of explainer {name!r}", compute)
            if not ok:
                continue
            values = value if isinstance(value, Mapping) else {None: value}
            main = getattr(metric, "main_score", None)
            for key, scalar in values.items():
                suffix = metric_name if key in (None, main) else f"{metric_name}/{key}"
                # already synced by torchmetrics: sync_dist averages equal values (and keeps Lightning quiet)
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
        """Log the mean drift of one explainer and its overlays; return its table rows.

        Every process explained the whole monitor set; each feeds its share of it (ids ``rank::world_size``) to
        the explainer's :class:`~explain.metrics.ExplanationDrift`, whose ``compute`` gathers the shares, and
        whose ``reset`` makes this evaluation the reference of the next one.
        """
        ids = monitor["ids"]
        drift = self.drift_metric(name).to(maps.device)
        share = slice(trainer.global_rank, None, max(trainer.world_size, 1))
        drift.update(maps=maps[share], ids=ids[share])
        means = drift.compute()  # {} at the first evaluation: nothing to compare with yet
        per_image = drift.compute_per_image()
        drift.reset()
        for key, value in means.items():
            pl_module.log(f"explain/{name}/drift_{key}", float(value), sync_dist=True)
        rows_of = torch.searchsorted(per_image["ids"], ids.cpu())  # per_image is sorted by id
        vs_previous, vs_first = per_image["vs_previous"][rows_of], per_image["vs_first"][rows_of]
        human = monitor.get("heatmap")
        has_human = monitor.get("has_heatmap")
        alignment = torch.full_like(vs_first, math.nan)
        if human is not None and has_human.any():
            rho = per_image_spearman(maps[has_human].float(), human[has_human].float())
            alignment[has_human.cpu()] = rho.cpu().to(alignment.dtype)

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
