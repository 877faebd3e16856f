"""``ConceptMonitor``: CRAFT concepts of chosen classes every ``every_n_epochs`` epochs (Fel et al. 2023).

For each class: validation images of that class (drawn once, seeded), ``Craft(input_to_latent,
latent_to_logit).fit(images, class_id)``, the concepts' importance (total Sobol indices) and the concept
gallery (each concept's top crops, rows by importance), logged as a picture and an importance table
(``concepts/class_<c>/gallery``, ``concepts/importance``).

Concept drift (DESIGN section 11): the concepts (atoms) of each class are matched to those of the previous and of
the first evaluation by the Hungarian assignment on ``|cosine|``
(:func:`explain.metrics.functional.dictionary.hungarian_match`), and logged as scalars under
``concepts/class_<c>/``: ``drift_previous`` and ``drift_first`` (mean matched cosine, 1.0 for unchanged
concepts), ``born`` and ``lost`` (concepts of this evaluation, and of the previous one, whose match has a cosine
below ``match_threshold``), ``importance_shift`` (mean ``|importance - previous importance|`` over the matched
pairs), and the dictionary's quality on the crops it was fitted on (``r2_per_dimension``, ``r2_global``,
``dead_codes``, ``l0``, ``hoyer``, ``concentration``: share of the importance in the ``top_concepts`` most
important concepts). The table ``concepts/drift`` has one row per concept and evaluation with its top crops as a
picture and ``first_concept``, the concept of the first evaluation it matches, so a W&B table filtered on it
shows that concept's gallery across epochs. The previous and first concepts are the monitor's state
(``state_dict``): a resumed run logs the same drift.

Runs on global rank 0 only (scalars logged with ``rank_zero_only=True``) and joins no collective; the class
images are read from the validation dataset itself (not a rank's shard), so 1 or N processes log the same.
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
from explain.metrics import DictionaryQuality
from explain.metrics.functional.dictionary import hungarian_match, importance_concentration
from explain.validation import in_interval, positive_int


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
        craft_options: other :class:`~explain.concepts.Craft` options (``patch_size``, ``stride``, ``nmf``,
            ``dictionary``, ``dictionary_options``: e.g. ``{"dictionary": "topk_sae"}``; ``batch_size`` and the
            dictionary's ``encode_batch_size`` may be ``"auto"``: one size is found for all classes and epochs).
        match_threshold: a matched pair of concepts with ``|cosine|`` below it counts as one concept born and one
            lost.
        top_concepts: k of the importance concentration.
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
        match_threshold: float = 0.5,
        top_concepts: int = 3,
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
        share_auto_batch_sizes(self.craft_options)
        Craft(nn.Identity(), n_concepts=n_concepts, **self.craft_options)  # a bad option fails now
        self.num_images, self.n_concepts, self.at, self.sign_split = num_images, n_concepts, at, sign_split
        self.nb_design, self.top_k = nb_design, top_k
        self.match_threshold = in_interval("ConceptMonitor: match_threshold", match_threshold, 0, 1)
        self.top_concepts = positive_int("ConceptMonitor: top_concepts", top_concepts)
        self._samples: dict[int, dict[str, Tensor]] | None = None
        # per class: {"atoms": [r, c], "importance": [r]} (CPU) of the first and of the previous evaluation
        self._first: dict[int, dict[str, Tensor]] = {}
        self._previous: dict[int, dict[str, Tensor]] = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "first": self._first, "previous": self._previous}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._first = {int(c): dict(v) for c, v in state_dict.get("first", {}).items()}
        self._previous = {int(c): dict(v) for c, v in state_dict.get("previous", {}).items()}

    @override
    def evaluate(self, trainer: Trainer, model: nn.Module, device: torch.device) -> None:
        if self._samples is None:
            dataloader = first_dataloader(trainer.val_dataloaders)
            self._samples = collect_class_samples(
                dataloader, self.classes, self.num_images, self.seed, self.batch_adapter
            )
        rows, drift_rows = [], []
        for class_id in self.classes:
            if class_id not in self._samples:
                self.attempt(f"CRAFT of class {class_id}", self._missing, class_id)
                continue
            images = self._samples[class_id]["image"].to(device)
            ok, result = self.attempt(f"CRAFT of class {class_id}", self.concepts, model, images, class_id)
            if not ok:
                continue
            craft, importance, picture = result
            drift_rows += self.log_drift(trainer, craft, importance, class_id)
            caption = f"class {class_id} | epoch {trainer.current_epoch} | {images.shape[0]} images"
            log_images(trainer, f"concepts/class_{class_id}/gallery", [picture], [caption], self._out_dir,
                       f"epoch={trainer.current_epoch:04d}")
            rows += [
                [trainer.current_epoch, trainer.global_step, class_id, concept, float(value)]
                for concept, value in enumerate(importance.tolist())
            ]
        log_table(trainer, "concepts/importance", ["epoch", "step", "class", "concept", "importance"], rows,
                  self._out_dir)
        log_table(trainer, "concepts/drift", ["epoch", "class", "concept", "first_concept", "cosine_first",
                                              "importance", "crops"], drift_rows, self._out_dir)

    def log_drift(self, trainer: Trainer, craft: Any, importance: Tensor, class_id: int) -> list[list[Any]]:
        """Log the drift and quality scalars of one class (module docstring); return its ``concepts/drift`` rows."""
        atoms = craft.W_.detach().cpu()
        scalars = {name: float(value) for name, value in self.quality(craft, importance).items()}
        current = {"atoms": atoms, "importance": importance}
        first = self._first.setdefault(class_id, current)
        previous = self._previous.get(class_id)
        if previous is not None:
            rows, cols, cosine = hungarian_match(atoms, previous["atoms"])
            kept = cosine >= self.match_threshold
            scalars["drift_previous"] = float(cosine.mean())
            scalars["born"] = float(atoms.shape[0] - int(kept.sum()))
            scalars["lost"] = float(previous["atoms"].shape[0] - int(kept.sum()))
            shift = (importance[rows[kept]] - previous["importance"][cols[kept]]).abs()
            scalars["importance_shift"] = float(shift.mean()) if shift.numel() else 0.0
        rows, cols, cosine = hungarian_match(atoms, first["atoms"])
        scalars["drift_first"] = float(cosine.mean())
        self._previous[class_id] = current
        module = trainer.lightning_module
        for name, value in scalars.items():
            module.log(f"concepts/class_{class_id}/{name}", value, rank_zero_only=True)
        lineage = dict(zip(rows.tolist(), zip(cols.tolist(), cosine.tolist())))
        strips = concept_strips(craft.crops_, craft.crops_u_, self.top_k)
        return [
            [trainer.current_epoch, class_id, k, lineage[k][0], lineage[k][1], float(importance[k]), strips[k]]
            for k in range(atoms.shape[0])
        ]

    def quality(self, craft: Any, importance: Tensor) -> dict[str, Tensor]:
        """The dictionary's quality on the crops it was fitted on, and the importance concentration."""
        x, codes = craft.crop_activations_, craft.crops_u_
        # rank 0 alone: no sync (a sync would wait for the other ranks forever)
        metric = DictionaryQuality(n_channels=x.shape[1], n_concepts=codes.shape[1], sync_on_compute=False)
        metric = metric.to(x.device)
        metric.update(x, codes, craft.dictionary_.decode(codes))
        result = metric.compute()
        result.pop("active_codes")
        result["concentration"] = importance_concentration(importance.clamp_min(0), self.top_concepts)
        return result

    @staticmethod
    def _missing(class_id: int) -> None:
        raise ValueError(f"the validation data has no image of class {class_id}")

    def concepts(self, model: nn.Module, images: Tensor, class_id: int) -> tuple[Any, Tensor, Any]:
        """Fit CRAFT on ``images`` of ``class_id``: ``(craft, importance [r], gallery picture uint8 [H,W,3])``."""
        from explain.concepts import Craft, split_model

        sign_split = self.sign_split if self.sign_split is not None else bool(getattr(model, "lipschitz_body", False))
        input_to_latent, latent_to_logit = split_model(model, at=self.at, sign_split=sign_split)
        craft = Craft(input_to_latent, latent_to_logit, n_concepts=self.n_concepts, **self.craft_options)
        craft.fit(images, class_id=class_id)
        importance = craft.importance(images, nb_design=self.nb_design, seed=self.seed)
        return craft, importance.detach().cpu(), figure_to_array(craft.gallery(top_k=self.top_k))


