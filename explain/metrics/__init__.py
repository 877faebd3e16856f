"""Explanation metrics: torchmetrics ``Metric`` wrappers around the pure functions of ``functional``."""

from explain.metrics.alignment import HumanAlignment
from explain.metrics.base import UPDATE_KEYS, ExplanationMetric

__all__ = ["ExplanationMetric", "HumanAlignment", "UPDATE_KEYS"]
