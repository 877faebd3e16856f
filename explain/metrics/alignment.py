"""``HumanAlignment``: the reference alignment score of model maps with human maps, as a torchmetrics Metric."""

from __future__ import annotations

import torch
from torch import Tensor

from explain.metrics.base import ExplanationMetric
from explain.metrics.functional.alignment import CLICKME_CEILING, per_image_spearman, top_fraction_dice_iou
from explain.registry import register_metric
from explain.validation import in_interval


@register_metric("alignment")
class HumanAlignment(ExplanationMetric):
    """Alignment of explanation maps with human importance maps (Fel et al. 2022, reference evaluation).

    ``update(maps [B,H,W], human [B,H,W], has_heatmap [B] = None)``; images without a human map are skipped.
    ``compute()`` returns ``mean(spearman rho) / ceiling`` (the score reported in the paper, ceiling = ClickMe
    inter-rater agreement 0.65753). ``compute_all()`` also gives the raw rho and the Dice/IoU of the pixels strictly above each map's
    ``100 (1 - top_fraction)``-th percentile (the reference's rule),
    synced across processes too (``ExplanationMonitor`` logs all four).

    The model map of the reference evaluation is ``|gradient|`` max over channels, not blurred
    (``explain.Saliency``).

    Raises:
        ValueError: ``ceiling`` or ``top_fraction`` outside (0, 1]; at ``update``, a ``has_heatmap`` that does not
            have one entry per map.

    >>> import torch
    >>> human = torch.rand(3, 8, 8)
    >>> metric = HumanAlignment()
    >>> metric.update(maps=2 * human + 1, human=human, has_heatmap=torch.tensor([True, True, False]))
    >>> {key: round(value.item(), 3) for key, value in metric.compute_all().items()}  # same ranking: rho = 1
    {'alignment': 1.521, 'spearman': 1.0, 'dice': 1.0, 'iou': 1.0}
    """

    requires = ("maps", "human", "has_heatmap")
    main_score = "alignment"  # the key of compute_all() that compute() returns
    higher_is_better = True
    is_differentiable = False

    def __init__(self, ceiling: float = CLICKME_CEILING, top_fraction: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        in_interval("ceiling", ceiling, 0, 1, low_open=True)
        in_interval("top_fraction", top_fraction, 0, 1, low_open=True)
        self.ceiling = ceiling
        self.top_fraction = in_interval("top_fraction", top_fraction, 0, 1, low_open=True)
        for key in ("rho_sum", "dice_sum", "iou_sum", "count"):
            self.add_state(key, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, maps: Tensor, human: Tensor, has_heatmap: Tensor | None = None) -> None:
        if has_heatmap is not None:
            keep = has_heatmap.to(torch.bool).reshape(-1).to(maps.device)
            if keep.shape[0] != maps.shape[0]:
                raise ValueError(f"has_heatmap has {keep.shape[0]} entries for {maps.shape[0]} maps")
            maps, human = maps[keep], human.to(maps.device)[keep]
        if maps.shape[0] == 0:
            return
        rho = per_image_spearman(maps, human)
        dice, iou = top_fraction_dice_iou(maps, human, self.top_fraction)
        device = self.rho_sum.device
        self.rho_sum += rho.double().sum().to(device)
        self.dice_sum += dice.double().sum().to(device)
        self.iou_sum += iou.double().sum().to(device)
        self.count += rho.shape[0]

    def _scores(self) -> dict[str, Tensor]:
        count = self.count.clamp_min(1)
        rho = self.rho_sum / count
        return {
            "alignment": (rho / self.ceiling).float(),
            "spearman": rho.float(),
            "dice": (self.dice_sum / count).float(),
            "iou": (self.iou_sum / count).float(),
        }

    def compute_all(self) -> dict[str, Tensor]:
        """``alignment`` (mean rho / ceiling), ``spearman`` (mean rho), ``dice`` and ``iou`` (top fraction).

        Synced across processes like ``compute()`` (torchmetrics' ``sync_context``: the states are summed over
        the processes, then each process gets its own states back), so call it on every process.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            return self._scores()

    def compute(self) -> Tensor:
        return self._scores()["alignment"]  # synced by torchmetrics' compute wrapper