def share_auto_batch_sizes(craft_options: dict[str, Any]) -> None:
    """Replace ``"auto"`` in ``craft_options`` (``batch_size``, ``dictionary_options["encode_batch_size"]``) by one
    :class:`~explain.batching.AutoBatchSize` each, in place: the Crafts of every class and evaluation then share
    the sizes that fit (found, and logged, once)."""
    from explain.batching import AutoBatchSize
    from explain.concepts.dictionary import ENCODE_BATCH_SIZE

    if craft_options.get("batch_size") == "auto":
        craft_options["batch_size"] = AutoBatchSize("ConceptMonitor")
    options = craft_options.get("dictionary_options")
    if isinstance(options, Mapping) and options.get("encode_batch_size") == "auto":
        craft_options["dictionary_options"] = {
            **options, "encode_batch_size": AutoBatchSize("ConceptMonitor dictionary", ENCODE_BATCH_SIZE)
        }


def concept_strips(crops: Tensor, codes: Tensor, top_k: int) -> list[Any]:
    """For each concept, its ``top_k`` crops (largest codes) side by side: uint8 pictures [p, top_k p, 3]."""
    import numpy as np

    count = min(top_k, crops.shape[0])
    strips = []
    for k in range(codes.shape[1]):
        best = codes[:, k].cpu().topk(count).indices
        row = crops[best].clamp(0, 1).permute(0, 2, 3, 1)  # [k, p, p, C]
        row = torch.cat(list(row), dim=1)
        if row.shape[-1] == 1:
            row = row.expand(-1, -1, 3)
        strips.append((row[..., :3].numpy() * 255).round().astype(np.uint8))
    return strips
