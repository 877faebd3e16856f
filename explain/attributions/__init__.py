"""Attribution explainers: where in the image the model looks (Saliency family, Sobol, EVA, captum adapter)."""
