"""Pure functions on tensors behind the metrics of :mod:`explain.metrics` (torchmetrics' functional/ pattern)."""

from explain.metrics.functional.alignment import (
    CLICKME_CEILING,
    per_image_spearman,
    top_fraction_dice_iou,
    top_fraction_mask,
)

__all__ = ["CLICKME_CEILING", "per_image_spearman", "top_fraction_dice_iou", "top_fraction_mask"]
