"""Explanation metrics: torchmetrics ``Metric`` wrappers around the pure functions of ``functional``."""

from explain.metrics.alignment import HumanAlignment
from explain.metrics.base import UPDATE_KEYS, ExplanationMetric
from explain.metrics.dictionary import DictionaryQuality
from explain.metrics.drift import ExplanationDrift
from explain.metrics.fidelity import Deletion, Insertion, MuFidelity
from explain.metrics.functional.stability import mege_reco
from explain.metrics.simulatability import Simulatability
from explain.metrics.spurious import SpuriousMass
from explain.metrics.stability import AverageStability

__all__ = [
    "AverageStability",
    "Deletion",
    "DictionaryQuality",
    "ExplanationDrift",
    "ExplanationMetric",
    "HumanAlignment",
    "Insertion",
    "MuFidelity",
    "Simulatability",
    "SpuriousMass",
    "UPDATE_KEYS",
    "mege_reco",
]
