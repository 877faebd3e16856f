"""``ConceptMonitor``: CRAFT concepts of chosen classes every ``every_n_epochs`` epochs (Fel et al. 2023).

For each class: validation images of that class (drawn once, seeded), ``Craft(input_to_latent,
latent_to_logit).fit(images, class_id)``, the concepts' importance (total Sobol indices) and the concept
gallery (each concept's top crops, rows by importance), logged as a picture and an importance table
(``concepts/class_<c>/gallery``, ``concepts/importance``). Runs on global rank 0 only: it logs pictures and
tables, no scalars, and joins no collective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn
from typing_extensions import override

from explain.callbacks.base import RankZeroMonitor
from explain.callbacks.batches import collect_class_samples, first_dataloader
from explain.callbacks.media import log_images, log_table
from explain.callbacks.overlays import figure_to_array
from explain.validation import positive_int


class ConceptMonitor(RankZeroMonitor):
    """CRAFT concept gallery and importance table of chosen classes, every ``every_n_epochs`` epochs.

    Args:
        classes: class indices to decompose.
        every_n_epochs: evaluate in epochs 0, n, 2n, ...
        num_images: validation images per class fed to CRAFT (drawn once, seeded).
        n_concepts: NMF rank (concepts per class).
        at: name of the last child of ``input_to_latent`` (see :func:`explain.concepts.split_model`); None: the
            child before global pooling.
        sign_split: feed ``cat(relu(z), relu(-z))`` to CRAFT (signed activations, e.g. GroupSort 1-Lipschitz
            networks); None: True when the network has ``lipschitz_body = True``.
        nb_design: Sobol design size of the importance.
        top_k: crops per concept in the gallery.
        craft_options: other :class:`~explain.concepts.Craft` options (``patch_size``, ``stride``, ``nmf``...).
        **monitor_options: the options every monitor takes (``model_attr``, ``batch_adapter``, ``on_error``,
            ``seed``): see :class:`~explain.callbacks.base.MonitorCallback`.

    Raises:
        ValueError: ``classes``, ``num_images``, ``n_concepts``, ``nb_design`` or ``top_k`` out of their domain,
            ``craft_options`` that set the monitor's own arguments or that :class:`~explain.concepts.Craft` refuses, or
            a common option as :class:`~explain.callbacks.base.MonitorCallback` refuses.
    """

    state_fields = ("classes", "at", "n_concepts")  # its state_key

    def __init__(
        self,
        classes: Sequence[int],
        every_n_epochs: int = 5,
        num_images: int = 32,
        n_concepts: int = 6,
        at: str | None = None,
        sign_split: bool | None = None,
        nb_design: int = 32,
        top_k: int = 6,
        craft_options: Mapping[str, Any] | None = None,
        **monitor_options: Any,
    ) -> None:
        super().__init__(classes, every_n_epochs, **monitor_options)
        for name, value in (("num_images", num_images), ("n_concepts", n_concepts), ("nb_design", nb_design),
                            ("top_k", top_k)):
            positive_int(f"ConceptMonitor: {name}", value)
        from explain.concepts import Craft

        self.craft_options = dict(craft_options or {})
        reserved = sorted(set(self.craft_options) & {"input_to_latent", "latent_to_logit", "n_concepts"})
        if reserved:
            raise ValueError(f"ConceptMonitor: set {reserved} with the monitor's own arguments, not craft_options")
        Craft(nn.Identity(), n_concepts=n_concepts, **self.craft_options)  # a bad option fails now
        self.num_images, self.n_concepts, self.at, self.sign_split = num_images, n_concepts, at, sign_split
        self.nb_design, self.top_k = nb_design, top_k
        self._samples: dict[int, dict[str, Tensor]] | None = None

    @override
    def evaluate(self, trainer: Trainer, model: nn.Module, device: torch.device) -> None:
        if self._samples is None:
            dataloader = first_dataloader(trainer.val_dataloaders)
            self._samples = collect_class_samples(
                dataloader, self.classes, self.num_images, self.seed, self.batch_adapter
            )
        rows = []
        for class_id in self.classes:
            if class_id not in self._samples:
                self.attempt(f"CRAFT of class {class_id}", self._missing, class_id)
                continue
            images = self._samples[class_id]["image"].to(device)
            ok, result = self.attempt(f"CRAFT of class {class_id}", self.concepts, model, images, class_id)
            if not ok:
                continue
            importance, picture = result
            caption = f"class {class_id} | epoch {trainer.current_epoch} | {images.shape[0]} images"
            log_images(trainer, f"concepts/class_{class_id}/gallery", [picture], [caption], self._out_dir,
                       f"epoch={trainer.current_epoch:04d}")
            rows += [
                [trainer.current_epoch, trainer.global_step, class_id, concept, float(value)]
                for concept, value in enumerate(importance.tolist())
            ]
        log_table(trainer, "concepts/importance", ["epoch", "step", "class", "concept", "importance"], rows,
                  self._out_dir)

    @staticmethod
    def _missing(class_id: int) -> None:
        raise ValueError(f"the validation data has no image of class {class_id}")

    def concepts(self, model: nn.Module, images: Tensor, class_id: int) -> tuple[Tensor, Any]:
        """Fit CRAFT on ``images`` of ``class_id``: ``(importance [r], gallery picture uint8 [H,W,3])``."""
        from explain.concepts import Craft, split_model

        sign_split = self.sign_split if self.sign_split is not None else bool(getattr(model, "lipschitz_body", False))
        input_to_latent, latent_to_logit = split_model(model, at=self.at, sign_split=sign_split)
        craft = Craft(input_to_latent, latent_to_logit, n_concepts=self.n_concepts, **self.craft_options)
        craft.fit(images, class_id=class_id)
        importance = craft.importance(images, nb_design=self.nb_design, seed=self.seed)
        return importance.detach().cpu(), figure_to_array(craft.gallery(top_k=self.top_k))
