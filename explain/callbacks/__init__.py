"""Lightning callbacks that watch explanations during training (any Lightning project can use them).

* :class:`ExplanationMonitor`: explainers on a fixed monitor set and on validation data, drift, metrics,
  overlays and per-image tables;
* :class:`ConceptMonitor`: CRAFT concepts of chosen classes (gallery and importance table);
* :class:`FeatureVizMonitor`: MACO feature visualizations of chosen classes.

Scalars go through ``pl_module.log``; pictures and tables to W&B, TensorBoard or PNG/CSV files
(:mod:`explain.callbacks.media`).
"""

from explain.callbacks.concept_monitor import ConceptMonitor
from explain.callbacks.explanation_monitor import ExplanationMonitor
from explain.callbacks.featureviz_monitor import FeatureVizMonitor

__all__ = ["ConceptMonitor", "ExplanationMonitor", "FeatureVizMonitor"]
