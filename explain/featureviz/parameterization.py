"""MACO's image parameterisation (Fel et al. 2023, "Unlocking Feature Visualization for Deeper Networks with
MAgnitude Constrained Optimization"): a fixed Fourier magnitude and an optimised phase.

    phase [3,H,W//2+1] -> standardise -> magnitude * exp(i phase) -> irfft2 -> standardise      (decorrelated image)
    -> colour recorrelation -> sigmoid -> value range                                           (RGB image)

The decorrelated image has EXACTLY the given magnitude up to one global scale (the standardisation), except at
the few real-valued Fourier coefficients (the DC term and the Nyquist ones), whose "phase" can only be a sign:
there, as in the reference code, the value is ``magnitude * cos(phase)``. To make this exact elsewhere, the phase
of the two self-conjugate columns of the half spectrum (``kx = 0`` and, for even widths, ``kx = W/2``) is made odd
(``phase[-ky] = -phase[ky]``): ``irfft2`` keeps only the Hermitian part of those columns, so the reference code,
which skips this step, loses part of their magnitude.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Square root of ImageNet's colour covariance (Olah et al. 2017, Lucid), normalised so its largest column has
# unit norm: RGB pixel (row vector) = decorrelated pixel @ COLOR_CORRELATION, as in Lucid, Xplique and Horama.
COLOR_CORRELATION = torch.tensor(
    [
        [0.56282854, 0.58447580, 0.58447580],
        [0.19482528, 0.00000000, -0.19482528],
        [0.04329450, -0.10823626, 0.06494176],
    ]
)


def standardize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``(x - mean(x)) / (std(x) + eps)`` over all the elements (one global mean and std, as the reference)."""
    return (x - x.mean()) / (x.std(correction=0) + eps)


def recorrelate_colors(x: Tensor) -> Tensor:
    """Decorrelated colours -> RGB: ``rgb_c = sum_k x_k M[k, c]`` for images [..., 3, H, W]."""
    matrix = COLOR_CORRELATION.to(device=x.device, dtype=x.dtype)
    return (matrix.T @ x.flatten(-2)).unflatten(-1, x.shape[-2:])


def decorrelate_colors(x: Tensor) -> Tensor:
    """RGB -> decorrelated colours, the inverse of :func:`recorrelate_colors`, for images [..., 3, H, W]."""
    inverse = torch.linalg.inv(COLOR_CORRELATION.double()).to(device=x.device, dtype=x.dtype)
    return (inverse.T @ x.flatten(-2)).unflatten(-1, x.shape[-2:])


def _self_conjugate_columns(width: int) -> list[int]:
    # columns of the half spectrum whose coefficients pair with each other: kx = 0 and, for even W, kx = W/2
    return [0, width // 2] if width % 2 == 0 else [0]


def _odd_phase(phase: Tensor, width: int) -> Tensor:
    """Make the phase odd in ky on the self-conjugate columns; the self-conjugate points keep their phase."""
    height = phase.shape[-2]
    rows = torch.arange(height, device=phase.device)
    partner = (-rows) % height  # ky -> -ky
    columns = _self_conjugate_columns(width)
    column_phase = phase[..., columns]  # [3, H, n]
    odd = 0.5 * (column_phase - column_phase[..., partner, :])
    keep = (partner == rows)[:, None]  # ky = 0 and ky = H/2: real coefficients, value m cos(phase)
    phase = phase.clone()
    phase[..., columns] = torch.where(keep, column_phase, odd)
    return phase


def symmetrize_magnitude(magnitude: Tensor, width: int) -> Tensor:
    """Average ``magnitude[ky]`` and ``magnitude[-ky]`` on the self-conjugate columns.

    The magnitude of any real image already has this symmetry (this is then a no-op); for an arbitrary tensor it
    is the closest magnitude a real image can have.
    """
    height = magnitude.shape[-2]
    partner = (-torch.arange(height, device=magnitude.device)) % height
    columns = _self_conjugate_columns(width)
    magnitude = magnitude.clone()
    column_magnitude = magnitude[..., columns]
    magnitude[..., columns] = 0.5 * (column_magnitude + column_magnitude[..., partner, :])
    return magnitude


def spectrum_to_image(magnitude: Tensor, phase: Tensor, width: int | None = None) -> Tensor:
    """The decorrelated image [3,H,W] of a magnitude and a phase [3,H,W//2+1], standardised.

    ``width`` is the image width (the half spectrum cannot tell W = 2k from W = 2k + 1); default even.

    Raises:
        ValueError: ``magnitude`` and ``phase`` of different shapes, or a half spectrum whose columns do not match
            ``width``.
    """
    if magnitude.shape != phase.shape:
        raise ValueError(
            f"magnitude and phase must have the same shape, got {tuple(magnitude.shape)} and {tuple(phase.shape)}"
        )
    height = phase.shape[-2]
    width = 2 * (phase.shape[-1] - 1) if width is None else width
    if width // 2 + 1 != phase.shape[-1]:
        raise ValueError(f"a width of {width} needs a half spectrum of {width // 2 + 1} columns, got {phase.shape[-1]}")
    phase = _odd_phase(standardize(phase), width)
    spectrum = torch.polar(magnitude, phase)
    return standardize(torch.fft.irfft2(spectrum, s=(height, width)))


def to_rgb(image: Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Decorrelated image -> RGB in ``value_range``: colour recorrelation, sigmoid, affine map."""
    low, high = value_range
    return torch.sigmoid(recorrelate_colors(image)) * (high - low) + low


def maco_image(
    magnitude: Tensor, phase: Tensor, value_range: tuple[float, float] = (0.0, 1.0), width: int | None = None
) -> Tensor:
    """MACO's image [3,H,W] in ``value_range`` for a magnitude and a phase [3,H,W//2+1] (see module docstring)."""
    return to_rgb(spectrum_to_image(magnitude, phase, width), value_range)
