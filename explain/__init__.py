"""Model-agnostic explainers, explanation metrics and Lightning callbacks.

Imports nothing from ``align`` or ``datamodules``: any Lightning project can use this package alone.
Every explainer shares one call: ``Explainer(model, **options)(images [B,C,H,W], targets [B]) -> maps [B,H,W]``.
"""

from importlib import import_module

from explain.base import Explainer

# public name -> module that defines it (imported on first access, so `import explain` stays light)
_EXPORTS = {
    "Saliency": "explain.attributions.saliency",
    "SmoothGrad": "explain.attributions.saliency",
    "GradientInput": "explain.attributions.saliency",
    "Sobol": "explain.attributions.sobol",
    "EVA": "explain.attributions.eva",
    "from_captum": "explain.attributions.captum",
    "Craft": "explain.concepts.craft",
    "maco": "explain.featureviz.maco",
    "magnitude_spectrum": "explain.featureviz.maco",
    "ExplanationMonitor": "explain.callbacks",
    "ConceptMonitor": "explain.callbacks",
    "FeatureVizMonitor": "explain.callbacks",
    "HumanAlignment": "explain.metrics",
}

__all__ = ["Explainer", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'explain' has no attribute {name!r}")
