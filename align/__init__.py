"""Training side: harmonized (human-aligned) classifiers, 1-Lipschitz model zoo, losses and certificates."""

from align.module import HarmonizedClassifier

__all__ = ["HarmonizedClassifier"]
