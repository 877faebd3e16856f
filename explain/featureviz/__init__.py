"""Feature visualization with MACO (Fel et al. 2023): what an image that a unit, a class or a concept responds to
looks like, with a transparency map of where the model looked.

    magnitude = magnitude_spectrum(images)              # mean |rfft2| of your data, cached with save_spectrum
    image, alpha = maco(logit(model, 3), 224, magnitude=magnitude)
    figure = plot_maco(image, alpha)
"""

from explain.featureviz.batch import BatchObjective, concept_directions, maco_batch
from explain.featureviz.figure import maco_overlay, plot_maco
from explain.featureviz.maco import maco, random_crops
from explain.featureviz.objectives import (
    Objective,
    channel,
    concept_direction,
    direction_similarity,
    layer_output,
    logit,
    neuron,
)
from explain.featureviz.parameterization import maco_image, spectrum_to_image
from explain.featureviz.spectrum import (
    load_spectrum,
    magnitude_spectrum,
    power_law_spectrum,
    resize_spectrum,
    save_spectrum,
)

__all__ = [
    "maco",
    "magnitude_spectrum",
    "power_law_spectrum",
    "resize_spectrum",
    "save_spectrum",
    "load_spectrum",
    "maco_image",
    "spectrum_to_image",
    "random_crops",
    "Objective",
    "logit",
    "channel",
    "neuron",
    "concept_direction",
    "direction_similarity",
    "layer_output",
    "plot_maco",
    "maco_overlay",
    "maco_batch",
    "concept_directions",
    "BatchObjective",
]
