"""Backward rows of convolutional layers stored as patches: each row only over the window it can reach.

Full CROWN bounds every unstable neuron of an intermediate layer by a backward pass to the input
(:class:`explain.bounds.crown.BackwardToInput`). As a dense tensor the row of a neuron spans every value of
every layer it passes, although a neuron of a convolutional layer depends only on its receptive field: a few
pixels around it. auto_LiRPA's "patches" mode (Xu et al. 2020, "Automatic Perturbation Analysis for Scalable
Certified Robustness and Beyond", section 3.3) stores such a row as the small window of coefficients it
covers. Here a :class:`Patches` holds, per box ``n`` and row ``r``, the coefficients ``coef`` [n, r, C, KH, KW]
of a window whose top-left corner is ``(top, left)`` [n, r] on a layer of spatial ``size``:

* a convolution (stride ``s``, dilation ``d``, kernel ``k``, padding ``p``) maps the window to one of
  ``(K - 1) s + d (k - 1) + 1`` cells at ``top * s - p`` by the transposed convolution without padding;
* coordinatewise operations (ReLU relaxations, BatchNorm) multiply by their maps read at the window
  (:meth:`Patches.window`); max pooling places each output coefficient on its window's selected entry;
* cells of a window outside the layer are zero-padding of the forward pass: their coefficients are zeroed.

Any other operation gets the row as a dense tensor (:meth:`Patches.to_dense`), and so does a window that grew
as large as its layer. The bounds are those of the dense rows, to float round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Patches:
    """Rows ``coef`` [n, r, C, KH, KW] over windows at ``(top, left)`` [n, r] of a layer of spatial ``size``;
    ``peak``: the largest number of coefficients per row met so far (sizes the chunks of rows)."""

    coef: Tensor
    top: Tensor
    left: Tensor
    size: tuple[int, int]
    peak: int = 0

    def __post_init__(self) -> None:
        self.peak = max(self.peak, self.coef[0, 0].numel() if self.coef.shape[1] else 0)

    @classmethod
    def unit_rows(cls, flat_index: Tensor, signs: Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> Patches:
        """Rows ``signs * e_j`` of the coordinates ``flat_index`` [n, r] of a layer of ``shape`` (C, H, W)."""
        channels, height, width = shape
        n, r = flat_index.shape
        coef = torch.zeros(n, r, channels, 1, 1, dtype=dtype, device=flat_index.device)
        coef.scatter_(2, (flat_index // (height * width)).view(n, r, 1, 1, 1), signs.to(dtype).view(n, r, 1, 1, 1))
        position = flat_index % (height * width)
        return cls(coef, position // width, position % width, (height, width))

    @property
    def kernel(self) -> tuple[int, int]:
        return self.coef.shape[-2], self.coef.shape[-1]

    def moved(self, coef: Tensor, top: Tensor, left: Tensor, size: tuple[int, int]) -> Patches | Tensor:
        """The rows ``coef`` on a new window (cells outside the layer zeroed), dense once the window covers
        as many cells as the layer."""
        patches = Patches(coef, top, left, size, self.peak)
        patches.coef = patches.coef * patches._inside()
        if coef.shape[-2] * coef.shape[-1] >= size[0] * size[1]:
            return patches.to_dense()
        return patches

    def with_coef(self, coef: Tensor) -> Patches:
        """The same windows with other coefficients (channels may change)."""
        return Patches(coef, self.top, self.left, self.size, self.peak)

    def _cells(self) -> tuple[Tensor, Tensor]:
        """Layer coordinates of the window cells: rows [n, r, KH], columns [n, r, KW]."""
        kh, kw = self.kernel
        rows = self.top.unsqueeze(-1) + torch.arange(kh, device=self.top.device)
        cols = self.left.unsqueeze(-1) + torch.arange(kw, device=self.left.device)
        return rows, cols

    def _inside(self) -> Tensor:
        """[n, r, 1, KH, KW]: 1 on the window cells inside the layer."""
        rows, cols = self._cells()
        inside_rows = (rows >= 0) & (rows < self.size[0])
        inside_cols = (cols >= 0) & (cols < self.size[1])
        return (inside_rows.unsqueeze(-1) & inside_cols.unsqueeze(-2)).unsqueeze(2).to(self.coef.dtype)

    def window(self, values: Tensor) -> Tensor:
        """``values`` [n, C', H, W] of the layer read at every row's window: [n, r, C', KH, KW] (zero outside)."""
        rows, cols = self._cells()
        kh, kw = self.kernel
        padded = F.pad(values, (kw, kw, kh, kh)).permute(0, 2, 3, 1)  # channels last: one gather per cell
        rows = (rows + kh).clamp(0, padded.shape[1] - 1)
        cols = (cols + kw).clamp(0, padded.shape[2] - 1)
        boxes = torch.arange(values.shape[0], device=values.device).view(-1, 1, 1, 1)
        picked = padded[boxes, rows.unsqueeze(-1), cols.unsqueeze(-2)]  # [n, r, KH, KW, C']
        return picked.permute(0, 1, 4, 2, 3)

    def to_dense(self) -> Tensor:
        """The rows as dense tensors [n, r, C, H, W]."""
        n, r, channels, kh, kw = self.coef.shape
        height, width = self.size
        dense = self.coef.new_zeros(n, r, height + 2 * kh, width + 2 * kw, channels)
        rows, cols = self._cells()
        rows = (rows + kh).clamp(0, height + 2 * kh - 1)
        cols = (cols + kw).clamp(0, width + 2 * kw - 1)
        boxes = torch.arange(n, device=self.coef.device).view(-1, 1, 1, 1)
        index = torch.arange(r, device=self.coef.device).view(1, -1, 1, 1)
        dense[boxes, index, rows.unsqueeze(-1), cols.unsqueeze(-2)] = self.coef.permute(0, 1, 3, 4, 2)
        return dense[:, :, kh : kh + height, kw : kw + width].permute(0, 1, 4, 2, 3)

    def channel_sums(self) -> Tensor:
        """[n, r, C]: the coefficients of each channel summed over the window (a bias per channel)."""
        return self.coef.sum(dim=(-2, -1))

    def concretize_upper(self, bias: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        """``max_{lower <= z <= upper} <coef, z> + bias`` [n, r] over the boxes [n, C, H, W] of the layer."""
        centre, radius = self.window(torch.cat([(lower + upper) / 2, (upper - lower) / 2], dim=1)).chunk(2, dim=2)
        return (self.coef * centre + self.coef.abs() * radius).flatten(2).sum(-1) + bias

    def __add__(self, other: Patches) -> Patches | Tensor:
        """The sum of two sets of rows on the same layer (a residual sum): on the union of the windows when
        they are a fixed shift apart for every row, else dense."""
        shift_rows, shift_cols = other.top - self.top, other.left - self.left
        if not (bool((shift_rows == shift_rows.flatten()[0]).all()) and bool((shift_cols == shift_cols.flatten()[0]).all())):
            return self.to_dense() + other.to_dense()
        dy, dx = int(shift_rows.flatten()[0]), int(shift_cols.flatten()[0])
        top, left = min(0, dy), min(0, dx)  # the union's corner, relative to self's
        height = max(self.kernel[0], dy + other.kernel[0]) - top
        width = max(self.kernel[1], dx + other.kernel[1]) - left

        def placed(coef: Tensor, y: int, x: int) -> Tensor:
            return F.pad(coef, (x - left, width - (x - left) - coef.shape[-1], y - top, height - (y - top) - coef.shape[-2]))

        coef = placed(self.coef, 0, 0) + placed(other.coef, dy, dx)
        peak = max(self.peak, other.peak)
        return Patches(coef, self.top + top, self.left + left, self.size, peak)


def add_rows(a: Patches | Tensor, b: Patches | Tensor) -> Patches | Tensor:
    """Sum of two sets of backward rows on the same layer, each patches or dense."""
    if isinstance(a, Patches) and isinstance(b, Patches):
        return a + b
    return (a.to_dense() if isinstance(a, Patches) else a) + (b.to_dense() if isinstance(b, Patches) else b)
