"""``ExplanationMonitor``: explain a fixed set of validation images during training and watch the explanations.

Every ``every_n_epochs`` epochs, for each explainer:

* **drift** on a fixed monitor set of ``num_samples`` validation images drawn once (seeded): the per-image
  Spearman rank correlation of today's map with the map of the previous evaluation and of the first one
  (``explain/<explainer>/drift_vs_previous``, ``.../drift_vs_first``; 1 = unchanged ranking of the pixels),
  computed by one :class:`~explain.metrics.ExplanationDrift` per explainer (which keeps the reference maps,
  gathers them across processes and saves them in checkpoints), with image overlays and a per-image table;
* **dataset-level metrics** (human alignment, fidelity, spurious mass, ...) over the first ``max_images``
  validation images of each process (``explain/<explainer>/<metric>``); every process explains its own shard and
  torchmetrics syncs the states in ``compute()``. A metric with a ``compute_all()`` (``HumanAlignment``:
  alignment, spearman, dice, iou) logs each of its scores, ``explain/<explainer>/<metric>/<score>``, its main score
  (``main_score``) under ``explain/<explainer>/<metric>``.

When the batches carry a ``spurious_mask`` (the data contract's pixels to ignore, e.g. the shortcut watermark),
the monitor adds :class:`~explain.metrics.SpuriousMass` (``explain/<explainer>/spurious_mass``), logs the mask's
mean area share once per evaluation for scale (``explain/spurious_area``: what a uniform map would score), outlines
the region in the overlays and adds a ``spurious_mass`` column to the per-image table.

With ``on_test=True`` the dataset-level metrics are also computed on every test dataloader when ``trainer.test``
runs (``test/<split>/explain/<explainer>/<metric>``, ``test/<split>/explain/spurious_area``; ``<split>`` as the
datamodule's ``test_split_names``): the scores of the tested (e.g. best) checkpoint.

A score that no image supports is not logged: with no human map at all there is no alignment, and a metric that
computes NaN (e.g. a spurious mass with no positive map) is skipped; each case is warned about once.

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
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from explain.base import Explainer, eval_mode
from explain.callbacks.base import MonitorCallback, OnError
from explain.callbacks.batches import (
    BatchAdapter,
    draw_monitor_set,
    first_dataloader,
    slice_contract,
    to_contract,
)
from explain.callbacks.media import log_images, log_table
from explain.callbacks.overlays import explanation_panel
from explain.callbacks.registry import ExplainerItem, ExplainerSpec, MetricItem, resolve_explainers, resolve_metrics
from explain.metrics.drift import ExplanationDrift
from explain.metrics.simulatability import Simulatability
from explain.metrics.functional.alignment import per_image_spearman
from explain.metrics.functional.spurious import spurious_area, spurious_mass
from explain.metrics.spurious import SpuriousMass
from explain.validation import non_negative_int, one_of, positive_int

#: Sobol options of the default monitor: N = 8 designs on the 8x8 grid, 8 * (64 + 1) = 520 forward passes per
#: image (a quarter of the paper's N = 32). The design is seeded, so the same model gives the same map and the
#: drift measures the model's change, not the estimator's noise.
DEFAULT_SOBOL = {"nb_design": 8}

#: logging key of the spurious mass the monitor adds when the data carry a ``spurious_mask``
SPURIOUS_KEY = "spurious_mass"


def default_explainers(model: nn.Module) -> list[Any]:
    """Saliency and Sobol, plus EVA for a 1-Lipschitz network (``lipschitz_body = True``)."""
    explainers: list[Any] = ["saliency", {"sobol": dict(DEFAULT_SOBOL)}]
    if getattr(model, "lipschitz_body", False):
        explainers.append("eva")
    return explainers


def default_metrics(has_human_maps: bool) -> list[str]:
    """Deletion (fidelity), and human alignment when the data has human maps."""
    return ["alignment", "deletion"] if has_human_maps else ["deletion"]


class _Evaluation:
    """What one evaluation (of the validation data, or of one test dataloader) accumulates on this process."""

    def __init__(self, metrics: dict[str, dict[str, ExplanationMetric]], area: MeanMetric | None) -> None:
        self.metrics = metrics  # {explainer: {metric key: metric}}
        self.area = area  # mean area share of the spurious masks (None: the data carry none)
        self.seen = 0  # images fed to the metrics
        self.with_human = 0  # of which with a human map


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
        metrics: names (``"alignment"``, ``"deletion"``, ``"insertion"``, ``"mufidelity"``, ``"stability"``,
            ``"spurious"``), ``{name: {options}}``, :class:`~explain.metrics.ExplanationMetric` instances or a list
            of those; ``[]`` for none. None: ``deletion``, and ``alignment`` when the data has human maps.
        every_n_epochs: evaluate in epochs 0, n, 2n, ...
        num_samples: size of the monitor set (drift, overlays, table).
        log_images: log overlays (map over image, human map beside it when there is one).
        batch_adapter: ``batch -> dict(image, label[, heatmap, has_heatmap, spurious_mask])`` for another
            project's batches.
        on_error: ``"raise"`` or ``"warn"`` (skip a failing explainer or metric this time, keep training).
        seed: seed of the monitor set's draw.
        max_images: validation images per process fed to the dataset-level metrics at each evaluation
            (None: the whole validation set); the cost knob of the metrics. The same per test dataloader.
        target: explain the ``"label"`` or the model's ``"prediction"``.
        model_attr: attribute of the LightningModule holding the network to explain (None: the module itself).
        spurious_mass: when the batches carry a ``spurious_mask``, add :class:`~explain.metrics.SpuriousMass`
            (key ``spurious_mass``) to the metrics unless they hold one already, and log
            ``explain/spurious_area``. Batches without the mask never get it.
        on_test: also compute the dataset-level metrics on each test dataloader when ``trainer.test`` runs.
        simulatability: add :class:`~explain.metrics.Simulatability` (key ``simulatability``: the utility of each
            explainer's maps for a meta-predictor of the model's decisions, with its interval and the random and
            oracle controls) unless the metrics hold one; a dict gives its options (``{"seeds": 3, "steps": 100}``).
            It needs a few hundred images for a meaningful score: raise ``max_images``.

    Raises:
        ValueError: ``num_samples`` not a positive int, ``max_images`` negative, an unknown ``target``, explainers or
            metrics that :mod:`explain.callbacks.registry` cannot build, a common option as
            :class:`~explain.callbacks.base.MonitorCallback` refuses; at the first evaluation, a metric that needs
            what the batches do not carry (ids, human maps, a spurious mask).
        RuntimeError: at the first due validation, the trainer has no validation dataloader.
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
        spurious_mass: bool = True,
        on_test: bool = True,
        simulatability: Union[bool, dict[str, Any]] = False,
    ) -> None:
        super().__init__(every_n_epochs, on_error, model_attr, batch_adapter, seed)
        self.num_samples = positive_int("ExplanationMonitor: num_samples", num_samples)
        self.max_images = non_negative_int("ExplanationMonitor: max_images", max_images, allow_none=True)
        self.target = one_of("ExplanationMonitor: target", target, ("label", "prediction"))
        self.log_images = bool(log_images)
        self.spurious_mass = bool(spurious_mass)
        self.on_test = bool(on_test)
        # True, or the options of Simulatability (checked now)
        self.simulatability = Simulatability(**simulatability) if isinstance(simulatability, dict) else simulatability
        self._explainer_request = explainers
        self._specs: list[ExplainerSpec] | None = None if explainers is None else resolve_explainers(explainers)
        self._metric_templates = None if metrics is None else resolve_metrics(metrics)
        # state that survives a checkpoint: the monitor set, and each explainer's drift metric (its references)
        self._monitor: dict[str, Tensor] | None = None
        self._drift: dict[str, ExplanationDrift] = {}
        self._drift_states: dict[str, dict[str, Any]] = {}  # loaded before the drift metrics exist
        self._evaluations = 0
        # per-evaluation working state: {dataloader index: _Evaluation} while an evaluation runs, else {}
        self._runs: dict[int, _Evaluation] = {}
        self._explainers: dict[str, Explainer] = {}
        self._failed: set[str] = set()
        self._warned: set[str] = set()
        self._seen = 0  # images this process fed to the dataset-level metrics in the last evaluation

    # ------------------------------------------------------------------ identity and state
    @property
    @override
    def state_key(self) -> str:
        # from the arguments, not from setup (the default explainers depend on the model): stable across a resume.
        # Only what defines the saved state (the explainers, the monitor set's size and seed): a resume with
        # another schedule (every_n_epochs) or other metrics keeps the monitor set and the reference maps.
        names = "default" if self._explainer_request is None else ",".join(s.name for s in self._specs or [])
        return self._generate_state_key(explainers=names, num_samples=self.num_samples, seed=self.seed)

    @property
    def explainer_names(self) -> list[str]:
        """Logging keys of the explainers (known after ``setup`` when the defaults are used)."""
        return [] if self._specs is None else [spec.name for spec in self._specs]

    @override
    def state_dict(self) -> dict[str, Any]:
        drift = {**self._drift_states, **{name: metric.state_dict() for name, metric in self._drift.items()}}
        return {
            "monitor": self._monitor,
            "drift": drift,
            "evaluations": self._evaluations,
            "last_epoch": self._last_epoch,
        }

    @override
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
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        model = self.explained_model(pl_module)
        if self._specs is None:
            self._specs = resolve_explainers(default_explainers(model))
        for spec in self._specs:  # a factory that cannot build on this model fails now
            self.attempt(f"building explainer {spec.name!r}", spec.build, model)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.is_due(trainer):
            return
        dataloader = first_dataloader(trainer.val_dataloaders)
        if dataloader is None:
            raise RuntimeError("ExplanationMonitor needs a validation dataloader to draw its monitor set")
        with self.explaining(pl_module) as (model, device):
            if self._monitor is None:
                self._monitor = draw_monitor_set(dataloader, self.num_samples, self.seed, self.batch_adapter)
            self._start(model, {0: set(self._monitor)}, device)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._feed(pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._runs:
            return
        with self.explaining(pl_module) as (model, device):
            self._log_dataset_metrics(trainer, pl_module, self._runs[0], "explain")
            self._monitor_set_evaluation(trainer, pl_module, model, device)
        self._finish()
        self._last_epoch = trainer.current_epoch
        self._evaluations += 1

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.on_test or not self._metrics_wanted():
            return
        loaders = trainer.test_dataloaders
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        with self.explaining(pl_module) as (model, device):
            # the keys of each test set, from one sample (the same on every process)
            keys = {index: set(draw_monitor_set(loader, 1, self.seed, self.batch_adapter)) for index, loader in
                    enumerate(loaders)}
            self._start(model, keys, device)

    #: test batches feed the test-time metrics exactly as validation batches feed the validation ones
    on_test_batch_end = on_validation_batch_end

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._runs:
            return
        with self.explaining(pl_module):
            for index, run in self._runs.items():
                self._log_dataset_metrics(trainer, pl_module, run, self._test_prefix(trainer, index))
        self._finish()

    # ------------------------------------------------------------------ an evaluation
    def _metrics_wanted(self) -> bool:
        wanted = self._metric_templates is None or bool(self._metric_templates)
        return wanted or self.spurious_mass or bool(self.simulatability)

    def _start(self, model: nn.Module, keys: dict[int, set[str]], device: torch.device) -> None:
        """Build the explainers and, per dataloader, fresh metrics for data with these ``keys``."""
        self._failed, self._explainers, self._seen = set(), {}, 0
        for spec in self._specs or []:
            ok, explainer = self.attempt(f"building explainer {spec.name!r}", spec.build, model)
            if ok:
                self._explainers[spec.name] = explainer
            else:
                self._failed.add(spec.name)
        self._runs = {index: self._new_evaluation(data_keys, device) for index, data_keys in keys.items()}

    def _new_evaluation(self, keys: set[str], device: torch.device) -> _Evaluation:
        has_human, has_mask = "heatmap" in keys, "spurious_mask" in keys
        if self._metric_templates is None:
            self._metric_templates = resolve_metrics(default_metrics(has_human))
        templates = dict(self._metric_templates)
        for metric_name, metric in templates.items():
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
            if "spurious_mask" in metric.requires and not has_mask and not isinstance(metric, Simulatability):
                raise ValueError(
                    f"ExplanationMonitor: metric {metric_name!r} needs a 'spurious_mask' in the batches, which they "
                    "do not carry; remove the metric or give the mask through batch_adapter"
                )
        if has_mask and self.spurious_mass and not any(isinstance(m, SpuriousMass) for m in templates.values()):
            templates[SPURIOUS_KEY] = SpuriousMass()
        if self.simulatability is not False and not any(isinstance(m, Simulatability) for m in templates.values()):
            # the data's spurious_mask, when there is one, is its oracle control
            templates["simulatability"] = self.simulatability if isinstance(self.simulatability, Simulatability) \
                else Simulatability()
        metrics = {
            spec.name: {key: metric.clone().to(device) for key, metric in templates.items()}
            for spec in self._specs or []
        }
        return _Evaluation(metrics, MeanMetric().to(device) if has_mask and self.spurious_mass else None)

    def _feed(self, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Explain (the first ``max_images`` images of) a batch and update the dataset-level metrics with it."""
        run = self._runs.get(dataloader_idx)
        if run is None or not any(run.metrics.values()) and run.area is None:
            return
        room = None if self.max_images is None else self.max_images - run.seen
        if room is not None and room <= 0:
            return
        with self.explaining(pl_module) as (model, device):
            data = to_contract(batch, self.batch_adapter)
            data = {key: value.to(device) for key, value in slice_contract(data, room or len(data["label"])).items()}
            run.seen += data["label"].shape[0]
            self._seen += data["label"].shape[0]
            if "has_heatmap" in data:
                run.with_human += int(data["has_heatmap"].sum())
            if run.area is not None:
                run.area.update(spurious_area(data["spurious_mask"]))
            targets = self._targets(model, data)
            for name, explainer in self._explainers.items():
                if name in self._failed:
                    continue
                what = f"explainer {name!r} (with its metrics) on batch {batch_idx}"
                ok, _ = self.attempt(what, self._update_metrics, run.metrics[name], explainer, model, data, targets)
                if not ok:
                    self._failed.add(name)

    def _finish(self) -> None:
        self._runs, self._explainers = {}, {}

    def _targets(self, model: nn.Module, data: Mapping[str, Tensor]) -> Tensor:
        if self.target == "label":
            return data["label"]
        with torch.no_grad(), eval_mode(model):
            return model(data["image"]).argmax(1)

    @staticmethod
    def _update_metrics(
        metrics: Mapping[str, ExplanationMetric],
        explainer: Explainer,
        model: nn.Module,
        data: Mapping[str, Tensor],
        targets: Tensor,
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
            "spurious_mask": data.get("spurious_mask"),
        }
        for metric in metrics.values():
            metric.update(**{key: available[key] for key in metric.requires})

    # ------------------------------------------------------------------ dataset-level metrics
    def _log_dataset_metrics(self, trainer: Trainer, pl_module: LightningModule, run: _Evaluation, prefix: str) -> None:
        """Compute (synced) and log every metric of ``run`` under ``<prefix>/<explainer>/...``, and the mask's area
        under ``<prefix>/spurious_area``. Every process calls it and takes the same branches."""
        device = pl_module.device
        names = [spec.name for spec in self._specs or []]
        failed = self.agree(trainer, [name in self._failed for name in names], device)
        with_human = self._total(trainer, run.with_human, device)
        if run.area is not None:
            self._log(pl_module, f"{prefix}/spurious_area", run.area.compute())
        for name, skip in zip(names, failed):
            if skip:
                continue
            for metric_name, metric in run.metrics[name].items():
                if "human" in metric.requires and with_human == 0:
                    self._warn_once(
                        f"no-human:{metric_name}",
                        f"ExplanationMonitor: no image fed to metric {metric_name!r} has a human map "
                        "(has_heatmap is False everywhere): its score is not logged",
                    )
                    continue
                # compute_all (synced like compute) gives every score of a metric such as HumanAlignment
                compute = getattr(metric, "compute_all", None) or metric.compute
                ok, value = self.attempt(f"metric {metric_name!r} of explainer {name!r}", compute)
                if not ok:
                    continue
                values = value if isinstance(value, Mapping) else {None: value}
                main = getattr(metric, "main_score", None)
                for key, scalar in values.items():
                    suffix = metric_name if key in (None, main) else f"{metric_name}/{key}"
                    self._log(pl_module, f"{prefix}/{name}/{suffix}", scalar)
        for metrics in run.metrics.values():
            for metric in metrics.values():
                metric.reset()

    def _log(self, pl_module: LightningModule, key: str, value: Tensor | float) -> None:
        """``pl_module.log(key, value)``, unless the value is NaN: no image supports it (warned once per key)."""
        value = float(value)
        if math.isnan(value):
            self._warn_once(key, f"ExplanationMonitor: {key} is not logged: no image supports a score (NaN)")
            return
        # already synced by torchmetrics: sync_dist averages equal values (and keeps Lightning quiet)
        pl_module.log(key, value, sync_dist=True, add_dataloader_idx=False)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    @staticmethod
    def _total(trainer: Trainer, count: int, device: torch.device) -> int:
        """``count`` summed over the processes (a collective: every rank calls it)."""
        if trainer.world_size <= 1:
            return count
        return int(trainer.strategy.reduce(torch.tensor(float(count), device=device), reduce_op="sum"))

    @staticmethod
    def _test_prefix(trainer: Trainer, index: int) -> str:
        """``test/<split>/explain`` with the datamodule's ``test_split_names`` (else the dataloader's index when
        there are several, nothing when there is one)."""
        names = getattr(getattr(trainer, "datamodule", None), "test_split_names", None)
        loaders = trainer.test_dataloaders
        several = isinstance(loaders, (list, tuple, Mapping)) and len(loaders) > 1
        if names is not None and index < len(names):
            return f"test/{names[index]}/explain"
        return f"test/{index}/explain" if several else "test/explain"

    # ------------------------------------------------------------------ the monitor set
    def _monitor_set_evaluation(
        self, trainer: Trainer, pl_module: LightningModule, model: nn.Module, device: torch.device
    ) -> None:
        """Explain the monitor set with every explainer; log drift, overlays and the per-image table."""
        monitor = {key: value.to(device) for key, value in self._monitor.items()}
        targets = self._targets(model, monitor)
        with torch.no_grad(), eval_mode(model):
            predictions = model(monitor["image"]).argmax(1)
        maps: dict[str, Tensor] = {}
        for name, explainer in self._explainers.items():
            ok, result = self.attempt(f"explainer {name!r} on the monitor set", explainer, monitor["image"], targets)
            if ok:
                maps[name] = result
        # every rank must take the same branches around the collectives (the drift metric's gather, self.log)
        names = [spec.name for spec in self._specs or []]
        missing = self.agree(trainer, [name not in maps for name in names], pl_module.device)
        rows: list[list[Any]] = []
        columns: list[str] = []
        for name, skip in zip(names, missing):
            if skip:
                continue
            means, scores = self.monitor_scores(trainer, name, maps[name], monitor)
            for key, value in means.items():
                self._log(pl_module, f"explain/{name}/drift_{key}", value)
            rows += self._present(trainer, name, maps[name], monitor, targets, predictions, scores)
            columns = ["epoch", "step", "id", "label", "prediction", "explainer", *scores]
        columns += ["overlay"] if self.log_images else []
        log_table(trainer, "explain/per_image", columns, rows, self._out_dir)

    def monitor_scores(
        self, trainer: Trainer, name: str, maps: Tensor, monitor: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Scores of explainer ``name``'s maps of the monitor set: ``(means, per_image)``.

        ``means``: the mean drift ``{"vs_previous", "vs_first"}`` (empty at the first evaluation). ``per_image``:
        float [N] columns in the monitor set's order, ``drift_vs_previous``, ``drift_vs_first`` (NaN without a
        reference), ``human_spearman`` (NaN without a human map) and, when the data carry a mask,
        ``spurious_mass``.

        Every process explained the whole monitor set; each feeds its share of it (ids ``rank::world_size``) to
        the explainer's :class:`~explain.metrics.ExplanationDrift`, whose ``compute`` gathers the shares, and
        whose ``reset`` makes this evaluation the reference of the next one (a collective: every rank calls it).
        """
        ids = monitor["ids"]
        drift = self.drift_metric(name).to(maps.device)
        share = slice(trainer.global_rank, None, max(trainer.world_size, 1))
        drift.update(maps=maps[share], ids=ids[share])
        means = drift.compute()  # {} at the first evaluation: nothing to compare with yet
        per_image = drift.compute_per_image()
        drift.reset()
        rows_of = torch.searchsorted(per_image["ids"], ids.cpu())  # per_image is sorted by id
        scores = {
            "drift_vs_previous": per_image["vs_previous"][rows_of].float(),
            "drift_vs_first": per_image["vs_first"][rows_of].float(),
        }
        human, has_human = monitor.get("heatmap"), monitor.get("has_heatmap")
        alignment = torch.full((ids.shape[0],), math.nan)
        if human is not None and has_human.any():
            rho = per_image_spearman(maps[has_human].float(), human[has_human].float())
            alignment[has_human.cpu()] = rho.cpu()
        scores["human_spearman"] = alignment
        if "spurious_mask" in monitor:
            scores["spurious_mass"] = spurious_mass(maps, monitor["spurious_mask"]).float().cpu()
        return means, scores

    def _present(
        self,
        trainer: Trainer,
        name: str,
        maps: Tensor,
        monitor: Mapping[str, Tensor],
        targets: Tensor,
        predictions: Tensor,
        scores: Mapping[str, Tensor],
    ) -> list[list[Any]]:
        """Log the overlays of one explainer (rank 0) and return its table rows."""
        ids, labels = monitor["ids"], monitor["label"]
        human, has_human, spurious = monitor.get("heatmap"), monitor.get("has_heatmap"), monitor.get("spurious_mask")
        epoch, step = trainer.current_epoch, trainer.global_step
        panels, captions, rows = [], [], []
        for i in range(ids.shape[0]):
            values = [float(column[i]) for column in scores.values()]
            row = [epoch, step, int(ids[i]), int(labels[i]), int(predictions[i]), name, *values]
            if self.log_images and trainer.is_global_zero:
                show_human = human is not None and bool(has_human[i])
                panel = explanation_panel(
                    monitor["image"][i],
                    maps[i],
                    human[i] if show_human else None,
                    spurious=spurious[i] if spurious is not None else None,
                )
                panels.append(panel)
                caption = (
                    f"id {int(ids[i])} | label {int(labels[i])} | pred {int(predictions[i])} | target "
                    f"{int(targets[i])} | rho prev {float(scores['drift_vs_previous'][i]):.2f} | rho first "
                    f"{float(scores['drift_vs_first'][i]):.2f}"
                )
                if "spurious_mass" in scores:
                    caption += f" | spurious {float(scores['spurious_mass'][i]):.2f}"
                captions.append(caption)
                row.append(panel)
            rows.append(row)
        if self.log_images:
            log_images(trainer, f"explain/{name}/overlays", panels, captions, self._out_dir, f"epoch={epoch:04d}")
        return rows
