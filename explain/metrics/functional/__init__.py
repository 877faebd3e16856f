"""Pure functions on tensors behind the metrics of :mod:`explain.metrics` (torchmetrics' functional/ pattern)."""

from explain.metrics.functional.alignment import (
    CLICKME_CEILING,
    average_ranks,
    linear_percentile,
    per_image_spearman,
    rowwise_spearman,
    top_fraction_dice_iou,
    top_fraction_mask,
)
from explain.metrics.functional.drift import merge_references, reference_spearman, unique_by_id
from explain.metrics.functional.fidelity import (
    auc,
    causal_curve,
    deletion_curve,
    insertion_curve,
    mufidelity,
    random_cell_masks,
    stage_sizes,
)
from explain.metrics.functional.spurious import spurious_area, spurious_mass
from explain.metrics.functional.stability import (
    DISTANCES,
    average_stability,
    fold_pair_distances,
    mege_reco,
    mege_score,
    reco_score,
    resolve_distance,
    spearman_distance,
)

__all__ = [
    "CLICKME_CEILING",
    "DISTANCES",
    "auc",
    "average_ranks",
    "average_stability",
    "causal_curve",
    "deletion_curve",
    "fold_pair_distances",
    "insertion_curve",
    "mege_reco",
    "mege_score",
    "merge_references",
    "mufidelity",
    "linear_percentile",
    "per_image_spearman",
    "random_cell_masks",
    "reco_score",
    "reference_spearman",
    "resolve_distance",
    "rowwise_spearman",
    "spearman_distance",
    "spurious_area",
    "spurious_mass",
    "stage_sizes",
    "top_fraction_dice_iou",
    "top_fraction_mask",
    "unique_by_id",
]
