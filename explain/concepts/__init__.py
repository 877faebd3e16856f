"""Concept-based explanations: CRAFT (Fel et al. 2023) and the pieces it is made of.

* :class:`Craft`: concepts of a model split in two (``input_to_latent``, ``latent_to_logit``);
* :func:`split_model`: that split for ``nn.Sequential`` models and torchvision ResNets (``sign_split`` for
  networks with signed activations);
* :class:`Dictionary`, :func:`make_dictionary`: one interface for NMF, semi-NMF, archetypal analysis and sparse
  autoencoders (:mod:`explain.concepts.dictionary`);
* :class:`NMF` (functions in :mod:`explain.concepts.nmf` and :mod:`explain.concepts.nnls`): nonnegative
  factorization and least squares in torch;
* :func:`nnls_jacobian`, :func:`implicit_concept_maps`: implicit differentiation of the NNLS solution;
* :func:`concept_importance`: total Sobol indices of the concept coefficients;
* :func:`concept_gallery`: a figure of each concept's top crops.
"""

from explain.concepts.craft import Craft
from explain.concepts.dictionary import Dictionary, make_dictionary
from explain.concepts.crops import extract_crops
from explain.concepts.gallery import concept_gallery
from explain.concepts.implicit import implicit_concept_maps, nnls_jacobian
from explain.concepts.importance import concept_importance
from explain.concepts.nmf import NMF, reconstruction_error
from explain.concepts.split import SignMerge, SignSplit, split_model

__all__ = [
    "NMF",
    "Craft",
    "Dictionary",
    "SignMerge",
    "SignSplit",
    "concept_gallery",
    "concept_importance",
    "extract_crops",
    "implicit_concept_maps",
    "make_dictionary",
    "nnls_jacobian",
    "reconstruction_error",
    "split_model",
]
