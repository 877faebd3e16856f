"""EVA: Explaining using Verified perturbation Analysis (Fel et al. 2023, "Don't Lie to Me! Robust and
Efficient Explainability with Verified Perturbation Analysis", CVPR).

The adversarial overlap of an image ``x`` with label ``y`` over a set of perturbations ``B``,

    AO(x, B) = max_{delta in B} max_{c != y} f_c(x + delta) - f_y(x + delta),

is upper-bounded by verified perturbation analysis (:mod:`explain.bounds`) over the L-inf ball of radius
``eps``. The importance of a region ``u`` is how much the overlap drops when ``u`` may not move:

    EVA(u) = AO(x, B) - AO(x, B_u),   B_u = {delta in B : delta_u = 0}.

Regions are the cells of a ``grid_size`` x ``grid_size`` grid, or any integer label map (superpixels). Every
(image, region) box of a batch goes through one batched bound computation (``batch_size`` boxes at a time).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from explain.base import Explainer, check_images_targets, eval_mode, grad_enabled, model_device
from explain.bounds import METHODS, BoundGraph, build_graph, check_graph, margin_upper_bounds

#: Default radius for images in [0, 1]: 8/255, the usual L-inf budget of CIFAR-scale robustness work. Smaller
#: radii give tighter (less loose) bounds on deep networks; scale it if the images are normalised outside the model.
DEFAULT_EPS = 8 / 255


def grid_regions(height: int, width: int, grid_size: int, device: torch.device | None = None) -> Tensor:
    """Region ids [H, W] of a ``grid_size`` x ``grid_size`` grid (row-major; the nearest-neighbour upsampling
    of the grid, as Sobol's masks, so H and W need not be multiples of ``grid_size``)."""
    if not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
    rows = torch.arange(height, device=device) * grid_size // height
    cols = torch.arange(width, device=device) * grid_size // width
    return rows[:, None] * grid_size + cols[None, :]


def _check_eps(eps: float) -> float:
    if isinstance(eps, Tensor):
        eps = eps.item()
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a nonnegative number (the L-inf radius), got {eps!r}")
    return float(eps)


def _check_method(method: str, name: str = "method") -> str:
    if method not in METHODS:
        raise ValueError(f"{name} must be one of {METHODS}, got {method!r}")
    return method


def _check_input_range(images: Tensor, input_range: tuple[float, float] | None) -> None:
    if input_range is None:
        return
    low, high = input_range
    if not low < high:
        raise ValueError(f"input_range must be (low, high) with low < high, got {input_range!r}")
    if images.min() < low or images.max() > high:
        raise ValueError(
            f"images lie in [{images.min().item():.4g}, {images.max().item():.4g}], outside input_range "
            f"{tuple(input_range)}: pass input_range=None or the range the images are in"
        )


def overlap_upper_bounds(
    graph: BoundGraph,
    images: Tensor,
    targets: Tensor,
    fixed: Tensor,
    eps: float,
    method: str = "crown",
    input_range: tuple[float, float] | None = None,
    crown_classes: int | None = None,
) -> Tensor:
    """``AO`` upper bounds [n] of n boxes: box ``i`` is the L-inf ball of radius ``eps`` around ``images[i]``
    where ``fixed[i]`` [H, W] is False (all channels) and the point ``images[i]`` where it is True, intersected
    with ``input_range`` if given."""
    radius = eps * (~fixed).unsqueeze(1).to(images.dtype)
    lower, upper = images - radius, images + radius
    if input_range is not None:
        lower, upper = lower.clamp(min=input_range[0]), upper.clamp(max=input_range[1])
    return margin_upper_bounds(graph, lower, upper, targets, method, crown_classes).amax(dim=1)


def adversarial_overlap_bound(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int,
    eps: float,
    fixed: Tensor | None = None,
    method: str = "crown",
    *,
    input_range: tuple[float, float] | None = None,
    lipschitz_body: bool | None = None,
    batch_size: int | None = None,
    crown_classes: int | None = None,
) -> Tensor:
    """Upper bound [B] of ``max_{||delta||_inf <= eps, delta = 0 on fixed} max_{c != y} f_c(x+delta) - f_y(x+delta)``.

    Args:
        model: a network of supported layers (:data:`explain.bounds.SUPPORTED`); deel-torchlip networks are
            exported with ``vanilla_model`` on a copy. Its train/eval flags and ``.grad`` are left untouched.
        images: [B, C, H, W]; targets: [B] class indices (or an int).
        eps: L-inf radius, in the units of ``images``.
        fixed: optional bool [B, H, W] (or [H, W] for all images): cells that are not perturbed (any channel).
        method: ``crown`` (CROWN with IBP intermediate bounds), ``ibp``, ``lipschitz`` (1-Lipschitz body under
            a last linear layer: ``lipschitz_body=True`` or the model's ``lipschitz_body`` attribute), or
            ``best`` (per class, the smallest of the available bounds).
        input_range: optional (low, high): intersect the ball with the valid input range. Default None: the
            plain L-inf ball, as in the definition of the adversarial overlap.
        batch_size: boxes per bound computation (all at once when None).
        crown_classes: with many classes, run CROWN only for this many classes of largest IBP bound per
            box, the others keeping their IBP bound (see :func:`explain.bounds.margin_upper_bounds`).
    """
    images, targets = check_images_targets(images, targets)
    eps, method = _check_eps(eps), _check_method(method)
    _check_input_range(images, input_range)
    batch, _, height, width = images.shape
    if fixed is None:
        fixed = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
    fixed = torch.as_tensor(fixed, device=images.device)
    if fixed.dtype != torch.bool or fixed.shape[-2:] != (height, width) or fixed.ndim not in (2, 3):
        raise ValueError(f"fixed must be a bool tensor [B, H, W] or [H, W] with H, W = {height}, {width}; got "
                         f"{fixed.dtype} {tuple(fixed.shape)}")
    fixed = fixed.expand(batch, height, width)
    if fixed.shape[0] != batch:
        raise ValueError(f"fixed has {fixed.shape[0]} masks for {batch} images")
    out_device = images.device
    device = model_device(model, default=images.device)
    with grad_enabled(), eval_mode(model):
        images, targets = images.detach().to(device).clone(), targets.to(device).clone()
        fixed = fixed.to(device)
        graph = build_graph(model, lipschitz_body=lipschitz_body)
        check_graph(graph, model, images)
        chunk = batch if batch_size is None else batch_size
        bounds = torch.cat([
            overlap_upper_bounds(graph, images[i : i + chunk], targets[i : i + chunk], fixed[i : i + chunk], eps,
                                 method, input_range, crown_classes)
            for i in range(0, batch, chunk)
        ])
    return bounds.detach().to(out_device)


def eva_maps(
    graph: BoundGraph,
    images: Tensor,
    targets: Tensor,
    regions: Tensor,
    eps: float,
    method: str = "crown",
    input_range: tuple[float, float] | None = None,
    batch_size: int | None = None,
    crown_classes: int | None = None,
) -> Tensor:
    """EVA maps [B, H, W]: each pixel gets ``AO(x, B) - AO(x, B_u)`` of its region ``u``.

    ``regions`` [B, H, W] integer region ids (any values; a region is the set of pixels sharing an id). The
    full balls and every region of every image form one list of boxes, bounded ``batch_size`` at a time
    (boxes of several images share a chunk).
    """
    batch, device = images.shape[0], images.device
    inverses = torch.stack([torch.unique(labels, return_inverse=True)[1] for labels in regions])
    counts = (inverses.flatten(1).amax(1) + 1).tolist()
    # boxes: the B full balls, then the regions of image 0, those of image 1, ... (region -1: nothing fixed)
    images_of_regions = torch.repeat_interleave(torch.arange(batch, device=device), torch.tensor(counts, device=device))
    image_index = torch.cat([torch.arange(batch, device=device), images_of_regions])
    region_index = torch.cat([torch.full((batch,), -1, device=device), *[torch.arange(c, device=device) for c in counts]])
    chunk = len(image_index) if batch_size is None else batch_size
    overlap = []
    for start in range(0, len(image_index), chunk):
        index, region = image_index[start : start + chunk], region_index[start : start + chunk]
        fixed = inverses[index] == region.view(-1, 1, 1)  # the masks are built chunk by chunk
        overlap.append(overlap_upper_bounds(graph, images[index], targets[index], fixed, eps, method, input_range,
                                            crown_classes))
    overlap = torch.cat(overlap)
    full, per_region = overlap[:batch], overlap[batch:].split(counts)
    return torch.stack([(full[b] - per_region[b])[inverses[b]] for b in range(batch)])


class EVA(Explainer):
    """EVA attribution maps: ``EVA(model, eps=8/255, grid_size=8, regions=None, bound="crown")(images, targets)``.

    ``regions``: None for the ``grid_size`` grid, or an integer label map [H, W] or [B, H, W] (superpixels)
    used for every call; a call may also pass its own: ``explainer(images, targets, regions=labels)``.
    ``bound``: ``crown`` | ``ibp`` | ``lipschitz`` | ``best`` (see :func:`adversarial_overlap_bound`).
    ``eps`` is in the units of the images (8/255 suits images in [0, 1]; scale it with any normalisation done
    outside the model). ``batch_size`` is the number of (image, region) boxes bounded at once; each carries
    K-1 backward rows through the network, so 16 boxes weigh about as much as 16(K-1) forward rows (16 was the
    fastest on CPU; raise it on a GPU).

    ``crown_classes``: for many classes (ImageNet), run CROWN only for this many classes of largest IBP bound
    per box (the others keep their IBP bound; still sound).

    The Lipschitz bound depends on a box only through the number of free cells, so with
    ``bound="lipschitz"`` every region of equal size gets the same score; it is most useful inside ``best``.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = DEFAULT_EPS,
        grid_size: int = 8,
        regions: Tensor | None = None,
        bound: str = "crown",
        input_range: tuple[float, float] | None = None,
        lipschitz_body: bool | None = None,
        crown_classes: int | None = None,
        batch_size: int = 16,
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.eps = _check_eps(eps)
        if not isinstance(grid_size, int) or grid_size < 1:
            raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
        self.grid_size = grid_size
        self.regions = None if regions is None else self._check_regions(regions)
        self.bound = _check_method(bound, name="bound")
        self.input_range = input_range
        self.lipschitz_body = lipschitz_body
        if crown_classes is not None and (not isinstance(crown_classes, int) or crown_classes < 1):
            raise ValueError(f"crown_classes must be a positive int or None, got {crown_classes!r}")
        self.crown_classes = crown_classes
        self._call_regions: Tensor | None = None

    @staticmethod
    def _check_regions(regions: Tensor) -> Tensor:
        regions = torch.as_tensor(regions)
        if regions.is_floating_point() or regions.is_complex() or regions.dtype == torch.bool:
            raise TypeError(f"regions must be an integer label map, got dtype {regions.dtype}")
        if regions.ndim not in (2, 3):
            raise ValueError(f"regions must be [H, W] or [B, H, W], got shape {tuple(regions.shape)}")
        return regions.long()

    def __call__(self, images: Tensor, targets: Tensor | int, regions: Tensor | None = None) -> Tensor:
        self._call_regions = None if regions is None else self._check_regions(regions)
        try:
            return super().__call__(images, targets)
        finally:
            self._call_regions = None

    def _regions_for(self, images: Tensor) -> Tensor:
        batch, _, height, width = images.shape
        regions = self._call_regions if self._call_regions is not None else self.regions
        if regions is None:
            regions = grid_regions(height, width, self.grid_size, images.device)
        if regions.shape[-2:] != (height, width) or (regions.ndim == 3 and regions.shape[0] != batch):
            raise ValueError(
                f"regions of shape {tuple(regions.shape)} do not match images {tuple(images.shape)}: pass "
                f"[H, W] or [B, H, W] with H, W = {height}, {width} and B = {batch}"
            )
        return regions.to(images.device).expand(batch, height, width)

    def explain(self, images: Tensor, targets: Tensor) -> Tensor:
        _check_input_range(images, self.input_range)
        graph = build_graph(self.model, lipschitz_body=self.lipschitz_body)
        check_graph(graph, self.model, images)
        return eva_maps(graph, images, targets, self._regions_for(images), self.eps, self.bound,
                        self.input_range, self.batch_size, self.crown_classes)

    def __repr__(self) -> str:
        return (f"EVA(model={type(self.model).__name__}, eps={self.eps:.4g}, grid_size={self.grid_size}, "
                f"bound={self.bound!r}, batch_size={self.batch_size})")
