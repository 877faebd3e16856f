"""``FeatureVizMonitor``: MACO feature visualizations of chosen classes every ``every_n_epochs`` epochs
(Fel et al. 2023, "Unlocking Feature Visualization for Deeper Networks with MAgnitude Constrained Optimization").

The Fourier magnitude is the mean spectrum of ``spectrum_images`` validation images (drawn once, seeded); for
each class the phase is optimised to maximise its logit (:func:`explain.featureviz.maco`). Logged as
``featureviz/maco``: one picture per class, ``[image | image under its transparency map]``. Runs on global
rank 0 only (pictures, no scalars, no collective).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn
from typing_extensions import override

from explain.batching import resolve_batch_size
from explain.callbacks.base import RankZeroMonitor
from explain.callbacks.batches import draw_monitor_set, first_dataloader
from explain.callbacks.media import log_images
from explain.callbacks.overlays import to_uint8, upscale
from explain.validation import positive_int


def maco_panel(image: Tensor, alpha: Tensor, min_size: int = 128) -> np.ndarray:
    """``[image | maco_overlay(image, alpha)]`` (both rescaled as Horama's ``plot_maco``): uint8 [H', W', 3]."""
    from explain.featureviz import maco_overlay

    plain = maco_overlay(image, torch.ones_like(alpha))  # alpha = 1 everywhere: the percentile-rescaled image
    return upscale(to_uint8(torch.cat([plain, maco_overlay(image, alpha)], dim=2).cpu()), min_size)


class FeatureVizMonitor(RankZeroMonitor):
    """MACO images of chosen classes (logit objective), every ``every_n_epochs`` epochs.

    Args:
        classes: class indices to visualise.
        every_n_epochs: evaluate in epochs 0, n, 2n, ...
        image_size: size of the optimised image; None: the validation images' size.
        steps: optimisation steps per class.
        crops_per_step: random crops per step.
        spectrum_images: validation images whose mean Fourier magnitude MACO keeps fixed.
        maco_options: other options of :func:`explain.featureviz.maco` (``lr``, ``noise``, ``value_range``,
            ``box_size``, ``batch_size``...; ``batch_size="auto"``: one size is found for all classes and epochs).
        **monitor_options: the options every monitor takes (``model_attr``, ``batch_adapter``, ``on_error``,
            ``seed``): see :class:`~explain.callbacks.base.MonitorCallback`.

    Raises:
        ValueError: ``classes``, ``steps``, ``crops_per_step``, ``spectrum_images`` or ``image_size`` out of
            their domain, unknown ``maco_options``, a ``batch_size`` neither None, a positive int nor ``"auto"``, or
            a common option as :class:`~explain.callbacks.base.MonitorCallback` refuses.
    """

    state_fields = ("classes", "image_size", "steps")  # its state_key

    def __init__(
        self,
        classes: Sequence[int],
        every_n_epochs: int = 5,
        image_size: int | None = None,
        steps: int = 128,
        crops_per_step: int = 16,
        spectrum_images: int = 64,
        maco_options: Mapping[str, Any] | None = None,
        **monitor_options: Any,
    ) -> None:
        super().__init__(classes, every_n_epochs, **monitor_options)
        for name, value in (("steps", steps), ("crops_per_step", crops_per_step), ("spectrum_images", spectrum_images)):
            positive_int(f"FeatureVizMonitor: {name}", value)
        positive_int("FeatureVizMonitor: image_size", image_size, allow_none=True)
        import inspect

        from explain.featureviz import maco

        self.maco_options = dict(maco_options or {})
        own = {"objective", "image_size", "steps", "crops_per_step", "magnitude", "seed", "input_size"}
        accepted = set(inspect.signature(maco).parameters) - own
        unknown = sorted(set(self.maco_options) - accepted)
        if unknown:
            raise ValueError(f"FeatureVizMonitor: unknown maco_options {unknown} (accepted: {sorted(accepted)})")
        if self.maco_options.get("batch_size") is not None:  # "auto": one AutoBatchSize remembers it all along
            self.maco_options["batch_size"] = resolve_batch_size(
                "FeatureVizMonitor: maco_options batch_size", self.maco_options["batch_size"], "FeatureVizMonitor"
            )
        self.image_size, self.steps, self.crops_per_step = image_size, steps, crops_per_step
        self.spectrum_images = spectrum_images
        self._magnitude: Tensor | None = None
        self._input_size: tuple[int, int] | None = None

    @override
    def evaluate(self, trainer: Trainer, model: nn.Module, device: torch.device) -> None:
        if self._magnitude is None:
            ok, _ = self.attempt("the Fourier magnitude of the validation images", self._spectrum, trainer)
            if not ok:
                return
        pictures, captions = [], []
        for class_id in self.classes:
            ok, result = self.attempt(f"MACO of class {class_id}", self.visualize, model, class_id)
            if ok:
                pictures.append(maco_panel(*result))
                captions.append(f"class {class_id} | epoch {trainer.current_epoch}")
        tag = f"epoch={trainer.current_epoch:04d}"
        log_images(trainer, "featureviz/maco", pictures, captions, self._out_dir, tag)

    def _spectrum(self, trainer: Trainer) -> None:
        from explain.featureviz import magnitude_spectrum

        data = draw_monitor_set(first_dataloader(trainer.val_dataloaders), self.spectrum_images, self.seed,
                                self.batch_adapter)
        images = data["image"]
        self._input_size = tuple(images.shape[-2:])
        size = self.image_size or min(self._input_size)
        self._magnitude = magnitude_spectrum(images, image_size=size)

    def visualize(self, model: nn.Module, class_id: int) -> tuple[Tensor, Tensor]:
        """``(image [3,H,W], alpha [H,W])`` of MACO for the logit of ``class_id``."""
        from explain.featureviz import logit, maco

        size = self.image_size or min(self._input_size)
        return maco(
            logit(model, class_id),
            size,
            steps=self.steps,
            magnitude=self._magnitude,
            crops_per_step=self.crops_per_step,
            seed=self.seed,
            input_size=self._input_size,
            **self.maco_options,
        )
