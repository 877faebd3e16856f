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

All rows start as unit rows of one layer, so their windows on a layer are those of a strided convolution
over it (stride and padding the product of the layers passed): reading a map at the windows unfolds it once.
When every channel of a cell gets a row (auto_LiRPA's dense rule), the rows come in ``group``s of consecutive
rows with the same origin cell: a map read at the windows is then read once per group and broadcast over its
rows (:meth:`Patches.window`, :meth:`Patches.grouped`), as auto_LiRPA's patches broadcast over the output channel.

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
    """Rows ``coef`` [n, r, C, KH, KW] on a layer of spatial ``size``. Every row started as a unit row at the
    cell ``origin`` [n, r] (flat index) of a layer of spatial ``origin_size``; the window of a row that started
    at ``(i, j)`` has its top-left corner at ``(i s_h - p_h, j s_w - p_w)``, with ``stride`` ``(s_h, s_w)`` and
    ``padding`` ``(p_h, p_w)`` accumulated by the layers passed. ``peak``: the largest number of coefficients
    per row met so far (sizes the chunks of rows)."""

    coef: Tensor
    origin: Tensor
    origin_size: tuple[int, int]
    size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    peak: int = 0
    #: False while cells outside the layer may hold coefficients (zeroed by :meth:`cleaned`, or by any
    #: multiplication with a map read by :meth:`window`, which is zero there)
    clean: bool = True
    #: rows ``g i`` to ``g i + g - 1`` share their origin cell (and so their window), for every ``i``
    group: int = 1

    def __post_init__(self) -> None:
        self.peak = max(self.peak, self.coef[0, 0].numel() if self.coef.shape[1] else 0)

    @classmethod
    def unit_rows(cls, flat_index: Tensor, signs: Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> Patches:
        """Rows ``signs * e_j`` of the coordinates ``flat_index`` [n, r] of a layer of ``shape`` (C, H, W); rows
        in runs of ``C`` with one origin cell (every channel of the cell, in any order) form :attr:`group`\ s."""
        channels, height, width = shape
        n, r = flat_index.shape
        coef = torch.zeros(n, r, channels, 1, 1, dtype=dtype, device=flat_index.device)
        coef.scatter_(2, (flat_index // (height * width)).view(n, r, 1, 1, 1), signs.to(dtype).view(n, r, 1, 1, 1))
        origin = flat_index % (height * width)
        group = 1
        if channels > 1 and r % channels == 0:
            runs = origin.view(n, -1, channels)
            group = channels if bool((runs == runs[..., :1]).all()) else 1
        return cls(coef, origin, (height, width), (height, width), group=group)

    @property
    def kernel(self) -> tuple[int, int]:
        return self.coef.shape[-2], self.coef.shape[-1]

    @property
    def top(self) -> Tensor:
        return (self.origin // self.origin_size[1]) * self.stride[0] - self.padding[0]

    @property
    def left(self) -> Tensor:
        return (self.origin % self.origin_size[1]) * self.stride[1] - self.padding[1]

    def moved(self, coef: Tensor, stride: tuple[int, int], padding: tuple[int, int], size: tuple[int, int]
              ) -> Patches | Tensor:
        """The rows ``coef`` one layer back, through a window map of ``stride`` and ``padding`` onto a layer
        of spatial ``size`` (cells outside it zeroed); dense once the window covers as many cells as the layer."""
        # corner (i S - P) s - p = i (S s) - (P s + p)
        total_stride = (self.stride[0] * stride[0], self.stride[1] * stride[1])
        total_padding = (self.padding[0] * stride[0] + padding[0], self.padding[1] * stride[1] + padding[1])
        patches = Patches(coef, self.origin, self.origin_size, size, total_stride, total_padding, self.peak,
                          group=self.group)
        patches.clean = not patches._sticks_out()
        if coef.shape[-2] * coef.shape[-1] >= size[0] * size[1]:
            return patches.to_dense()
        return patches

    def with_coef(self, coef: Tensor, clean: bool | None = None) -> Patches:
        """The same windows with other coefficients (channels may change); ``clean``: see the field (default:
        unchanged)."""
        clean = self.clean if clean is None else clean
        return Patches(coef, self.origin, self.origin_size, self.size, self.stride, self.padding, self.peak, clean,
                       self.group)

    def cleaned(self) -> Patches:
        """The same rows with the coefficients of cells outside the layer zeroed."""
        return self if self.clean else self.with_coef(self.coef * self._inside(), clean=True)

    def _sticks_out(self) -> bool:
        """True when the window of some origin cell leaves the layer."""
        last = [(o - 1) * s - p + k for o, s, p, k in zip(self.origin_size, self.stride, self.padding, self.kernel)]
        return min(self.padding) > 0 or last[0] > self.size[0] or last[1] > self.size[1]

    def _cells(self) -> tuple[Tensor, Tensor]:
        """Layer coordinates of the window cells: rows [n, r, KH], columns [n, r, KW]."""
        kh, kw = self.kernel
        rows = self.top.unsqueeze(-1) + torch.arange(kh, device=self.origin.device)
        cols = self.left.unsqueeze(-1) + torch.arange(kw, device=self.origin.device)
        return rows, cols

    def _inside(self) -> Tensor:
        """[n, r, 1, KH, KW]: 1 on the window cells inside the layer."""
        rows, cols = self._cells()
        inside_rows = (rows >= 0) & (rows < self.size[0])
        inside_cols = (cols >= 0) & (cols < self.size[1])
        return (inside_rows.unsqueeze(-1) & inside_cols.unsqueeze(-2)).unsqueeze(2).to(self.coef.dtype)

    def grouped(self, rows: Tensor) -> Tensor:
        """A tensor [n, r, ...] of the rows viewed as [n, r / group, group, ...]: it broadcasts against
        :meth:`window`'s maps (and ``.flatten(1, 2)`` gives it back)."""
        return rows.unflatten(1, (-1, self.group))

    def window(self, values: Tensor) -> Tensor:
        """``values`` [n, C', H, W] of the layer read at the window of each group of rows: [n, r / group, 1, C',
        KH, KW] (zero outside), to combine with :meth:`grouped` rows.

        The windows of all origin cells are unfolded once (a table of ``H0 W0`` windows per box), then each group
        takes its own: cheaper than a gather per coefficient when the rows are many."""
        n, channels = values.shape[:2]
        kh, kw = self.kernel
        (h0, w0), (sh, sw), (ph, pw) = self.origin_size, self.stride, self.padding
        bottom = max(0, (h0 - 1) * sh - ph + kh - values.shape[-2])
        right = max(0, (w0 - 1) * sw - pw + kw - values.shape[-1])
        table = F.unfold(F.pad(values, (pw, right, ph, bottom)), (kh, kw), stride=(sh, sw))  # [n, C'KK, L]
        rows_of_windows = (values.shape[-2] + ph + bottom - kh) // sh + 1
        columns = table.shape[-1] // rows_of_windows
        table = table.view(n, -1, rows_of_windows, columns)[:, :, :h0, :w0]
        table = table.permute(0, 2, 3, 1).reshape(n * h0 * w0, -1)
        origin = self.origin[:, :: self.group]
        index = origin + torch.arange(n, device=self.origin.device).unsqueeze(1) * (h0 * w0)
        return table.index_select(0, index.flatten()).view(n, -1, 1, channels, kh, kw)

    def to_dense(self) -> Tensor:
        """The rows as dense tensors [n, r, C, H, W]."""
        n, r, channels, kh, kw = self.coef.shape
        height, width = self.size
        dense = self.coef.new_zeros(n, r, height + 2 * kh, width + 2 * kw, channels)  # the crop drops the outside
        rows, cols = self._cells()
        rows = (rows + kh).clamp(0, height + 2 * kh - 1)
        cols = (cols + kw).clamp(0, width + 2 * kw - 1)
        boxes = torch.arange(n, device=self.coef.device).view(-1, 1, 1, 1)
        index = torch.arange(r, device=self.coef.device).view(1, -1, 1, 1)
        dense[boxes, index, rows.unsqueeze(-1), cols.unsqueeze(-2)] = self.coef.permute(0, 1, 3, 4, 2)
        return dense[:, :, kh : kh + height, kw : kw + width].permute(0, 1, 4, 2, 3)

    def channel_sums(self) -> Tensor:
        """[n, r, C]: the coefficients of each channel summed over the window's cells inside the layer (a
        bias per channel)."""
        return self.cleaned().coef.sum(dim=(-2, -1))

    def concretize_upper(self, bias: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        """``max_{lower <= z <= upper} <coef, z> + bias`` [n, r] over the boxes [n, C, H, W] of the layer."""
        centre, radius = self.window(torch.cat([(lower + upper) / 2, (upper - lower) / 2], dim=1)).chunk(2, dim=3)
        coef = self.grouped(self.coef)
        return (row_dot(coef, centre) + row_dot(coef.abs(), radius)) + bias

    def __add__(self, other: Patches) -> Patches | Tensor:
        """The sum of two sets of rows on the same layer from the same unit rows (a residual sum): on the union
        of the windows when they have the same stride, else dense."""
        if self.stride != other.stride or self.origin is not other.origin:
            return self.to_dense() + other.to_dense()
        dy, dx = self.padding[0] - other.padding[0], self.padding[1] - other.padding[1]  # other's corner - self's
        top, left = min(0, dy), min(0, dx)  # the union's corner, relative to self's
        height = max(self.kernel[0], dy + other.kernel[0]) - top
        width = max(self.kernel[1], dx + other.kernel[1]) - left

        def placed(coef: Tensor, y: int, x: int) -> Tensor:
            y, x = y - top, x - left
            return F.pad(coef, (x, width - x - coef.shape[-1], y, height - y - coef.shape[-2]))

        coef = placed(self.coef, 0, 0) + placed(other.coef, dy, dx)
        padding = (self.padding[0] - top, self.padding[1] - left)
        return Patches(coef, self.origin, self.origin_size, self.size, self.stride, padding,
                       max(self.peak, other.peak), self.clean and other.clean, min(self.group, other.group))


def row_dot(rows: Tensor, maps: Tensor) -> Tensor:
    """``(rows * maps).flatten(3).sum(-1).flatten(1, 2)`` [n, r] for :meth:`Patches.grouped` rows [n, G, g, ...]
    and :meth:`Patches.window` maps [n, G, 1, ...], as a batched matrix product (no product tensor)."""
    n, groups, group = rows.shape[:3]
    flat_rows = rows.reshape(n * groups, group, -1)
    return torch.bmm(flat_rows, maps.reshape(n * groups, -1, 1)).view(n, groups * group)


def add_rows(a: Patches | Tensor, b: Patches | Tensor) -> Patches | Tensor:
    """Sum of two sets of backward rows on the same layer, each patches or dense."""
    if isinstance(a, Patches) and isinstance(b, Patches):
        return a + b
    return (a.to_dense() if isinstance(a, Patches) else a) + (b.to_dense() if isinstance(b, Patches) else b)
