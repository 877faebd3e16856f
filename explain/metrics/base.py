"""Common contract of the explanation metrics, so a callback can feed any of them the same way."""

from __future__ import annotations

from typing import ClassVar

from torchmetrics import Metric

#: Every keyword an explanation metric may ask for in ``update``:
#: ``maps`` [B,H,W] (the explanation), ``images`` [B,C,H,W], ``targets`` [B] (the explained class),
#: ``human`` [B,H,W] and ``has_heatmap`` [B] (human maps), ``model`` (the explained network),
#: ``explainer`` (the callable that produced ``maps``), ``ids`` [B] (stable sample indices of a monitor set),
#: ``spurious_mask`` [B,H,W] bool (pixels a model right for the right reasons should ignore).
UPDATE_KEYS = ("maps", "images", "targets", "human", "has_heatmap", "model", "explainer", "ids", "spurious_mask")


class ExplanationMetric(Metric):
    """A torchmetrics ``Metric`` whose ``update`` takes keyword arguments named in :data:`UPDATE_KEYS`.

    ``requires`` lists the keywords ``update`` needs; a caller such as ``ExplanationMonitor`` passes exactly
    those. ``compute`` returns a scalar tensor or a dict of scalar tensors (logged as ``<name>/<key>``).
    """

    requires: ClassVar[tuple[str, ...]] = ("maps",)
    full_state_update = False

    @property
    def name(self) -> str:
        """Logging key of the metric."""
        return type(self).__name__.lower()
